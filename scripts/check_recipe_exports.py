#!/usr/bin/env python3
"""Checks qpipe's recipe exports against the real libraries (optional; never run by cargo).

    python3 scripts/check_recipe_exports.py DIR [--checkpoint models/tiny_qwen3_vl/checkpoint]

DIR holds the exports of `stages/src/recipe/export.rs`, in one of two layouts:

* `modelopt_config.json` + `llm_compressor_recipe.yaml`, expectations (optional) in
  `export_expectations.json` (or `recipe.json`) with `"format": "qpipe.recipe_export/1"`
  (`export::recipe_expectations`): every quantizer's attributes are checked;
* a `recipe` stage output folder: `recipe.json` (`"format": "qpipe.recipe/1"`) and, per
  budget, the files named in its `exports`: which modules are quantized is checked (a
  group's members are inferred the way Qwen3 recipes group them: q_proj = q/k/v, gate_proj =
  gate/up), num_bits are printed.

Without expectations it only prints the tables.

(a) ModelOpt: loads the checkpoint with transformers (float32), converts the JSON config
    for ModelOpt (`block_sizes` keys "-1" -> -1, `num_bits` lists -> tuples), runs
    `mtq.quantize(model, cfg, forward_loop)` with a two-sequence forward loop and checks
    every Linear's `weight_quantizer` / `input_quantizer` (enabled, num_bits, axis,
    block_sizes, type) and that every other quantizer is off.
(b) llm-compressor: parses the recipe with `Recipe.create_instance`, checks that each
    target names exactly one module, attaches the config groups to a fresh model with the
    modifier's `initialize_quantization` (no calibration) and checks every Linear's
    `quantization_scheme`.

Prints `SKIP` and exits 0 for whatever package is missing; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LM_PREFIX = "model.language_model."

FAILURES: list[str] = []


def fail(msg: str) -> None:
    FAILURES.append(msg)
    print(f"FAIL {msg}")


# ----------------------------------------------------------------------------------------
# Inputs and expectations
# ----------------------------------------------------------------------------------------


def group_members(group: str) -> list[str]:
    """A Qwen3 recipe group's modules: q_proj = q/k/v, gate_proj = gate/up."""
    head, _, leaf = group.rpartition(".")
    if leaf == "q_proj":
        return [f"{head}.{p}_proj" for p in ("q", "k", "v")]
    if leaf == "gate_proj":
        return [f"{head}.{p}_proj" for p in ("gate", "up")]
    return [group]


def weight_only(format_name: str) -> bool:
    return "WEIGHT_ONLY" in format_name or format_name == "W4A16_NVFP4_CFG"


def cases(directory: Path) -> list[dict]:
    """(name, modelopt file, llm-compressor file, per-module expectations or None)."""
    out = []
    simple = directory / "modelopt_config.json", directory / "llm_compressor_recipe.yaml"
    if simple[0].exists() or simple[1].exists():
        expect = None
        for name in ("export_expectations.json", "recipe.json"):
            p = directory / name
            if p.exists():
                doc = json.loads(p.read_text())
                if doc.get("format") == "qpipe.recipe_export/1":
                    expect = {"kind": "full", "modules": per_module_full(doc)}
                    break
        out.append({"name": directory.name, "modelopt": simple[0], "lc": simple[1], "expect": expect})
        return out
    recipe = directory / "recipe.json"
    if recipe.exists():
        doc = json.loads(recipe.read_text())
        if doc.get("format") == "qpipe.recipe/1":
            formats = {p["name"]: p["format"] for p in doc.get("pairs", [])}
            for b in doc.get("budgets", []):
                unsupported = {m for u in b.get("llm_compressor_unsupported", []) for m in u["modules"]}
                modules = {}
                for group, pair in b["layers"].items():
                    group = group.removesuffix(".quant_recipe")
                    chosen = pair != "NONE"
                    fmt = formats.get(pair, "")
                    for m in group_members(group):
                        modules[m] = {
                            "pair": pair,
                            "format": fmt,
                            "modelopt": {
                                "weight": {"enable": chosen},
                                "input": {"enable": chosen and not weight_only(fmt)},
                            },
                            "lc_quantized": chosen and m not in unsupported,
                        }
                out.append(
                    {
                        "name": f"{directory.name} @ {b['effective_bits']} bits",
                        "modelopt": directory / b["exports"]["modelopt"],
                        "lc": directory / b["exports"]["llm_compressor"],
                        "expect": {"kind": "enable", "modules": modules},
                    }
                )
            return out
    for mo in sorted(directory.glob("modelopt_*.json")):
        lc = directory / mo.name.replace("modelopt_", "llm_compressor_").replace(".json", ".yaml")
        out.append({"name": mo.stem, "modelopt": mo, "lc": lc, "expect": None})
    return out


def per_module_full(doc: dict) -> dict:
    modules = {}
    for g in doc["groups"]:
        for m in g["modules"]:
            modules[m] = {
                "pair": g["pair"] or "NONE",
                "format": g["format"] or "",
                "modelopt": g["modelopt"],
                "lc": g["llm_compressor"],
            }
    return modules


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------


def load_model(checkpoint: Path, device: str):
    import torch
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
        except (ValueError, KeyError):
            model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return model.to(device).eval()


def forward_loop_for(model, device: str):
    import torch

    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    # Avoid the first ids (special tokens) and the image/video placeholder ids at the top.
    ids = torch.randint(4, max(5, vocab - 16), (2, 16), generator=gen).to(device)

    def forward_loop(m):
        with torch.no_grad():
            m(input_ids=ids, attention_mask=torch.ones_like(ids))

    return forward_loop


def linear_names(model) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


# ----------------------------------------------------------------------------------------
# (a) ModelOpt
# ----------------------------------------------------------------------------------------


def modelopt_cfg_from_json(cfg: dict) -> dict:
    """JSON → ModelOpt: integer `block_sizes` keys, tuple `num_bits` / `scale_bits`."""

    def fix_attrs(a):
        if isinstance(a, list):
            return [fix_attrs(x) for x in a]
        if not isinstance(a, dict):
            return a
        a = dict(a)
        if isinstance(a.get("num_bits"), list):
            a["num_bits"] = tuple(a["num_bits"])
        bs = a.get("block_sizes")
        if isinstance(bs, dict):
            fixed = {}
            for k, v in bs.items():
                if isinstance(k, str) and re.fullmatch(r"-?\d+", k):
                    k = int(k)
                if k == "scale_bits" and isinstance(v, list):
                    v = tuple(v)
                fixed[k] = v
            a["block_sizes"] = fixed
        return a

    out = dict(cfg)
    out["quant_cfg"] = [
        {**e, "cfg": fix_attrs(e["cfg"])} if e.get("cfg") is not None else dict(e) for e in cfg["quant_cfg"]
    ]
    return out


def norm(v):
    """Tuples → lists, dict keys → str: comparable with the JSON expectations."""
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    if isinstance(v, dict):
        return {str(k): norm(x) for k, x in v.items()}
    return v


def quantizer_state(q) -> dict:
    if q is None:
        return {"enable": False}
    return {
        "enable": bool(q.is_enabled),
        "num_bits": norm(q.num_bits),
        "axis": norm(q.axis),
        "block_sizes": norm(q.block_sizes) if q.block_sizes else None,
        "type": "dynamic" if getattr(q, "_dynamic", False) else "static",
        "amax": getattr(q, "_amax", None) is not None,
    }


def describe(s: dict) -> str:
    if not s["enable"]:
        return "off"
    gran = f"blocks {s['block_sizes']}" if s.get("block_sizes") else f"axis {s.get('axis')}"
    return f"{s['num_bits']} {gran} {s['type']}{' amax' if s.get('amax') else ''}"


def compare_quantizer(where: str, want: dict, got: dict) -> None:
    if want.get("enable") != got["enable"]:
        fail(f"{where}: enable {got['enable']}, expected {want.get('enable')}")
        return
    if not got["enable"]:
        return
    for key in ("num_bits", "axis"):
        if key in want and norm(want[key]) != got[key]:
            fail(f"{where}: {key} {got[key]}, expected {want[key]}")
    if "block_sizes" in want:
        got_bs = got["block_sizes"] or {}
        for k, v in want["block_sizes"].items():
            gv = got_bs.get(k, "static" if k == "type" else None)
            if norm(v) != gv:
                fail(f"{where}: block_sizes[{k}] {gv}, expected {v}")
    # Full expectations (with `num_bits`) leave `type` out when static.
    if "num_bits" in want and want.get("type", "static") != got["type"]:
        fail(f"{where}: type {got['type']}, expected {want.get('type', 'static')}")
    if got["type"] == "static" and not (got.get("block_sizes") or {}).get("type") == "dynamic" and not got["amax"]:
        fail(f"{where}: static quantizer was not calibrated (no amax)")


def check_modelopt(case: dict, checkpoint: Path, device: str) -> None:
    try:
        import modelopt.torch.quantization as mtq
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"SKIP modelopt check: {e}")
        return
    path = case["modelopt"]
    if not path.exists():
        print(f"SKIP modelopt check: no {path}")
        return
    cfg = modelopt_cfg_from_json(json.loads(path.read_text()))
    model = load_model(checkpoint, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, forward_loop_for(model, device))
    expect = case["expect"]
    print(f"\n== ModelOpt {mtq.__name__} ({path.name}) on {checkpoint}")
    print(f"{'module':<48} {'pair':<14} {'weight_quantizer':<44} input_quantizer")
    modules = dict(model.named_modules())
    for name in linear_names(model):
        mod = modules[name]
        w = quantizer_state(getattr(mod, "weight_quantizer", None))
        i = quantizer_state(getattr(mod, "input_quantizer", None))
        o = quantizer_state(getattr(mod, "output_quantizer", None))
        rel = name[len(LM_PREFIX) :] if name.startswith(LM_PREFIX) else None
        e = (expect or {}).get("modules", {}).get(rel) if rel else None
        pair = e["pair"] if e else ("-" if expect else "?")
        print(f"{name:<48} {pair:<14} {describe(w):<44} {describe(i)}")
        if o["enable"]:
            fail(f"{name}.output_quantizer is enabled")
        if expect is None:
            continue
        want = e["modelopt"] if e else {"weight": {"enable": False}, "input": {"enable": False}}
        compare_quantizer(f"{name}.weight_quantizer", want["weight"], w)
        compare_quantizer(f"{name}.input_quantizer", want["input"], i)
    # Quantizers of non-Linear modules (none expected on).
    from modelopt.torch.quantization.nn import TensorQuantizer

    linear = set(linear_names(model))
    for qname, q in model.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled and qname.rpartition(".")[0] not in linear:
            fail(f"{qname} (not a Linear's) is enabled")


# ----------------------------------------------------------------------------------------
# (b) llm-compressor
# ----------------------------------------------------------------------------------------


def args_dict(a) -> dict | None:
    if a is None:
        return None
    d = a.model_dump() if hasattr(a, "model_dump") else dict(a)
    out = {}
    for k, v in d.items():
        if hasattr(v, "value"):  # enums
            v = v.value
        if k in ("scale_dtype", "zp_dtype") and v is not None:
            v = str(v).removeprefix("torch.")
        out[k] = v
    return out


def describe_args(a: dict | None) -> str:
    if a is None:
        return "-"
    s = f"{a['type']}{a['num_bits']} {a['strategy']}"
    if a.get("group_size"):
        s += f"/{a['group_size']}"
    if a.get("dynamic"):
        s += f" dyn={a['dynamic']}"
    if a.get("scale_dtype"):
        s += f" scale={a['scale_dtype']}"
    return s


def compare_args(where: str, want: dict | None, got: dict | None) -> None:
    if want is None or got is None:
        if (want is None) != (got is None):
            fail(f"{where}: {describe_args(got)}, expected {describe_args(want)}")
        return
    for k, v in want.items():
        if k == "observer" and got.get("dynamic") is True:
            continue
        if got.get(k) != v:
            fail(f"{where}: {k} = {got.get(k)!r}, expected {v!r}")


def check_llm_compressor(case: dict, checkpoint: Path, device: str) -> None:
    try:
        from compressed_tensors.utils import match_named_modules
        from llmcompressor.recipe import Recipe
    except ImportError as e:
        print(f"SKIP llm-compressor check: {e}")
        return
    path = case["lc"]
    if not path.exists():
        print(f"SKIP llm-compressor check: no {path}")
        return
    recipe = Recipe.create_instance(str(path))
    mods = [m for m in recipe.modifiers if type(m).__name__ == "QuantizationModifier"]
    if len(mods) != 1:
        fail(f"{path.name}: {len(mods)} QuantizationModifiers, expected 1")
        return
    qm = mods[0]
    model = load_model(checkpoint, "cpu")
    config = qm.resolved_config
    print(f"\n== llm-compressor ({path.name}): {len(config.config_groups)} config groups, ignore {len(qm.ignore)}")
    for gname, scheme in config.config_groups.items():
        for t in scheme.targets:
            hits = [n for n, _ in match_named_modules(model, [t], qm.ignore)]
            if len(hits) != 1:
                fail(f"{gname} target {t!r} matches {hits}")
    for t in qm.ignore:
        if t != "lm_head" and len([n for n, _ in match_named_modules(model, [t])]) != 1:
            fail(f"ignore {t!r} does not name exactly one module")
    qm.initialize_quantization(model)
    expect = case["expect"]
    print(f"{'module':<48} {'pair':<14} {'weights':<40} input_activations")
    modules = dict(model.named_modules())
    for name in linear_names(model):
        scheme = getattr(modules[name], "quantization_scheme", None)
        w = args_dict(scheme.weights) if scheme else None
        i = args_dict(scheme.input_activations) if scheme else None
        rel = name[len(LM_PREFIX) :] if name.startswith(LM_PREFIX) else None
        e = (expect or {}).get("modules", {}).get(rel) if rel else None
        pair = e["pair"] if e else ("-" if expect else "?")
        print(f"{name:<48} {pair:<14} {describe_args(w):<40} {describe_args(i)}")
        if expect is None:
            continue
        if expect["kind"] == "enable":
            quantized = bool(e and e["lc_quantized"])
            if quantized != (w is not None or i is not None):
                fail(f"{name}: quantized {not quantized}, expected {quantized}")
            continue
        lc = e["lc"] if e else {"weights": None, "input_activations": None}
        if "unsupported" in lc:
            lc = {"weights": None, "input_activations": None}
        compare_args(f"{name} weights", lc["weights"], w)
        compare_args(f"{name} input_activations", lc["input_activations"], i)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models/tiny_qwen3_vl/checkpoint")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--only", choices=["modelopt", "llm-compressor"], default=None)
    args = ap.parse_args()
    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    except ImportError:
        print("SKIP: torch is not installed")
        return 0
    found = cases(args.dir)
    if not found:
        print(f"no exports found in {args.dir}")
        return 1
    for case in found:
        print(f"### {case['name']}  (expectations: {case['expect']['kind'] if case['expect'] else 'none'})")
        if args.only in (None, "modelopt"):
            check_modelopt(case, args.checkpoint, device)
        if args.only in (None, "llm-compressor"):
            check_llm_compressor(case, args.checkpoint, device)
    print()
    if FAILURES:
        print(f"{len(FAILURES)} mismatches")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
