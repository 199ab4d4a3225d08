#!/usr/bin/env bash
# The whole model at real size on the CPU: a random-weight checkpoint of Qwen3-VL-4B's
# language model AND vision tower (`synth_checkpoint --preset 4b --vision 4b`: 24 blocks of
# hidden 1024, MLP 4096, 16 heads, patch 16, merge 2, out 2560, DeepStack after blocks 5,
# 11, 17), 16 synthetic 448 × 448 images with captions (COCO format), and one `qpipe build`
# of `dataset=coco_tiny autoquant.coverage=full` (INT8_DEFAULT, `gradient`, 16 samples of
# 256 tokens, batch 8) within `autoquant.memory_limit=$BENCH_LIMIT` (default 12GiB).
#
#   scripts/bench_vl.sh
#
# Prints the build's wall time and peak RSS (/usr/bin/time -v), the scorer's memory plan,
# its per-batch times, its GFLOP/s, and the vision tower's share of the scoring time. The
# checkpoint and images go to $QPIPE_BENCH_DIR when set (and are reused), else to a
# temporary folder removed at exit. Needs ~9 GB of disk and about half an hour of a
# 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${BENCH_LIMIT:-12GiB}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
W=$(mktemp -d "${TMPDIR:-/tmp}/qpipe-bench-vl.XXXXXX")
trap 'rm -rf "$W"' EXIT
DATA=${QPIPE_BENCH_DIR:-$W/data}
mkdir -p "$DATA"

cargo build -q -p qpipe
cargo build -q -p qpipe-stages --features synth --example synth_checkpoint
QPIPE="$CARGO_TARGET_DIR/debug/qpipe"   # dev profile: the numeric crates are opt-level 3
SYNTH="$CARGO_TARGET_DIR/debug/examples/synth_checkpoint"

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
  "$(grep -o -w -E 'avx2|avx512f|avx512_vnni' /proc/cpuinfo | sort -u | paste -sd' ')," \
  "$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"

CKPT="$DATA/qwen3-vl-4b-synth"
if [ ! -f "$CKPT/preprocessor_config.json" ]; then
  "$SYNTH" "$CKPT" --preset 4b --vision 4b --coco "$DATA/coco" --images 16 --image-size 448 >&2
fi

ws="$W/ws"
mkdir -p "$ws"
cp -r pipeline.yaml data "$ws/"
( cd "$ws" && /usr/bin/time -v -o "$ws/time" "$QPIPE" build output_layout=tmp "model.path=$CKPT" \
    dataset=coco_tiny autoquant.coverage=full "dataset.coco_captions=$DATA/coco/captions.json" \
    "dataset.image_dir=$DATA/coco/images" dataset.max_calib_samples=16 dataset.calib_seq_len=256 \
    "autoquant.memory_limit=$LIMIT" > "$ws/log" 2>&1 ) || { cat "$ws/log"; exit 1; }
wall=$(grep "Elapsed (wall clock)" "$ws/time" | awk '{print $NF}')
rss=$(grep "Maximum resident set size" "$ws/time" | awk '{printf "%.2f GiB", $NF / 1048576}')
echo "== whole model (4B LM + tower), 16 images 448x448, coverage=full: wall $wall, peak RSS $rss"
grep -E 'memory plan|GFLOP/s|scored in|vision tower|keeping' "$ws/log" | sed 's/^/   /' || true
