#!/usr/bin/env python3
"""Reference vectors for qpipe's fake quantizers, computed by NVIDIA ModelOpt itself.

Optional to run; its output is committed. Needs `pip install nvidia-modelopt torch`
(CPU is enough: the INT and FP8 paths of ModelOpt's TensorQuantizer run on the CPU; its
FP4 paths need CUDA and are tested in Rust against hand-computed vectors and an
independent reference instead).

    python3 scripts/modelopt_quant_vectors.py   # writes stages/quant/tests/fixtures/quant_modelopt.json

Each case builds a `TensorQuantizer` from a quantizer attribute dict exactly as ModelOpt's
presets write it, calibrates static ranges with ModelOpt's max calibrator (weights on the
weight itself, inputs on the `calib` batches), and fake-quantizes `x`. Tensors are stored
as hex strings of little-endian f32 bit patterns (8 hex digits per value), so the Rust
test (`quant::tests::modelopt_vectors_match_bit_exactly`) compares bit for bit.
"""

import json
import pathlib
import struct
import sys

import torch

try:
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer
    import modelopt
except ImportError as e:  # pragma: no cover
    sys.exit(f"needs nvidia-modelopt and torch: {e}")

OUT = pathlib.Path(__file__).resolve().parent.parent / "stages/quant/tests/fixtures/quant_modelopt.json"


def hexf(t: torch.Tensor) -> str:
    v = t.detach().to(torch.float32).contiguous().flatten().tolist()
    return struct.pack(f"<{len(v)}f", *v).hex()


def run(cfg: dict, x: torch.Tensor, calib: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibrates (max) on `calib` (None = dynamic / no calibration) and fake-quantizes x."""
    tq = TensorQuantizer(QuantizerAttributeConfig(**cfg))
    if calib is not None:
        tq.disable_quant()
        tq.enable_calib()
        with torch.no_grad():
            for b in calib:
                tq(b)
        tq.load_calib_amax()
        tq.enable_quant()
        tq.disable_calib()
    with torch.no_grad():
        y = tq(x)
    amax = getattr(tq, "_amax", None)
    return y, amax


def main() -> None:
    g = torch.Generator().manual_seed(20261124)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    # A weight with hand-made rows: exact ties for INT8 (amax 127 → scale 1), an all-zero
    # row (zero amax), a tiny row (amax below 2^-24), negative zeros and subnormal FP8 inputs.
    w = randn(16, 64, scale=0.05)
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, -0.0, 0.49999997, 3.5])
    w[0, : ties.numel()] = ties
    w[0, ties.numel():] = 0.25
    w[1] = 0.0
    w[2] = 1e-9
    w[2, 3] = -0.0
    w[3, :8] = torch.tensor([448.0, 464.0, 432.0, 1.0e-3, 2.0e-3, -3.0e-3, 0.00097656, -0.0])
    w_int4 = randn(8, 256, scale=0.02)
    w_int4[1, 128:] = 0.0
    w_int4[2, :128] = torch.linspace(-7.0, 7.0, 128)  # INT4 scale 1: exact ties at ±k.5

    act_calib = [randn(8, 64, scale=2.0), randn(8, 64, scale=3.0)]
    act = randn(8, 64, scale=4.0)  # beyond the calibrated range: clamping (INT8 to -128)
    act[0, :6] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4])
    act_tok = randn(6, 64, scale=1.5)
    act_tok[1] = 0.0
    act_tok[2, :4] = torch.tensor([5.0, -5.0, 2.5, -0.0])

    per_token = {"type": "dynamic", "block_sizes": {-1: None}}
    cases = [
        # name, role, quantizer attribute dict (as the preset writes it), x, calib
        ("int8_weight_axis0", "weight", {"num_bits": 8, "axis": 0}, w, "self"),
        ("int8_weight_per_tensor", "weight", {"num_bits": 8, "axis": None}, w, "self"),
        ("int8_weight_axis1", "weight", {"num_bits": 8, "axis": 1}, w, "self"),
        ("int8_weight_group32", "weight", {"num_bits": 8, "block_sizes": {-1: 32, "type": "static"}}, w, "self"),
        ("int4_weight_blocks128", "weight", {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}, w_int4, "self"),
        ("int4_weight_axis0", "weight", {"num_bits": 4, "axis": 0}, w_int4, "self"),
        ("fp8_weight_per_tensor", "weight", {"num_bits": (4, 3), "axis": None}, w, "self"),
        ("fp8_weight_axis0", "weight", {"num_bits": (4, 3), "axis": 0}, w, "self"),
        ("fp8_weight_group32", "weight", {"num_bits": (4, 3), "block_sizes": {-1: 32, "type": "static"}}, w, "self"),
        ("int8_input_static", "input", {"num_bits": 8, "axis": None}, act, act_calib),
        ("int4_input_static", "input", {"num_bits": 4, "axis": None}, act, act_calib),
        ("fp8_input_static", "input", {"num_bits": (4, 3), "axis": None}, act, act_calib),
        ("int8_input_per_token", "input", {"num_bits": 8, **per_token}, act_tok, None),
        ("int4_input_per_token", "input", {"num_bits": 4, **per_token}, act_tok, None),
        ("fp8_input_per_token", "input", {"num_bits": (4, 3), "axis": None, **per_token}, act_tok, None),
        ("int8_input_zero", "input", {"num_bits": 8, "axis": None}, torch.zeros(2, 64), [torch.zeros(2, 64)]),
        ("fp8_input_zero", "input", {"num_bits": (4, 3), "axis": None}, torch.zeros(2, 64), [torch.zeros(2, 64)]),
    ]
    # Inputs are stored once under "tensors" and referenced by name.
    tensors, names = {}, {}

    def ref(t: torch.Tensor, label: str) -> str:
        if id(t) not in names:
            names[id(t)] = label
            tensors[label] = {"rows": t.shape[0], "cols": t.shape[1], "data": hexf(t)}
        return names[id(t)]

    ref(w, "w")
    ref(w_int4, "w_int4")
    ref(act, "act")
    ref(act_tok, "act_tok")
    for i, b in enumerate(act_calib):
        ref(b, f"act_calib{i}")
    out = []
    for name, role, cfg, x, calib in cases:
        calib_batches = [x] if calib == "self" else calib
        y, amax = run(cfg, x, calib_batches)
        rows, cols = x.shape
        out.append(
            {
                "name": name,
                "role": role,
                "quantizer": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                "rows": rows,
                "cols": cols,
                "calib": None if calib == "self" or calib is None else [ref(b, f"{name}_calib{i}") for i, b in enumerate(calib)],
                "x": ref(x, f"{name}_x"),
                "amax": None if amax is None else hexf(amax),
                "y": hexf(y),
            }
        )
    doc = {
        "format": "qpipe.quant_vectors/1",
        "generator": "scripts/modelopt_quant_vectors.py",
        "modelopt": modelopt.__version__,
        "torch": torch.__version__,
        "device": "cpu",
        "encoding": "hex of little-endian f32 bits, row-major [rows, cols]",
        "tensors": tensors,
        "cases": out,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(out)} cases)")


if __name__ == "__main__":
    main()
