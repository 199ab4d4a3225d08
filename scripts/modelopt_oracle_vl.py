#!/usr/bin/env python3
"""The whole-model ModelOpt oracle: reference `auto_quantize` numbers for the tiny Qwen3-VL
with images — vision tower, language model and lm_head — that qpipe's `score` stage must equal.

Optional to run; its outputs are committed as `stages/tests/fixtures/oracle_modelopt_vl.json`
and (`--dtype f64`) `oracle_modelopt_vl_f64.json`. Shares its helpers (cases, the float64
patches, the state dump) with the language-model oracle `scripts/modelopt_oracle.py`.

    pip install nvidia-modelopt torch transformers safetensors pillow   # CPU is enough
    python3 scripts/modelopt_oracle_vl.py                # rewrites oracle_modelopt_vl.json
    python3 scripts/modelopt_oracle_vl.py --dtype f64    # rewrites oracle_modelopt_vl_f64.json

What it does:

* loads the committed tiny checkpoint as a whole `Qwen3VLForConditionalGeneration` (float32,
  or float64 with `--dtype f64`) and hands the whole model to `mtq.auto_quantize`: every
  Linear, the Conv3d `model.visual.patch_embed.proj` and `lm_head` are quantizable
  (coverage "full"). Group names are ModelOpt's, e.g. `model.visual.patch_embed.proj.quant_recipe`,
  `model.visual.blocks.0.attn.qkv.quant_recipe`, `model.visual.merger.linear_fc1.quant_recipe`,
  `model.visual.deepstack_merger_list.0.linear_fc2.quant_recipe`,
  `model.language_model.layers.0.self_attn.q_proj.quant_recipe` (q/k/v one group; gate/up one
  group) and `lm_head.quant_recipe`;
* samples: the first `--samples` annotations of `data/coco/captions_tiny.json`, in file order.
  Per sample, the image goes through the checkpoint's image processor (its
  `preprocessor_config.json`, the slow PIL backend: `Qwen2VLImageProcessorPil` in transformers
  5.25: PIL bicubic resize of the uint8 image to `smart_resize`'s size, ×1/255, CLIP mean/std,
  float32) → `pixel_values` [t·h·w, 3·2·8·8] and `image_grid_thw` (t, h, w). The token ids are
  built directly: `<|vision_start|>` + n × `<|image_pad|>` + `<|vision_end|>` + the caption's
  tokenizer ids (n = t·h·w / merge², no chat template, no BOS), truncated on the right to
  `--max-length` (an error if that would cut the vision span) and left-padded with the pad id.
  labels = the ids with the pads and the three vision tokens set to -100;
  `mm_token_type_ids` = 1 at `<|image_pad|>` (transformers 5 needs it for the MRoPE positions,
  which it then computes from the attention mask: text from 0 at the first non-pad token);
* batches of `--batch-size` samples in order: input_ids, attention_mask, labels,
  mm_token_type_ids, pixel_values (the batch's images concatenated), image_grid_thw;
* `forward_step(model, batch)` = `model(**batch)`; gradient: `loss_func` = `output.loss`
  (transformers' causal-LM loss: mean cross-entropy of the shifted labels over the label
  tokens); kl_div: ModelOpt wants logits from `forward_step`, so there it returns
  `model(**batch).logits` (the same forward; KL summed over every position, pads included);
* cases (from `modelopt_oracle.CASES`): gradient with INT8_DEFAULT_CFG and FP8_DEFAULT_CFG,
  kl_div with INT8_WEIGHT_ONLY_CFG; `num_calib_steps` = all batches, `num_score_steps` =
  min(score_size / batch_size, batches);
* `--dtype f64`: `keep_float64` (see `modelopt_oracle.py`) keeps float64 where transformers or
  ModelOpt would cast down: text RMSNorm and MRoPE tables, the vision rotary tables and their
  application, the position-grid interpolation weights, the causal-LM loss, the gradient score
  and the kl_div log-softmax. The pixel values stay the processor's float32 numbers (cast
  exactly); the quantizers stay ModelOpt's float32 arithmetic.

The JSON has the LM oracle's schema (`candidate_stats`, `best`, `input_amax`, `resolved_best`
per case; top-level `input_ids`/`attention_mask`) plus `coco`, `image_processor` and
`samples`: per sample the image (path relative to data/coco), annotation id, caption,
image_grid_thw, input_ids, attention_mask, labels and a pixel_values checksum: shape, sum,
sum of squares, weighted_sum = sum over the row-major flat index k of ((k mod 61) + 1) * x_k
(order-sensitive: catches a wrong patch order), all accumulated in float64 over the float32
values, and the first 8 values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modelopt_oracle import (  # noqa: E402
    CASES, ROOT, auto_quantize, format_cfg, keep_float64, rel_path, state_to_json, versions)

VL_CASES = ["int8_default_gradient", "fp8_default_gradient", "int8_weight_only_kl_div"]
IGNORE = -100


def load_vlm(checkpoint: Path, dtype: str):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(
        str(checkpoint), dtype=torch.float64 if dtype == "f64" else torch.float32)
    return model.eval()


def make_samples(checkpoint: Path, coco_json: Path, samples: int, max_length: int):
    """The first `samples` annotations as model inputs; returns (rows, pad_id, processor name)."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(str(checkpoint))
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    proc = AutoImageProcessor.from_pretrained(str(checkpoint), backend="pil")
    merge = proc.merge_size
    vs, ve, img = config.vision_start_token_id, config.vision_end_token_id, config.image_token_id
    pad_id = tok.pad_token_id
    coco = json.loads(coco_json.read_text(encoding="utf-8"))
    images = {im["id"]: im for im in coco["images"]}
    image_dir = coco_json.parent / "images"
    rows = []
    for ann in coco["annotations"][:samples]:
        im = images[ann["image_id"]]
        path = image_dir / im["file_name"]
        out = proc(images=[Image.open(path)], return_tensors="np")
        pixels, grid = out["pixel_values"], out["image_grid_thw"][0].tolist()
        n = grid[0] * grid[1] * grid[2] // merge**2
        caption_ids = tok(ann["caption"])["input_ids"]
        assert caption_ids == tok(ann["caption"], add_special_tokens=False)["input_ids"]
        ids = [vs] + [img] * n + [ve] + caption_ids
        if n + 2 > max_length:
            raise SystemExit(f"annotation {ann['id']}: {n} image tokens do not fit --max-length {max_length}")
        ids = ids[:max_length]
        pad = max_length - len(ids)
        mask = [0] * pad + [1] * len(ids)
        ids = [pad_id] * pad + ids
        labels = [IGNORE if m == 0 or t in (vs, ve, img) else t for t, m in zip(ids, mask)]
        p64 = pixels.astype(np.float64).reshape(-1)
        rows.append({
            "image": path.relative_to(coco_json.parent).as_posix(),
            "annotation_id": ann["id"],
            "image_id": ann["image_id"],
            "caption": ann["caption"],
            "image_grid_thw": grid,
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": {"shape": list(pixels.shape), "sum": float(p64.sum()),
                             "sum_sq": float((p64 * p64).sum()),
                             "weighted_sum": float((p64 * (np.arange(p64.size) % 61 + 1)).sum()),
                             "first8": [float(v) for v in pixels.reshape(-1)[:8]]},
            "_pixels": torch.from_numpy(np.ascontiguousarray(pixels)),
        })
    return rows, pad_id, type(proc).__name__, config.image_token_id


def make_batches(rows, batch_size: int, image_token_id: int):
    import torch

    batches = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        ids = torch.tensor([r["input_ids"] for r in chunk])
        batches.append({
            "input_ids": ids,
            "attention_mask": torch.tensor([r["attention_mask"] for r in chunk]),
            "labels": torch.tensor([r["labels"] for r in chunk]),
            "mm_token_type_ids": (ids == image_token_id).to(torch.int32),
            "pixel_values": torch.cat([r["_pixels"] for r in chunk]),
            "image_grid_thw": torch.tensor([r["image_grid_thw"] for r in chunk]),
        })
    return batches


def run_case(model, batches, fmt_name, method, bits, score_steps):
    if method == "kl_div":
        def forward_step(m, batch):
            return m(**batch).logits
    else:
        def forward_step(m, batch):
            return m(**batch)

    def loss_func(output, batch):
        return output.loss

    return auto_quantize(model, batches, format_cfg(fmt_name), method, bits, score_steps, forward_step, loss_func)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models/tiny_qwen3_vl/checkpoint")
    ap.add_argument("--coco", type=Path, default=ROOT / "data/coco/captions_tiny.json")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--score-size", type=int, default=128)
    ap.add_argument("--cases", default="all", help=f"comma-separated case names, or all ({','.join(VL_CASES)})")
    ap.add_argument("--dtype", choices=["f32", "f64"], default="f32")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.out is None:
        suffix = "" if args.dtype == "f32" else "_f64"
        args.out = ROOT / f"stages/tests/fixtures/oracle_modelopt_vl{suffix}.json"

    import torch

    torch.manual_seed(0)
    import modelopt.torch.quantization  # noqa: F401  (registers ModelOpt's plugins before any model loads)

    rows, pad_id, proc_name, image_token_id = make_samples(args.checkpoint, args.coco, args.samples,
                                                           args.max_length)
    batches = make_batches(rows, args.batch_size, image_token_id)
    score_steps = min(args.score_size // args.batch_size, len(batches))
    if args.dtype == "f64":
        keep_float64()
    wanted = VL_CASES if args.cases == "all" else args.cases.split(",")
    results = {}
    for case, fmt_name, method, bits in CASES:
        if case not in wanted:
            continue
        model = load_vlm(args.checkpoint, args.dtype)  # fresh model per case: auto_quantize converts in place
        _, state, secs = run_case(model, batches, fmt_name, method, bits, score_steps)
        res = state_to_json(state, None)
        res.update({"format": fmt_name, "method": method, "effective_bits": bits, "seconds": secs})
        results[case] = res
        print(f"{case}: {len(res['candidate_stats'])} recipes, best score {res['best']['score']:.6g}, {secs:.1f}s",
              file=sys.stderr)

    samples = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    doc = {
        "format": "qpipe.oracle_modelopt_vl/1",
        "generator": "scripts/modelopt_oracle_vl.py",
        "versions": versions(),
        "checkpoint": rel_path(args.checkpoint),
        "coco": rel_path(args.coco),
        "image_processor": proc_name,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "score_size": args.score_size,
        "num_calib_steps": len(batches),
        "num_score_steps": score_steps,
        "max_length": args.max_length,
        "pad_token_id": int(pad_id),
        "input_ids": [r["input_ids"] for r in rows],
        "attention_mask": [r["attention_mask"] for r in rows],
        "samples": samples,
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
