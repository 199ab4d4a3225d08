#!/usr/bin/env python3
"""Make qpipe's embedded default: calibration captions, a BPE tokenizer, a tiny Qwen3-VL
checkpoint with random weights, and a tiny image-caption set in COCO captions format.

Optional to run: its outputs are committed. Re-running with the same library versions
reproduces them byte for byte (fixed seeds).

    python3 -m venv .venv && .venv/bin/pip install torch transformers tokenizers safetensors pillow
    .venv/bin/python scripts/make_tiny_qwen3_vl.py

Writes
    data/calibration/captions.txt                  640 caption-like lines, written here
    data/coco/images/<id>.png|.jpg                 32 synthetic images, 40..120 px a side
    data/coco/captions_tiny.json                   COCO captions format, 512 annotations
    data/coco/README.md
    models/tiny_qwen3_vl/checkpoint/config.json    transformers 5.x dialect (rope_parameters)
    models/tiny_qwen3_vl/checkpoint/model.safetensors  bf16, full VLM (vision tower too)
    models/tiny_qwen3_vl/checkpoint/tokenizer.json
    models/tiny_qwen3_vl/checkpoint/tokenizer_config.json
    models/tiny_qwen3_vl/checkpoint/preprocessor_config.json  Qwen2VLImageProcessor

Tokenizer: byte-level BPE trained on the captions to 512 tokens (ids 0..2 are
<|endoftext|>, <|im_start|>, <|im_end|>), then four special tokens appended after
training, so caption ids do not depend on them: <|vision_start|> 512, <|vision_end|> 513,
<|image_pad|> 514, <|video_pad|> 515 (text vocab_size 516; the config's
vision_start/vision_end/image/video token ids point at them).

The language model has Qwen3-VL's structure (q/k norms, GQA, interleaved MRoPE,
SwiGLU, tied embeddings) at toy size: 4 layers, hidden 128, intermediate 384, 4 heads of
32, 2 KV heads. The vision tower has Qwen3-VL's structure too (Conv3d patch embedding,
learned position grid, 2D rotary, DeepStack): 2 blocks, hidden 128, intermediate 256,
2 heads of 64, patch 8, temporal patch 2, spatial merge 2 (one image token per 16x16
pixels), out hidden 128, a 4x4 position grid, a DeepStack merger after block 0.
Every Linear's input dimension is a multiple of 128 (vision: 128, 256, and 512 in the
mergers; the patch embedding's reduction is 3*2*8*8 = 384), so each format's blocks fit
(INT4 blocks of 128, NVFP4 16, MXFP4 32). The Conv3d's weight tensor itself is
[128, 3, 2, 8, 8]: its last axis is 8 wide.

Weights: transformers' default init (seed 0), then larger random projection weights,
drawn from one generator (seed 1) in this order: the embeddings' first 512 rows, the
language model's projections, the 4 vision-token rows of the embeddings, then the vision
tower's Linear and Conv3d weights (randn * 0.05). The language model's text rows and
layers therefore equal those of the earlier text-only checkpoint (vocab 512, vision tower
of hidden 32), which drew them in the same order.

Images (seed 2014): gradients, rectangles, circles and blocky noise, one kind per index
mod 4; PNG for images 0-3, 8-11, ..., JPEG (quality 85) for the others. Sizes are random,
so most are not multiples of 16 and the processor resizes them. Each image has 16
captions from the caption grammar (seed 2015); the annotations are shuffled (seed 2016)
so they are not grouped by image, as COCO's are not.
"""

import io
import json
import math
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ROOT / "data" / "calibration" / "captions.txt"
CKPT = ROOT / "models" / "tiny_qwen3_vl" / "checkpoint"
COCO = ROOT / "data" / "coco"

VOCAB_SIZE = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Appended after BPE training, in this order: ids VOCAB_SIZE .. VOCAB_SIZE + 3.
VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The image processor: Qwen2-VL's, at the tiny tower's patch sizes. One merged image token
# covers (PATCH * MERGE)^2 = 256 pixels, so MIN_PIXELS / MAX_PIXELS give 4..64 image tokens.
PATCH, TEMPORAL_PATCH, MERGE = 8, 2, 2
MIN_PIXELS, MAX_PIXELS = 16 * 16 * 4, 16384
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

N_IMAGES, CAPTIONS_PER_IMAGE = 32, 16


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


def add_vision_tokens(tok) -> dict[str, int]:
    """Append the vision special tokens after training; returns their ids."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                       special=True) for t in VISION_SPECIALS])
    ids = {t: tok.token_to_id(t) for t in VISION_SPECIALS}
    assert list(ids.values()) == list(range(VOCAB_SIZE, VOCAB_SIZE + len(VISION_SPECIALS))), ids
    return ids


def _gradient(rng, w, h):
    c0 = [rng.randrange(256) for _ in range(3)]
    c1 = [rng.randrange(256) for _ in range(3)]
    angle = rng.uniform(0.0, 2.0 * math.pi)
    dx, dy = math.cos(angle), math.sin(angle)
    proj = [x * dx + y * dy for y in range(h) for x in range(w)]
    lo, hi = min(proj), max(proj)
    out = bytearray()
    for p in proj:
        t = (p - lo) / (hi - lo)
        out += bytes(round(a + (b - a) * t) for a, b in zip(c0, c1))
    from PIL import Image
    return Image.frombytes("RGB", (w, h), bytes(out))


def _shapes(rng, w, h, ellipses):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(2, 6)):
        x0, y0 = rng.randrange(-w // 4, w), rng.randrange(-h // 4, h)
        x1, y1 = x0 + rng.randrange(8, w // 2 + 8), y0 + rng.randrange(8, h // 2 + 8)
        color = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if ellipses else draw.rectangle)([x0, y0, x1, y1], fill=color)
    return img


def _blocky_noise(rng, w, h):
    from PIL import Image

    cell = rng.randrange(3, 7)
    cw, ch = -(-w // cell), -(-h // cell)
    cells = [[tuple(rng.randrange(256) for _ in range(3)) for _ in range(cw)] for _ in range(ch)]
    out = bytearray()
    for y in range(h):
        row = cells[y // cell]
        for x in range(w):
            out += bytes(row[x // cell])
    return Image.frombytes("RGB", (w, h), bytes(out))


def make_images(n: int = N_IMAGES, seed: int = 2014) -> list[dict]:
    """Synthetic scenes, returned as {id, file_name, width, height, data} (data: file bytes)."""
    rng = random.Random(seed)
    ids = sorted(rng.sample(range(1, 1_000_000), n))
    images = []
    for i, image_id in enumerate(ids):
        w, h = rng.randint(40, 120), rng.randint(40, 120)
        kind = i % 4
        if kind == 0:
            img = _gradient(rng, w, h)
        elif kind in (1, 2):
            img = _shapes(rng, w, h, ellipses=kind == 2)
        else:
            img = _blocky_noise(rng, w, h)
        buf = io.BytesIO()
        if (i // 4) % 2 == 0:
            name = f"{image_id:012d}.png"
            img.save(buf, format="PNG")
        else:
            name = f"{image_id:012d}.jpg"
            img.save(buf, format="JPEG", quality=85)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h, "data": buf.getvalue()})
    return images


def write_coco(images: list[dict]) -> None:
    captions = make_captions(len(images) * CAPTIONS_PER_IMAGE, seed=2015)
    rng = random.Random(2016)
    ann_ids = rng.sample(range(1, 10_000_000), len(captions))
    annotations = [
        {"id": ann_ids[k], "image_id": images[k // CAPTIONS_PER_IMAGE]["id"], "caption": c}
        for k, c in enumerate(captions)
    ]
    rng.shuffle(annotations)
    img_dir = COCO / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.iterdir():
        if old.suffix in (".png", ".jpg"):
            old.unlink()
    for im in images:
        (img_dir / im["file_name"]).write_bytes(im["data"])
    doc = {
        "info": {"description": "qpipe tiny image-caption set: synthetic images, grammar captions",
                 "version": "1.0", "year": 2025, "contributor": "qpipe (scripts/make_tiny_qwen3_vl.py)",
                 "url": "", "date_created": "2025-01-01"},
        "licenses": [{"id": 1, "name": "CC0 1.0 (generated data)",
                      "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": [{"id": im["id"], "file_name": im["file_name"],
                    "width": im["width"], "height": im["height"], "license": 1} for im in images],
        "annotations": annotations,
    }
    (COCO / "captions_tiny.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    (COCO / "README.md").write_text(
        "# Tiny image-caption set (COCO captions format)\n\n"
        f"{len(images)} synthetic images (gradients, rectangles, circles, blocky noise; 40..120 px a side, "
        "half PNG, half JPEG) in `images/`, and `captions_tiny.json` with "
        f"{len(annotations)} captions ({CAPTIONS_PER_IMAGE} per image, shuffled) from a small caption grammar.\n"
        "Generated, seeded, by `scripts/make_tiny_qwen3_vl.py`; nothing in it comes from COCO itself.\n"
        "Format: COCO captions (`info`, `licenses`, `images: [{id, file_name, width, height, license}]`, "
        "`annotations: [{id, image_id, caption}]`); `file_name` is relative to `images/`.\n",
        encoding="utf-8")


def write_preprocessor_config() -> None:
    # transformers 5 reads `size` {shortest_edge: min pixels, longest_edge: max pixels};
    # min_pixels/max_pixels are the older spelling (Qwen's own files carry both).
    (CKPT / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "patch_size": PATCH,
        "temporal_patch_size": TEMPORAL_PATCH,
        "merge_size": MERGE,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
    }, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    lines = make_captions()
    CAPTIONS.parent.mkdir(parents=True, exist_ok=True)
    CAPTIONS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_coco(make_images())

    CKPT.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(lines)
    vision_ids = add_vision_tokens(tok)
    tok.save(str(CKPT / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    assert vocab == VOCAB_SIZE + len(VISION_SPECIALS), vocab
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
            for t in SPECIALS + VISION_SPECIALS
        },
    }, indent=2) + "\n", encoding="utf-8")
    write_preprocessor_config()

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
            depth=2, hidden_size=128, intermediate_size=256, num_heads=2, in_channels=3,
            patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH,
            out_hidden_size=128, num_position_embeddings=16, deepstack_visual_indexes=[0],
            hidden_act="gelu_pytorch_tanh",
        ),
        image_token_id=vision_ids["<|image_pad|>"], video_token_id=vision_ids["<|video_pad|>"],
        vision_start_token_id=vision_ids["<|vision_start|>"], vision_end_token_id=vision_ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    # Larger-than-default init spreads the layers' sensitivities, as trained weights do.
    # Draw order (one generator): embedding rows 0..511, the LM's projections, embedding
    # rows 512.., the vision tower's Linear/Conv3d weights (see the module docstring).
    vision_weights = {f"model.visual.{n}.weight" for n, m in model.model.visual.named_modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        embed, vision = None, []
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith("proj.weight"):
                layer = int(name.split("layers.")[1].split(".")[0])
                scale = 0.05 * (1.0 + 0.5 * layer)
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
            elif name.endswith("embed_tokens.weight"):
                embed = p
                p[:VOCAB_SIZE].copy_((torch.randn((VOCAB_SIZE, p.shape[1]), generator=gen) * 0.15).to(p.dtype))
            elif name in vision_weights:
                vision.append(p)
        assert len(vision) == len(vision_weights), (len(vision), sorted(vision_weights))
        embed[VOCAB_SIZE:].copy_((torch.randn((vocab - VOCAB_SIZE, embed.shape[1]), generator=gen) * 0.15)
                                 .to(embed.dtype))
        for p in vision:
            p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))
    model.save_pretrained(str(CKPT), safe_serialization=True)
    for extra in ["generation_config.json"]:
        (CKPT / extra).unlink(missing_ok=True)
    print(f"vocab {vocab}, pad {pad_id}, vision tokens {vision_ids}, "
          f"params {sum(p.numel() for p in model.parameters())}")


if __name__ == "__main__":
    main()
