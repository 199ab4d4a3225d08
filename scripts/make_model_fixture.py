#!/usr/bin/env python3
"""Expected outputs of the Qwen3-VL language model for qpipe's model parity test.

Optional; needs `pip install torch transformers safetensors` (transformers >= 5).
Loads the committed tiny checkpoint with transformers (Qwen3VLForConditionalGeneration,
f32), takes its language model (`model.model.language_model`, a Qwen3VLTextModel) and
`lm_head`, runs three left-padded rows of token ids (T = 16) called with input_ids and
attention_mask only (position ids 0..T-1, as the extracted language model does), and
writes to stages/model/tests/fixtures/model_tiny_expected.safetensors:

  input_ids, attention_mask     [3, 16] int64; ids are text tokens (3 .. the first vision token)
  hidden_sdpa, hidden_eager     [3, 16, 128] final hidden states (after the last norm) at
                                every position, pads included, with attn_implementation
                                "sdpa" (transformers' default) and "eager"
  logits_sdpa                   [3, 16, 516]
  loss_sdpa                     [] cross-entropy of shifted logits, ignore_index = pad id
  grad.<linear name>            dL/dy of the Linear outputs of layers 0 and 3 ([3, 16, out]),
                                sdpa, from loss_sdpa.backward()

Run from the repository root:  python3 scripts/make_model_fixture.py
"""
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Qwen3VLForConditionalGeneration

ROOT = pathlib.Path(__file__).resolve().parent.parent
CKPT = ROOT / "models/tiny_qwen3_vl/checkpoint"
OUT = ROOT / "stages/model/tests/fixtures/model_tiny_expected.safetensors"
T = 16
PADS = [5, 0, 11]  # left pads per row
GRAD_LAYERS = [0, 3]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def batch(pad_id, text_vocab):
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, text_vocab, (len(PADS), T), generator=g)
    mask = torch.ones_like(ids)
    for r, p in enumerate(PADS):
        ids[r, :p] = pad_id
        mask[r, :p] = 0
    return ids, mask


def run(impl, ids, mask, pad_id, want_grads):
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        CKPT, dtype=torch.float32, attn_implementation=impl).eval()
    lm = model.model.language_model
    assert lm.config._attn_implementation == impl
    outs, handles = {}, []
    if want_grads:
        for i in GRAD_LAYERS:
            for n in LINEARS:
                mod = lm.get_submodule(f"layers.{i}.{n}")
                name = f"layers.{i}.{n}"

                def hook(_m, _inp, out, name=name):
                    out.retain_grad()
                    outs[name] = out
                handles.append(mod.register_forward_hook(hook))
    hidden = lm(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           ignore_index=pad_id)
    grads = {}
    if want_grads:
        loss.backward()
        grads = {f"grad.{k}": v.grad.detach().clone() for k, v in outs.items()}
    for h in handles:
        h.remove()
    return hidden.detach(), logits.detach(), loss.detach(), grads


def main():
    torch.manual_seed(0)
    config = Qwen3VLForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32).config
    pad_id = config.text_config.pad_token_id
    # Text tokens only: ids 3 .. the first vision token (the vision tokens are appended after
    # the BPE vocabulary, so this is the BPE vocabulary minus its three specials).
    text_vocab = min(config.vision_start_token_id, config.vision_end_token_id, config.image_token_id,
                     config.video_token_id)
    ids, mask = batch(pad_id, text_vocab)
    h_s, logits, loss, grads = run("sdpa", ids, mask, pad_id, True)
    h_e, _, _, _ = run("eager", ids, mask, pad_id, False)
    tensors = {"input_ids": ids, "attention_mask": mask, "hidden_sdpa": h_s, "hidden_eager": h_e,
               "logits_sdpa": logits, "loss_sdpa": loss.reshape(()), **grads}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT),
              metadata={"pad_token_id": str(pad_id), "generator": "scripts/make_model_fixture.py",
                        "transformers": __import__("transformers").__version__})
    print(f"wrote {OUT.relative_to(ROOT)} (loss {loss.item():.6f}, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
