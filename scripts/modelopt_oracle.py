#!/usr/bin/env python3
"""The ModelOpt oracle: reference `auto_quantize` numbers qpipe's `score` stage must equal.

Optional to run; its output is committed as `stages/tests/fixtures/oracle_modelopt.json`
and read by `stages/tests/score_oracle.rs` (which never runs Python).

    pip install nvidia-modelopt torch transformers safetensors   # CPU is enough
    python3 scripts/modelopt_oracle.py                            # rewrites the fixture

What it does, the way the seed's runner does it:

* loads the committed tiny checkpoint (`models/tiny_qwen3_vl/checkpoint`) in float32 with
  transformers and extracts the language model (`model.model.language_model`); `lm_head`
  (tied to the embeddings) stays *outside* the quantized module, so it is never scored;
* tokenizes the first `--samples` lines of `data/calibration/captions.txt` with the
  checkpoint's tokenizer: left padding to `--max-length`, truncation; labels = input_ids;
* `forward_step(lm, batch)` = `lm_head(lm(input_ids, attention_mask).last_hidden_state)`
  (position ids 0..T-1), `loss_func` = mean cross-entropy of the shifted logits with
  `ignore_index` = the pad id;
* runs `mtq.auto_quantize` with one format (plus ModelOpt's implicit NONE) per case,
  `num_calib_steps` = all batches, `num_score_steps` = min(score_size / batch_size,
  batches), and records per recipe `formats`, `scores`, `costs`, `module_names`, `best`,
  plus the calibrated input amax of every linear (for debugging parity) and the re-solved
  `best` at a few other effective-bits targets (ModelOpt's own solver).

The token ids used are stored in the JSON so the Rust side feeds identical inputs.

Why 64 captions × 64 tokens (8 batches) and not 16 × 32: with a *static* input
quantizer (INT8_DEFAULT_CFG, FP8_DEFAULT_CFG) an activation that sits on a rounding
boundary flips to the neighbouring level under 1e-6-relative noise (torch vs candle
summation order), and a gradient score is dominated by few high-gradient tokens. On 512
tokens that moved single recipes by up to 1.5e-3 (ModelOpt's own f32 run differed from
its f64 run by 8.7e-3); on 4096 tokens the flips average out (f32 vs f64: 3.8e-4).
`--dtype f64` writes `oracle_modelopt_f64.json`, the same run in float64: the reference
qpipe's `autoquant.dtype=f64` must equal to 1e-6 (and the Rust test prints how far the f32
reference is from it). transformers and ModelOpt are written for half-precision models and
cast a few steps to float32 — for a float64 model those casts are roundings, and they are
exactly the noise this mode removes. So in f64 mode the script keeps float64 in the five
places that would cast down (see `keep_float64`): the text RMSNorm, the rotary tables,
the loss, the gradient score `(dL/dY · (Y_q − Y))²` and the kl_div log-softmax. The quantizers are left
as ModelOpt computes them (`_tensor_quant` / `_fp8_eager` quantize `inputs.float()` in
float32 and cast back): that float32 arithmetic is the format's definition, and qpipe's
f64 mode does the same. (`keep_float64` also covers the vision tower and transformers' loss,
for the whole-model oracle `scripts/modelopt_oracle_vl.py`, which shares this file's helpers.)
`--checkpoint/--captions/--out` let the benchmark reuse this on a synthetic checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (case name, format, method, effective_bits)
CASES = [
    ("int8_default_gradient", "INT8_DEFAULT_CFG", "gradient", 8.0),
    ("int8_weight_only_gradient", "INT8_WEIGHT_ONLY_CFG", "gradient", 8.0),
    ("fp8_default_gradient", "FP8_DEFAULT_CFG", "gradient", 8.0),
    ("fp8_weight_only_gradient", "FP8_WEIGHT_ONLY", "gradient", 8.0),
    ("int4_blockwise_gradient", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "gradient", 6.0),
    ("int8_weight_only_kl_div", "INT8_WEIGHT_ONLY_CFG", "kl_div", 8.0),
    ("fp8_weight_only_kl_div", "FP8_WEIGHT_ONLY", "kl_div", 8.0),
]
RESOLVE_BITS = [6.0, 10.0, 12.0]


def fp8_weight_only_cfg(mtq):
    """FP8 weights per tensor, inputs off: not a ModelOpt built-in, so it prints as CUSTOM_0."""
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*input_quantizer":
            entry.pop("cfg", None)
            entry["enable"] = False
    return cfg


def keep_float64():
    """For a float64 run: undo the float32 casts transformers and ModelOpt make for
    half-precision models (each a rounding for a float64 model). Every replacement computes
    the same formula as the original, in the input's dtype.

    Language model: the text RMSNorm, the (M)RoPE tables, the gradient score, the kl_div
    log-softmax. Whole VLM (`modelopt_oracle_vl.py`), in addition: the vision tower's 2D
    rotary tables (computed in float32) and their application to q/k (done in float32), the
    position-grid interpolation weights (float32), and transformers' causal-LM loss (which
    upcasts the logits with `.float()`). The vision LayerNorms, GELUs, the Conv3d and the
    attention keep the input's dtype already."""
    import torch
    import modelopt.torch.quantization.algorithms as algo
    import transformers.vision_utils as vu
    from transformers.loss import loss_utils
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qv

    def rms_norm_forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def score(grad_output, output_diff):
        x = grad_output.double() * output_diff.double()
        return x.clamp(-1e10, 1e10).square().sum()

    def log_prob(logits, lm_head=None):
        return torch.log_softmax(logits.double(), dim=-1)

    def rotary_forward(self, x, position_ids):
        # transformers' formula with float64 in place of float32
        position_ids = position_ids.expand(3, -1, -1)
        dim = 2 * self.inv_freq.shape[0]
        base = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim))
        freqs = position_ids[..., None].double() * inv_freq
        cos = self.recomposition_frequencies(freqs.cos() * self.attention_scaling)
        sin = self.recomposition_frequencies(freqs.sin() * self.attention_scaling)
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def vision_rotary_forward(self, x, position_ids):
        # axial 2D rope: the same inverse frequencies for rows and columns, float64
        dim = 2 * self.inv_freq.shape[0]
        base = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim))
        freqs = position_ids[..., None].double() * inv_freq
        cos = self.recomposition_frequencies(freqs.cos() * self.attention_scaling)
        sin = self.recomposition_frequencies(freqs.sin() * self.attention_scaling)
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def apply_rotary_vision(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        return (q * cos) + (qv.rotate_half(q) * sin), (k * cos) + (qv.rotate_half(k) * sin)

    def interpolation_taps_weights(index, size, side, mode, align_corners, padding="border"):
        # bilinear taps as transformers computes them, the weights in float64
        if mode != "bilinear" or padding != "border":
            raise NotImplementedError(f"keep_float64: interpolation {mode}/{padding}")
        index = index.to(torch.float64)
        if align_corners:
            src = index * (side - 1) / torch.clamp(size - 1, min=1)
        else:
            src = (index + 0.5) * side / size - 0.5
        floor = torch.floor(src)
        offsets = torch.arange(0, 2, device=index.device)
        taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
        weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
        return taps, weights

    def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                       shift_labels=None, **kwargs):
        # ForCausalLMLoss without the `.float()`: mean cross-entropy over the shifted labels
        if num_items_in_batch is not None or shift_labels is not None:
            raise NotImplementedError("keep_float64: causal-LM loss with num_items_in_batch/shift_labels")
        shift = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), shift.reshape(-1).to(logits.device),
                                                 ignore_index=ignore_index)

    qv.Qwen3VLTextRMSNorm.forward = rms_norm_forward
    qv.Qwen3VLTextRotaryEmbedding.forward = rotary_forward
    qv.Qwen3VLVisionRotaryEmbedding.forward = vision_rotary_forward
    qv.apply_rotary_pos_emb_vision = apply_rotary_vision  # looked up as a module global
    vu._interpolation_axis_taps_weights = interpolation_taps_weights  # likewise
    for key, fn in list(loss_utils.LOSS_MAPPING.items()):  # `PreTrainedModel.loss_function` reads it;
        if fn is loss_utils.ForCausalLMLoss:  # Qwen3VLForConditionalGeneration's is "ForConditionalGeneration"
            loss_utils.LOSS_MAPPING[key] = causal_lm_loss
    algo._get_auto_quantize_score = score  # `_add_auto_quantize_score` looks it up here
    algo._get_log_prob = log_prob


def load_lm(checkpoint: Path):
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()
    lm = model.model.language_model
    lm_head = model.lm_head
    for p in lm_head.parameters():
        p.requires_grad_(False)
    return model, lm, lm_head


def tokenize(checkpoint: Path, captions: Path, samples: int, max_length: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    tok.padding_side = "left"
    lines = [ln.strip() for ln in captions.read_text().splitlines() if ln.strip()][:samples]
    enc = tok(lines, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], tok.pad_token_id


def make_batches(input_ids, attention_mask, batch_size):
    out = []
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s : s + batch_size]
        out.append({"input_ids": ids, "attention_mask": attention_mask[s : s + batch_size], "labels": ids.clone()})
    return out


def format_cfg(fmt_name: str):
    """A case's format as `auto_quantize` takes it: the built-in's name, or the custom config."""
    import modelopt.torch.quantization as mtq

    return fp8_weight_only_cfg(mtq) if fmt_name == "FP8_WEIGHT_ONLY" else fmt_name


def auto_quantize(model, batches, fmt_cfg, method, effective_bits, score_steps, forward_step, loss_func=None):
    """One `mtq.auto_quantize` run: the format(s) (plus ModelOpt's implicit NONE), calibration
    on every batch, `score_steps` scoring batches. Returns (model, state, seconds)."""
    import modelopt.torch.quantization as mtq

    kwargs = dict(
        constraints={"effective_bits": effective_bits},
        quantization_formats=fmt_cfg if isinstance(fmt_cfg, list) else [fmt_cfg],
        data_loader=batches,
        forward_step=forward_step,
        num_calib_steps=len(batches),
        num_score_steps=score_steps,
        verbose=False,
        method=method,
    )
    if method == "gradient":
        kwargs["loss_func"] = loss_func
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, state = mtq.auto_quantize(model, **kwargs)
    return model, state, time.perf_counter() - t0


def run_case(lm, lm_head, batches, pad_id, fmt_cfg, method, effective_bits, score_steps):
    import torch
    import torch.nn.functional as F

    # The seed's runner takes the loss in float32; a float64 run keeps float64.
    loss_dtype = torch.float64 if next(lm.parameters()).dtype == torch.float64 else torch.float32

    def forward_step(model, batch):
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return lm_head(hidden)

    def loss_func(logits, batch):
        labels = batch["labels"]
        v = logits.shape[-1]
        return F.cross_entropy(
            logits[:, :-1, :].reshape(-1, v).to(loss_dtype), labels[:, 1:].reshape(-1), ignore_index=pad_id
        )

    return auto_quantize(lm, batches, fmt_cfg, method, effective_bits, score_steps, forward_step, loss_func)


def versions() -> dict:
    import modelopt
    import torch
    import transformers

    return {"modelopt": modelopt.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def rel_path(path: Path) -> str:
    return os.path.relpath(path, ROOT) if path.resolve().is_relative_to(ROOT) else str(path)


def state_to_json(state, model_names):
    from modelopt.torch.quantization.algorithms import _resolve_best_recipe

    cands = {}
    for name, st in state["candidate_stats"].items():
        cands[name] = {
            "formats": [str(f) for f in st["formats"]],
            "scores": [float(s) for s in st["scores"]],
            "costs": [float(c) for c in st["costs"]],
            "module_names": list(st["module_names"]),
        }
    best = state["best"]
    out = {
        "candidate_stats": cands,
        "best": {
            "recipe": {k: str(v) for k, v in best["recipe"].items()},
            "constraints": {k: float(v) for k, v in best["constraints"].items()},
            "score": float(best["score"]),
            "is_satisfied": bool(best["is_satisfied"]),
        },
    }
    # Calibrated input amax per linear (first non-NONE recipe), for layer-by-layer debugging.
    amax = {}
    for _recipe, qs in state["quantizer_states"].items():
        for key, val in qs["state_dict"].items():
            if key.endswith(".input_quantizer") and isinstance(val, dict) and "_amax" in val:
                amax[key[: -len(".input_quantizer")]] = float(val["_amax"].float().max())
    out["input_amax"] = amax
    resolved = {}
    for bits in RESOLVE_BITS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = _resolve_best_recipe(state, {"effective_bits": bits})
        resolved[str(bits)] = {k: str(v) for k, v in rec.items()}
    out["resolved_best"] = resolved
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models/tiny_qwen3_vl/checkpoint")
    ap.add_argument("--captions", type=Path, default=ROOT / "data/calibration/captions.txt")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--score-size", type=int, default=128)
    ap.add_argument("--cases", default="all", help="comma-separated case names, or all")
    ap.add_argument("--dtype", choices=["f32", "f64"], default="f32",
                    help="model dtype; f64 gives the rounding-noise-free reference (fixture oracle_modelopt_f64.json)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.out is None:
        suffix = "" if args.dtype == "f32" else "_f64"
        args.out = ROOT / f"stages/tests/fixtures/oracle_modelopt{suffix}.json"

    import torch

    torch.manual_seed(0)
    import modelopt.torch.quantization  # noqa: F401  (registers ModelOpt's plugins before any model loads)

    input_ids, attention_mask, pad_id = tokenize(args.checkpoint, args.captions, args.samples, args.max_length)
    batches = make_batches(input_ids, attention_mask, args.batch_size)
    score_steps = min(args.score_size // args.batch_size, len(batches))

    if args.dtype == "f64":
        keep_float64()
    wanted = None if args.cases == "all" else set(args.cases.split(","))
    results = {}
    for case, fmt_name, method, bits in CASES:
        if wanted is not None and case not in wanted:
            continue
        _, lm, lm_head = load_lm(args.checkpoint)  # fresh model per case: auto_quantize converts in place
        if args.dtype == "f64":
            lm, lm_head = lm.double(), lm_head.double()
        _, state, secs = run_case(lm, lm_head, batches, pad_id, format_cfg(fmt_name), method, bits, score_steps)
        res = state_to_json(state, None)
        res.update({"format": fmt_name, "method": method, "effective_bits": bits, "seconds": secs})
        results[case] = res
        print(f"{case}: {len(res['candidate_stats'])} recipes, best score {res['best']['score']:.6g}, {secs:.1f}s",
              file=sys.stderr)

    doc = {
        "format": "qpipe.oracle_modelopt/1",
        "generator": "scripts/modelopt_oracle.py",
        "versions": versions(),
        "checkpoint": rel_path(args.checkpoint),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "score_size": args.score_size,
        "num_calib_steps": len(batches),
        "num_score_steps": score_steps,
        "max_length": args.max_length,
        "pad_token_id": int(pad_id),
        "input_ids": input_ids.tolist(),
        "attention_mask": attention_mask.tolist(),
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
