#!/usr/bin/env python3
"""ModelOpt + PyTorch side of the score benchmark (see scripts/bench_score.sh).

    python3 scripts/bench_score_modelopt.py <dir> [FORMAT] [METHOD]

Reads the synthetic checkpoint and tokens `bench_score gen <dir>` wrote, builds the
language model with transformers (f32, CPU), runs `mtq.auto_quantize` exactly as
`scripts/modelopt_oracle.py` does, and prints one JSON line of figures: model load time,
in-process `auto_quantize` time, peak RSS. Writes `<dir>/modelopt_state_<method>.json`.
"""

import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load(d: Path, dtype_name: str):
    """The language model, its tied head, the batches, the pad id and the score steps of
    the checkpoint and tokens in `d`, in `dtype_name` (`float32`; `float64`: the
    rounding-noise-free reference, QPIPE_BENCH_DTYPE)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    import modelopt_oracle as oracle

    cfg = AutoConfig.from_pretrained(str(d))
    dtype = getattr(torch, dtype_name)
    lm = Qwen3VLTextModel._from_config(cfg.text_config, dtype=dtype)
    # Converted one tensor at a time as it is copied in, so that loading a bf16 checkpoint
    # never holds a second converted copy of the model (it would dominate the peak RSS).
    sd = load_file(str(d / "model.safetensors"))
    prefix = "model.language_model."
    params = dict(lm.named_parameters())
    params.update(dict(lm.named_buffers()))
    seen = set()
    with torch.no_grad():
        for k in [k for k in sd if k.startswith(prefix)]:
            name = k[len(prefix):]
            assert name in params, f"unexpected tensor {k}"
            params[name].copy_(sd[k].to(dtype))
            seen.add(name)
            if name != "embed_tokens.weight":
                del sd[k]
    missing = [m for m in params if m not in seen and "rotary" not in m]
    assert not missing, missing
    lm.eval()
    lm_head = torch.nn.Linear(cfg.text_config.hidden_size, cfg.text_config.vocab_size, bias=False, dtype=dtype)
    lm_head.weight = torch.nn.Parameter(sd.pop(prefix + "embed_tokens.weight").to(dtype), requires_grad=False)
    del sd
    tok = json.loads((d / "tokens.json").read_text())
    ids = torch.tensor(tok["input_ids"], dtype=torch.long)
    mask = torch.tensor(tok["attention_mask"], dtype=torch.long)
    batches = oracle.make_batches(ids, mask, tok["batch_size"])
    steps = min(128 // tok["batch_size"], len(batches))
    return lm, lm_head, batches, tok["pad_token_id"], steps


def main() -> int:
    t0 = time.perf_counter()
    d = Path(sys.argv[1])
    fmt = sys.argv[2] if len(sys.argv) > 2 else "INT8_DEFAULT_CFG"
    method = sys.argv[3] if len(sys.argv) > 3 else "gradient"
    warnings.simplefilter("ignore")
    import torch

    import modelopt.torch.quantization as mtq
    import modelopt_oracle as oracle

    dtype_name = os.environ.get("QPIPE_BENCH_DTYPE", "float32")
    if dtype_name == "float64":
        oracle.keep_float64()  # float64 throughout, as the oracle's f64 mode (see there)
    lm, lm_head, batches, pad_id, steps = load(d, dtype_name)
    fmt_cfg = oracle.fp8_weight_only_cfg(mtq) if fmt in ("FP8_WEIGHT_ONLY", "FP8_WEIGHT_ONLY_CFG") else fmt
    load_s = time.perf_counter() - t0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    _, state, score_s = oracle.run_case(lm, lm_head, batches, pad_id, fmt_cfg, method, 8.0, steps)
    suffix = "" if dtype_name == "float32" else f"_{dtype_name}"
    (d / f"modelopt_state_{method}{suffix}.json").write_text(json.dumps(oracle.state_to_json(state, None), indent=1))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    score_cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    rss = ru1.ru_maxrss / 1024.0
    print(json.dumps({"side": "modelopt", "format": fmt, "method": method, "load_s": load_s, "score_s": score_s, "score_cpu_s": score_cpu_s,
                      "threads": torch.get_num_threads(), "peak_rss_mib": rss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
