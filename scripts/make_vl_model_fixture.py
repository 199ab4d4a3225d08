#!/usr/bin/env python3
"""Expected outputs of the whole Qwen3-VL model (vision tower + language model) on images,
for qpipe's vision parity test.

Optional; needs `pip install torch transformers pillow safetensors nvidia-modelopt`
(transformers >= 5.25; ModelOpt only because the float64 patches are imported from
scripts/modelopt_oracle.py, which imports it). Loads the committed tiny checkpoint
(`models/tiny_qwen3_vl/checkpoint`, Qwen3VLForConditionalGeneration) with transformers,
attn_implementation "sdpa" (the default), eval mode, and runs one batch of three
image-caption pairs from data/coco:

* the batch: the first `ROWS` annotations of data/coco/captions_tiny.json, in file order,
  with distinct images that give at most `MAX_MERGED` merged image tokens each. (The first
  three annotations give 15 + 49 + 24 merged tokens = 352 patches, and every patch costs
  ~24 KB in this file, so the batch takes the smallest images instead: grids 6x6, 4x6, 6x6,
  96 patches, 24 image tokens.) Each image goes through the checkpoint's PIL image
  processor (`AutoImageProcessor(use_fast=False)` -> Qwen2VLImageProcessorPil: bicubic
  resize to multiples of 16, rescale, CLIP normalize, float32) -> `pixel_values` [P, 384],
  `image_grid_thw` [3, 3];
* row i = `<|vision_start|>` + n_i x `<|image_pad|>` + `<|vision_end|>` + the caption's
  token ids (no special tokens), n_i = t*h*w / 4, left-padded with the pad id
  (`<|endoftext|>`) to T = longest row + 3 (every row has >= 3 pads); labels = input_ids
  with the pads and the three vision tokens set to -100; mm_token_type_ids = 1 at the
  image pads. The model computes its own 3-D (M-RoPE) position ids from these.

It runs the batch twice: in float64 (the reference) and in float32 (transformers as is),
and writes stages/model/tests/fixtures/model_tiny_vl_expected.safetensors:

  pixel_values            [P, 384] float32, as the image processor returns it
  image_grid_thw          [3, 3] int64
  input_ids, attention_mask, labels, mm_token_type_ids   [3, T] int64
  position_ids            [3, 3, T] int64, model.model.get_rope_index(...) (pads get 0)
  vision.merger_out       [M, 128] image embeddings (M = P / 4, images in batch order)
  vision.deepstack0       [M, 128] deepstack merger 0 (after vision block 0), added to the
                          language model's hidden states at the image pads after layer 0
  hidden                  [3, T, 128] the language model's final norm output
  loss                    [] output.loss (mean shifted cross-entropy over labels != -100)
  grad.<module name>      dL/d(output) from loss.backward(), stored rounded to float32, for
                          every Linear and the Conv3d of model.visual except vision block 1's
                          (Conv3d: reshaped to [P, 128]), and for
                          model.language_model.layers.0.self_attn.q_proj,
                          model.language_model.layers.0.mlp.down_proj,
                          model.language_model.layers.3.self_attn.o_proj; names as
                          model.named_modules() gives them
  loss_f32                [] float32, the same batch in float32
(The run computes more — logits, lm_head's gradient, the tower's intermediate states — and
leaves them out to keep the file near 1 MB.)
All other floating tensors are float64, from the float64 run.

The float64 run is float64 throughout. transformers casts a few steps to float32 for
half-precision models; for a float64 model each is a rounding to float32, i.e. ~1e-7 noise a
float64 reference must not carry. `keep_float64()` from scripts/modelopt_oracle.py patches
them (each replacement computes the same formula in the input's dtype):
  * Qwen3VLTextRMSNorm.forward: `hidden_states.to(torch.float32)` (every input/post-attention/
    final norm and q_norm/k_norm)
  * Qwen3VLTextRotaryEmbedding.forward: inv_freq (built with dtype=torch.float) and
    `position_ids.float()`
  * Qwen3VLVisionRotaryEmbedding.forward: inv_freq (dtype=torch.float), `position_ids.float()`,
    cos/sin returned in float32
  * apply_rotary_pos_emb_vision: `q.float()`, `k.float()`, `cos/sin.float()`
  * vision_utils._interpolation_axis_taps_weights: `index.to(torch.float32)`, so the bilinear
    position-embedding weights (vision.pos_embeds) were float32
  * ForCausalLMLoss (the model's loss_function, via LOSS_MAPPING): `logits.float()`
(it also patches two ModelOpt scoring helpers, unused here; the patches are global, so the
float32 run goes first). Casts that are no-ops for a float64 model stay: `pixel_values.type(
visual.dtype)` and the patch embedding's `.to(proj.weight.dtype)` (exact float32 -> float64),
the image/deepstack embeds' `.to(inputs_embeds.dtype)`, the rotary `cos/sin.to(x.dtype)`, and
get_rope_index's integer round trip `(arange(t) * time_interval).long()`. The eager
attention's float32 softmax is not on the sdpa path. The float64 forward and backward run
under a dispatch mode (NoFloat32) that fails the script if any aten op computes a float32
tensor from floating-point inputs, so a cast that keep_float64 misses (or that a later
transformers adds) cannot slip into the fixture. Patched vs original pieces differ by
~1e-7; loss f64 vs f32 by ~4e-7.

Run from the repository root:  python3 scripts/make_vl_model_fixture.py
"""
import json
import pathlib
import struct
import sys

import torch
from PIL import Image
from safetensors.torch import save
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

ROOT = pathlib.Path(__file__).resolve().parent.parent
CKPT = ROOT / "models/tiny_qwen3_vl/checkpoint"
COCO = ROOT / "data/coco"
OUT = ROOT / "stages/model/tests/fixtures/model_tiny_vl_expected.safetensors"
ROWS = 3
MAX_MERGED = 9  # merged image tokens per image (t*h*w/4); 9 = 36 patches
MIN_PADS = 3
LM_GRADS = ["model.language_model.layers.0.self_attn.q_proj",
            "model.language_model.layers.0.mlp.down_proj",
            "model.language_model.layers.3.self_attn.o_proj",
            "lm_head"]


# ---------------------------------------------------------------- the batch

def make_batch(config):
    """pixel_values, image_grid_thw and the token tensors of ROWS image-caption pairs."""
    coco = json.loads((COCO / "captions_tiny.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    proc = AutoImageProcessor.from_pretrained(CKPT, use_fast=False)
    tok = AutoTokenizer.from_pretrained(CKPT)
    merge = config.vision_config.spatial_merge_size
    picked, pixels, grids, rows = [], [], [], []
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        if any(p["image_id"] == im["id"] for p in picked):
            continue
        with Image.open(COCO / "images" / im["file_name"]) as img:
            enc = proc(images=img, return_tensors="pt")  # converts to RGB itself
        grid = enc["image_grid_thw"][0]
        n = int(grid.prod()) // (merge * merge)
        if n > MAX_MERGED:
            continue
        ids = tok(ann["caption"], add_special_tokens=False)["input_ids"]
        picked.append({"annotation_id": ann["id"], "image_id": ann["image_id"],
                       "file_name": im["file_name"], "caption": ann["caption"]})
        pixels.append(enc["pixel_values"])
        grids.append(grid)
        rows.append([config.vision_start_token_id] + [config.image_token_id] * n
                    + [config.vision_end_token_id] + ids)
        if len(rows) == ROWS:
            break
    assert len(rows) == ROWS, "not enough small images"

    pad_id = config.text_config.pad_token_id
    T = max(len(r) for r in rows) + MIN_PADS
    input_ids = torch.full((ROWS, T), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((ROWS, T), dtype=torch.int64)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r):] = torch.tensor(r)
        attention_mask[i, T - len(r):] = 1
    vision_tokens = torch.tensor([config.vision_start_token_id, config.image_token_id,
                                  config.vision_end_token_id])
    labels = input_ids.clone()
    labels[(attention_mask == 0) | torch.isin(input_ids, vision_tokens)] = -100
    mm_token_type_ids = (input_ids == config.image_token_id).to(torch.int64)
    batch = {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.stack(grids).to(torch.int64),
             "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "mm_token_type_ids": mm_token_type_ids}
    return batch, picked


# ---------------------------------------------------------------- float64 check

class NoFloat32(TorchDispatchMode):
    """Records every aten op that computes a float32 tensor from floating-point tensors (a
    float32 value used in arithmetic). Not flagged: an exact integer -> float32 -> integer
    round trip (get_rope_index's `(arange(t) * time_interval).long()`) and the float32
    pixel_values' cast to float64."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if any(o.dtype == torch.float32 for o in outs) and any(a.is_floating_point() for a in ins):
            self.seen.add(str(func))
        return out


def save_sorted(tensors, path, metadata):
    """safetensors' save, with the metadata keys in sorted order: safetensors writes them in
    hash-map order, which changes from run to run, so the bytes would too."""
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(data[:8] + text.ljust(n) + data[8 + n:])


# ---------------------------------------------------------------- runs

def load(dtype):
    model = Qwen3VLForConditionalGeneration.from_pretrained(CKPT, dtype=dtype).eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def run_f32(batch):
    model = load(torch.float32)
    with torch.no_grad():
        out = model(**batch)
    return out.loss.detach(), out.logits.detach()


def run_f64(batch):
    model = load(torch.float64)
    visual = model.model.visual
    acts, grads, handles = {}, {}, []

    def save_out(key):
        def hook(_m, _inp, out):
            acts[key] = out.detach().clone()
        return hook

    def save_grad(name, shape=None):
        def hook(_m, _inp, out):
            assert name not in grads, f"{name} called twice"
            grads[name] = None

            def on_grad(g):
                grads[name] = (g if shape is None else g.reshape(shape)).detach().clone()
            out.register_hook(on_grad)
        return hook

    def block0_in(_m, args, kwargs):
        acts["block0_in"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def lm_in(_m, _args, kwargs):
        acts["lm_position_ids"] = kwargs["position_ids"].clone()

    grad_names = []
    for name, mod in model.named_modules():
        if (name.startswith("model.visual.") and isinstance(mod, (torch.nn.Linear, torch.nn.Conv3d))) \
                or name in LM_GRADS:
            shape = (-1, mod.out_channels) if isinstance(mod, torch.nn.Conv3d) else None
            handles.append(mod.register_forward_hook(save_grad(name, shape)))
            grad_names.append(name)
    for key, mod in [("patch_embed", visual.patch_embed), ("block0_out", visual.blocks[0]),
                     ("block1_out", visual.blocks[1]), ("merger_out", visual.merger),
                     ("deepstack0", visual.deepstack_merger_list[0]),
                     ("hidden", model.model.language_model.norm)]:
        handles.append(mod.register_forward_hook(save_out(key)))
    handles.append(visual.blocks[0].register_forward_pre_hook(block0_in, with_kwargs=True))
    handles.append(model.model.language_model.register_forward_pre_hook(lm_in, with_kwargs=True))

    guard = NoFloat32()
    with guard:
        out = model(**batch)
        out.loss.backward()
    for h in handles:
        h.remove()
    assert not guard.seen, f"float32 ops in the float64 run: {sorted(guard.seen)}"
    assert all(grads[n] is not None for n in grad_names), [n for n in grad_names if grads[n] is None]

    # The interpolated position embedding, by the expression Qwen3VLVisionModel.forward uses
    # (with the float64 weights); it must be exactly what was added to the patch embedding.
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qv
    idx, w = qv.get_vision_interpolation_indices_and_weights(
        batch["image_grid_thw"], num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
    with torch.no_grad():
        pos_embeds = (visual.pos_embed(idx) * w[:, :, None]).sum(1)
    assert w.dtype == torch.float64
    assert torch.equal(acts["patch_embed"] + pos_embeds, acts["block0_in"])

    position_ids, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"])
    assert torch.equal(position_ids, acts["lm_position_ids"])  # what the forward used
    tensors = {
        "position_ids": position_ids,
        "vision.patch_embed": acts["patch_embed"],
        "vision.pos_embeds": pos_embeds,
        "vision.block0_out": acts["block0_out"],
        "vision.block1_out": acts["block1_out"],
        "vision.merger_out": acts["merger_out"],
        "vision.deepstack0": acts["deepstack0"],
        "hidden": acts["hidden"],
        "logits": out.logits.detach(),
        "loss": out.loss.detach().reshape(()),
        **{f"grad.{n}": grads[n] for n in grad_names},
    }
    return tensors


def main():
    torch.manual_seed(0)
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.dont_write_bytecode = True  # no scripts/__pycache__
    from modelopt_oracle import keep_float64

    config = AutoConfig.from_pretrained(CKPT)
    batch, picked = make_batch(config)
    loss32, logits32 = run_f32(batch)  # before the patches: they are global
    keep_float64()  # text + vision + loss, see the docstring
    f64 = run_f64(batch)

    tensors = {**batch, **f64, "loss_f32": loss32.reshape(()), "logits_f32": logits32}
    # Kept small (about 1 MB): the gradients are stored rounded to float32 (a test of the
    # backward's formulas needs ~1e-7, not 1e-15), block 1's gradients are left out (block 0
    # runs the same code and also feeds DeepStack), and the [B, T, V] tensors are left out
    # (`hidden` and the loss stand for them).
    for k in ["logits", "logits_f32", "grad.lm_head", "vision.patch_embed", "vision.pos_embeds",
              "vision.block0_out", "vision.block1_out"]:
        del tensors[k]
    for k in [k for k in tensors if k.startswith("grad.model.visual.blocks.1.")]:
        del tensors[k]
    for k in [k for k in tensors if k.startswith("grad.")]:
        tensors[k] = tensors[k].float()
    f32 = {"pixel_values", "loss_f32"} | {k for k in tensors if k.startswith("grad.")}
    ints = {"image_grid_thw", "input_ids", "attention_mask", "labels", "mm_token_type_ids", "position_ids"}
    for k, v in tensors.items():
        assert v.dtype == (torch.float32 if k in f32 else torch.int64 if k in ints else torch.float64), k
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_sorted(tensors, OUT, metadata={"generator": "scripts/make_vl_model_fixture.py",
                                        "transformers": __import__("transformers").__version__,
                                        "torch": torch.__version__,
                                        "pad_token_id": str(config.text_config.pad_token_id),
                                        "samples": json.dumps(picked)})

    for k, v in tensors.items():
        line = f"  {k:58s} {str(list(v.shape)):16s} {str(v.dtype).replace('torch.', '')}"
        if k.startswith("grad."):
            line += f"  max|g| {v.abs().max().item():.3e}"
        print(line)
    for p in picked:
        print(f"  sample {p['annotation_id']} image {p['file_name']}: {p['caption']}")
    l64, l32 = tensors["loss"].item(), tensors["loss_f32"].item()
    print(f"loss f64 {l64:.15f}  f32 {l32:.9f}  |diff| {abs(l64 - l32):.3e}; "
          f"max|logits f64 - f32| {(f64['logits'] - logits32.double()).abs().max().item():.3e}")
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
