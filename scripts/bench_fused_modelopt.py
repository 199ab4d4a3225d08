#!/usr/bin/env python3
"""ModelOpt side of the fused-scoring comparison: the four CPU-checkable 8-bit formats
given to one `mtq.auto_quantize` call, against each format alone (the seed's flow: one
run per pair), on the checkpoint and tokens `bench_score gen <dir>` wrote.

    python3 scripts/bench_fused_modelopt.py <dir> [METHOD]

Prints one line per case (in-process `auto_quantize` seconds) and, per format, the largest
relative difference between its scores in the combined call and alone; writes
`<dir>/modelopt_alone_<FORMAT>.json` (each format's single-format state). Optional: needs
`pip install torch nvidia-modelopt transformers requests`; qpipe's side is
`scripts/bench_fused.sh` (its fused scores equal its single-format ones byte for byte).
"""

import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FORMATS = ["INT8_DEFAULT_CFG", "INT8_WEIGHT_ONLY_CFG", "FP8_DEFAULT_CFG", "FP8_WEIGHT_ONLY_CFG"]


def main() -> int:
    d = Path(sys.argv[1])
    method = sys.argv[2] if len(sys.argv) > 2 else "gradient"
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq
    import bench_score_modelopt as bench
    import modelopt_oracle as oracle

    def cfg(name):
        return oracle.fp8_weight_only_cfg(mtq) if name == "FP8_WEIGHT_ONLY_CFG" else name

    def scores(state):
        return {k: [float(s) for s in st["scores"]] for k, st in state["candidate_stats"].items()}

    alone, t_alone = {}, 0.0
    for name in FORMATS:
        lm, lm_head, batches, pad, steps = bench.load(d, "float32")
        _, state, secs = oracle.run_case(lm, lm_head, batches, pad, cfg(name), method, 8.0, steps)
        t_alone += secs
        alone[name] = scores(state)
        (d / f"modelopt_alone_{name}.json").write_text(json.dumps(oracle.state_to_json(state, None), indent=1))
        print(f"modelopt {name} alone: {secs:.2f} s", flush=True)
    lm, lm_head, batches, pad, steps = bench.load(d, "float32")
    _, state, t_all = oracle.run_case(lm, lm_head, batches, pad, [cfg(n) for n in FORMATS], method, 8.0, steps)
    combined = scores(state)
    print(f"modelopt 4 formats alone, summed: {t_alone:.2f} s; in one call: {t_all:.2f} s")
    for i, name in enumerate(FORMATS):
        worst = max(
            abs(combined[k][i] - alone[name][k][0]) / max(abs(alone[name][k][0]), 1e-30) for k in alone[name]
        )
        print(f"  {name}: one call vs alone, largest relative score difference {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
