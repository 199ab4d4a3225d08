#!/usr/bin/env bash
# Fused scoring benchmark: several quant pairs in one `qpipe build` (one calibration forward
# and one forward/backward per batch for all of them) against one pair alone, and against
# the same pairs scored one at a time (`QPIPE_FUSE=0`, what every build did before).
#
#   scripts/bench_fused.sh            # mid-size model (hidden 512, 8 layers), CPU
#
# A random-weight checkpoint of the bench's mid shape (`bench_score gen`) with the tiny
# model's tokenizer (vocab 512 ⊂ 4096), the project's captions, BENCH_SAMPLES × BENCH_SEQ
# calibration tokens (default 32 × 128, batch 8). Every timed build starts from an empty
# tmp/ (checkpoint check, tokenization and scoring included). Prints one line per case.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SAMPLES=${BENCH_SAMPLES:-32}
SEQ=${BENCH_SEQ:-128}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
W=$(mktemp -d "${TMPDIR:-/tmp}/qpipe-bench-fused.XXXXXX")
trap 'rm -rf "$W"' EXIT

cargo build -q -p qpipe
cargo build -q -p qpipe-stages --features synth --example bench_score
QPIPE="$CARGO_TARGET_DIR/debug/qpipe"   # dev profile: the numeric crates are opt-level 3
"$CARGO_TARGET_DIR/debug/examples/bench_score" gen "$W/mid" > /dev/null
cp models/tiny_qwen3_vl/checkpoint/tokenizer.json models/tiny_qwen3_vl/checkpoint/tokenizer_config.json "$W/mid/"
cp -r pipeline.yaml data "$W/"
cd "$W"
COMMON=(output_layout=tmp "model.path=$W/mid" "dataset.max_calib_samples=$SAMPLES" "dataset.calib_seq_len=$SEQ" autoquant.batch_size=8)

timed() { # timed <label> <env> <pairs>: one build from an empty tmp/, prints its wall time
  local label=$1 fuse=$2 pairs=$3
  rm -rf "$W/tmp"
  local t0 t1
  t0=$(date +%s.%N)
  QPIPE_FUSE=$fuse "$QPIPE" build "quant_pair=$pairs" "${COMMON[@]}" > "$W/$label.log" 2>&1 || { cat "$W/$label.log"; exit 1; }
  t1=$(date +%s.%N)
  local s
  s=$(echo "$t1 - $t0" | bc)
  printf '%-34s %8.2f s  (%s)\n' "$label" "$s" "$(grep -o 'Finished [0-9]* instances.*' "$W/$label.log")"
  echo "$s" > "$W/$label.s"
}

EIGHT=wint8_aint8,wint8_afp16,wfp8_afp8,wfp8_afp16
ALL=$(python3 - "$REPO/pipeline.yaml" <<'PY'
import sys, yaml
print(",".join(yaml.safe_load(open(sys.argv[1]))["groups"]["quant_pair"]))
PY
) || ALL='glob(*)'
echo "mid model, $SAMPLES x $SEQ tokens, batch 8, $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
timed "1 pair (wint8_aint8)" 1 wint8_aint8
timed "4 8-bit pairs, fused" 1 "$EIGHT"
timed "4 8-bit pairs, one at a time" 0 "$EIGHT"
timed "16 pairs, fused" 1 "$ALL"
timed "16 pairs, one at a time" 0 "$ALL"
one=$(cat "$W/1 pair (wint8_aint8).s")
for c in "4 8-bit pairs, fused" "4 8-bit pairs, one at a time" "16 pairs, fused" "16 pairs, one at a time"; do
  printf '%-34s %5.2f x one pair\n' "$c" "$(echo "$(cat "$W/$c.s") / $one" | bc -l)"
done
