#!/usr/bin/env python3
"""Make qpipe's embedded default: calibration captions, a BPE tokenizer and a tiny
Qwen3-VL checkpoint with random weights.

Optional to run: its outputs are committed. Re-running with the same library versions
reproduces them byte for byte (fixed seeds).

    python3 -m venv .venv && .venv/bin/pip install torch transformers tokenizers safetensors
    .venv/bin/python scripts/make_tiny_qwen3_vl.py

Writes
    data/calibration/captions.txt                  640 caption-like lines, written here
    models/tiny_qwen3_vl/checkpoint/config.json    transformers 5.x dialect (rope_parameters)
    models/tiny_qwen3_vl/checkpoint/model.safetensors  bf16, full VLM (vision tower too)
    models/tiny_qwen3_vl/checkpoint/tokenizer.json
    models/tiny_qwen3_vl/checkpoint/tokenizer_config.json

The language model has Qwen3-VL's structure (q/k norms, GQA, interleaved MRoPE,
SwiGLU, tied embeddings) at toy size: 4 layers, hidden 128, intermediate 384, 4 heads of
32, 2 KV heads. Every input dimension is a multiple of 128, so each format's blocks fit
(INT4 blocks of 128, NVFP4 16, MXFP4 32).
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ROOT / "data" / "calibration" / "captions.txt"
CKPT = ROOT / "models" / "tiny_qwen3_vl" / "checkpoint"

VOCAB_SIZE = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_captions(n: int = 640, seed: int = 2017) -> list[str]:
    """Caption-like sentences from a small grammar (our own text, not COCO's)."""
    rng = random.Random(seed)
    people = ["a man", "a woman", "a young boy", "a little girl", "two children", "a group of people",
              "an older man", "a skier", "a surfer", "a chef", "a tennis player", "a baseball player",
              "a couple", "a police officer", "a student", "three friends"]
    animals = ["a brown dog", "a black cat", "two horses", "a herd of sheep", "an elephant",
               "a giraffe", "a zebra", "a small bird", "a large bear", "a cow", "a pair of ducks"]
    things = ["a red bus", "a white truck", "a train", "a pizza", "a plate of food", "a laptop",
              "a bicycle", "a kite", "a surfboard", "an umbrella", "a clock tower", "a stop sign",
              "a bowl of fruit", "a sandwich", "a motorcycle", "a boat", "a cake", "a fire hydrant"]
    doing = ["riding", "holding", "looking at", "standing next to", "sitting on", "walking past",
             "carrying", "playing with", "eating", "watching", "pointing at", "waiting for"]
    places = ["on a city street", "in a grassy field", "near the beach", "in a kitchen",
              "at a train station", "on a snowy hill", "in a living room", "beside a lake",
              "under a cloudy sky", "in front of a building", "at the park", "on a wooden table",
              "in a busy market", "along a dirt road"]
    adjectives = ["small", "large", "old", "bright", "crowded", "quiet", "colorful", "empty", "wet", "sunny"]
    scenes = ["room", "street", "kitchen", "field", "beach", "office", "yard", "station", "bathroom"]

    lines = []
    while len(lines) < n:
        kind = rng.randrange(5)
        if kind == 0:
            s = f"{rng.choice(people)} {rng.choice(doing)} {rng.choice(things)} {rng.choice(places)}"
        elif kind == 1:
            s = f"{rng.choice(animals)} {rng.choice(['standing', 'lying', 'grazing', 'resting', 'running'])} {rng.choice(places)}"
        elif kind == 2:
            s = f"{rng.choice(things)} parked {rng.choice(places)}"
        elif kind == 3:
            s = f"a {rng.choice(adjectives)} {rng.choice(scenes)} with {rng.choice(things)} and {rng.choice(things)}"
        else:
            s = f"{rng.choice(people)} and {rng.choice(animals)} {rng.choice(places)}"
        s = s[0].upper() + s[1:] + "."
        if rng.random() < 0.15:
            s += f" There are {rng.randrange(2, 9)} of them."
        lines.append(s)
    return lines


def make_tokenizer(lines: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    # Qwen2's split pattern, then byte-level mapping, as Qwen's own tokenizer.json does.
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def main() -> None:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    lines = make_captions()
    CAPTIONS.parent.mkdir(parents=True, exist_ok=True)
    CAPTIONS.write_text("\n".join(lines) + "\n", encoding="utf-8")

    CKPT.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(lines)
    tok.save(str(CKPT / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    pad_id = tok.token_to_id("<|endoftext|>")
    eos_id = tok.token_to_id("<|im_end|>")
    (CKPT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer",
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 1024,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                      "rstrip": False, "single_word": False, "special": True}
            for t in SPECIALS
        },
    }, indent=2) + "\n", encoding="utf-8")

    torch.manual_seed(0)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
            max_position_embeddings=1024, rms_norm_eps=1e-6, attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                             "mrope_section": [6, 5, 5], "mrope_interleaved": True},
            pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=eos_id,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
            patch_size=8, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
            num_position_embeddings=16, deepstack_visual_indexes=[0],
        ),
        image_token_id=vocab - 1, video_token_id=vocab - 2,
        vision_start_token_id=eos_id, vision_end_token_id=eos_id,
        tie_word_embeddings=True,
    )
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    # Larger-than-default init spreads the layers' sensitivities, as trained weights do.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith("proj.weight"):
                layer = int(name.split("layers.")[1].split(".")[0])
                scale = 0.05 * (1.0 + 0.5 * layer)
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
            elif name.endswith("embed_tokens.weight"):
                p.copy_((torch.randn(p.shape, generator=gen) * 0.15).to(p.dtype))
    model.save_pretrained(str(CKPT), safe_serialization=True)
    for extra in ["generation_config.json"]:
        (CKPT / extra).unlink(missing_ok=True)
    print(f"vocab {vocab}, pad {pad_id}, params {sum(p.numel() for p in model.parameters())}")


if __name__ == "__main__":
    main()
