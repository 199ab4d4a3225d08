#!/usr/bin/env bash
# Score benchmark: qpipe vs ModelOpt + PyTorch on one synthetic mid-size checkpoint.
#
#   scripts/bench_score.sh [FORMAT] [METHOD]      # defaults: INT8_DEFAULT_CFG gradient
#   QPIPE_BENCH_DTYPE=float64 scripts/bench_score.sh ...   # both sides in float64
#
# 1. `bench_score gen` writes a random-weight Qwen3-VL checkpoint (hidden 512, 8 layers,
#    intermediate 1536, vocab 4096) and 32 × 128 left-padded tokens into a temp dir;
# 2. qpipe scores it in-process (`bench_score score`), under /usr/bin/time -v;
# 3. when python3 has torch + modelopt, scripts/bench_score_modelopt.py does the same
#    with `mtq.auto_quantize`, under /usr/bin/time -v;
# 4. prints in-process scoring time, whole-process wall time and peak RSS of both sides,
#    and the largest relative score difference between them. On a shared machine compare
#    the CPU seconds (user + system): wall time there depends on what else runs.
#
# Each side runs BENCH_RUNS times (default 3), alternating, and the run with the median
# in-process time is reported: on the 2-core VM the first run after a build can be 40 %
# slower (fresh memory is expensive there), and one sample per side would mostly measure that.
set -euo pipefail
cd "$(dirname "$0")/.."
FORMAT=${1:-INT8_DEFAULT_CFG}
METHOD=${2:-gradient}
RUNS=${BENCH_RUNS:-3}
SUFFIX=""   # the ModelOpt side names its float64 state `…_float64.json`
[ "${QPIPE_BENCH_DTYPE:-float32}" = float64 ] && SUFFIX=_float64
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
DIR=$(mktemp -d "${TMPDIR:-/tmp}/qpipe-bench-score.XXXXXX")
trap 'rm -rf "$DIR"' EXIT

cargo build -q -p qpipe-stages --features synth --example bench_score
BIN="$CARGO_TARGET_DIR/debug/examples/bench_score"   # dev profile is opt-level 3 (Cargo.toml)
"$BIN" gen "$DIR"

timed() { # timed <label> <run> <cmd...>: runs once, keeps the stdout JSON and /usr/bin/time figures
  local label=$1 run=$2; shift 2
  /usr/bin/time -v -o "$DIR/$label.$run.time" "$@" > "$DIR/$label.$run.out"
  tail -n 1 "$DIR/$label.$run.out" > "$DIR/$label.$run.json"   # the figures are the last stdout line
  cp "$DIR/${label}_state_$METHOD$SUFFIX.json" "$DIR/${label}_state_$METHOD.$run.json" 2>/dev/null || true
}

report() { # report <label>: the run with the median in-process time, as one line
  local label=$1 best
  best=$(for r in $(seq 1 "$RUNS"); do
    python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['score_s'], sys.argv[2])" "$DIR/$label.$r.json" "$r"
  done | sort -g | awk -v n="$RUNS" 'NR == int((n + 1) / 2) {print $2}')
  local t="$DIR/$label.$best.time" wall rss cpu all
  wall=$(grep "Elapsed (wall clock)" "$t" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$t" | awk '{print $NF}')
  cpu=$(awk -F': ' '/User time|System time/ {s += $2} END {printf "%.2f", s}' "$t")
  all=$(for r in $(seq 1 "$RUNS"); do python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['score_s'], 2))" "$DIR/$label.$r.json"; done | paste -sd, -)
  cp "$DIR/$label.$best.json" "$DIR/$label.json"
  cp "$DIR/${label}_state_$METHOD.$best.json" "$DIR/${label}_state_$METHOD.json" 2>/dev/null || true
  echo "$label $(cat "$DIR/$label.json") whole_process_wall=$wall whole_process_cpu_s=$cpu max_rss_kib=$rss score_s_all_runs=[$all]"
}

HAVE_MODELOPT=0
python3 -c "import torch, modelopt" 2>/dev/null && HAVE_MODELOPT=1
for r in $(seq 1 "$RUNS"); do
  timed qpipe "$r" "$BIN" score "$DIR" "$FORMAT" "$METHOD"
  if [ "$HAVE_MODELOPT" = 1 ]; then
    timed modelopt "$r" python3 scripts/bench_score_modelopt.py "$DIR" "$FORMAT" "$METHOD" 2>/dev/null
  fi
done
report qpipe
if [ "$HAVE_MODELOPT" = 1 ]; then
  report modelopt
  python3 - "$DIR" "$METHOD" <<'PY'
import json, sys
d, m = sys.argv[1], sys.argv[2]
q = json.load(open(f"{d}/qpipe_state_{m}.json"))["candidate_stats"]
o = json.load(open(f"{d}/modelopt_state_{m}.json"))["candidate_stats"]
rel = max(abs(q[k]["scores"][0] - o[k]["scores"][0]) / max(abs(o[k]["scores"][0]), 1e-30) for k in o)
qs = json.load(open(f"{d}/qpipe.json")); ms = json.load(open(f"{d}/modelopt.json"))
print(f"in-process scoring: qpipe {qs['score_s']:.2f}s vs modelopt {ms['score_s']:.2f}s wall "
      f"(ratio {qs['score_s'] / ms['score_s']:.2f}), {qs['score_cpu_s']:.2f}s vs {ms['score_cpu_s']:.2f}s CPU "
      f"(ratio {qs['score_cpu_s'] / ms['score_cpu_s']:.2f}); max rel score diff {rel:.2e} over {len(o)} recipes")
PY
else
  echo "SKIP: python3 with torch + nvidia-modelopt not found; ModelOpt side not run" >&2
fi
