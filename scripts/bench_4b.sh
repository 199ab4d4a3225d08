#!/usr/bin/env bash
# Real-size scoring on the CPU within a memory budget (the memory-bounded scorer):
#
#   scripts/bench_4b.sh [4b|klwide|all]        # default: all
#
# 4b:     a random-weight checkpoint of Qwen3-VL-4B's language-model shape (bf16, 4 GiB
#         shards, 4.02 B parameters: `synth_checkpoint --preset 4b`), one `qpipe build` of
#         `quant_pair=wint8_aint8 dataset.size=small` (16 × 512 tokens, batch 8, `gradient`)
#         with `autoquant.memory_limit=$BENCH_LIMIT` (default 12GiB).
# klwide: a 2-layer, hidden-256 model with Qwen's 151,936-token vocabulary, `kl_div`,
#         8 × 512 tokens per batch, `autoquant.memory_limit=2GiB`.
#
# Each case prints the build's wall time and peak RSS (/usr/bin/time -v), the scorer's
# memory plan, its per-batch times and its achieved GFLOP/s; `4b` then prints the same
# binary's single-GEMM rate at the 4B MLP shapes (the kernels the scorer runs, same build
# profile). The checkpoints are written to $QPIPE_BENCH_DIR when set (and reused), else to
# a temporary folder removed at exit. Needs ~9 GB of disk for the 4B checkpoint and about
# half an hour of a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CASE=${1:-all}
LIMIT=${BENCH_LIMIT:-12GiB}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
W=$(mktemp -d "${TMPDIR:-/tmp}/qpipe-bench-4b.XXXXXX")
trap 'rm -rf "$W"' EXIT
CKPTS=${QPIPE_BENCH_DIR:-$W/ckpt}
mkdir -p "$CKPTS"

cargo build -q -p qpipe
cargo build -q -p qpipe-stages --features synth --example synth_checkpoint
QPIPE="$CARGO_TARGET_DIR/debug/qpipe"   # dev profile: the numeric crates are opt-level 3
SYNTH="$CARGO_TARGET_DIR/debug/examples/synth_checkpoint"

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
  "$(grep -o -w -E 'avx2|avx512f|avx512_vnni' /proc/cpuinfo | sort -u | paste -sd' ')," \
  "$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"

checkpoint() { # checkpoint <name> <synth args...>: writes it once
  local dir="$CKPTS/$1"; shift
  if [ ! -f "$dir/config.json" ]; then
    "$SYNTH" "$dir" "$@" >&2
  fi
  echo "$dir"
}

run() { # run <label> <checkpoint> <overrides...>: one build in a fresh workspace
  local label=$1 ckpt=$2; shift 2
  local ws="$W/ws-$label"
  rm -rf "$ws"; mkdir -p "$ws"
  cp -r pipeline.yaml data "$ws/"
  ( cd "$ws" && /usr/bin/time -v -o "$ws/time" "$QPIPE" build output_layout=tmp "model.path=$ckpt" "$@" \
      > "$ws/log" 2>&1 ) || { cat "$ws/log"; exit 1; }
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$ws/time" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$ws/time" | awk '{printf "%.2f GiB", $NF / 1048576}')
  echo "== $label: wall $wall, peak RSS $rss"
  grep -E 'memory plan|GFLOP/s|scored in|kl_div:|keeping' "$ws/log" | sed 's/^/   /' || true
}

if [ "$CASE" = 4b ] || [ "$CASE" = all ]; then
  dir=$(checkpoint 4b --preset 4b)
  run 4b "$dir" quant_pair=wint8_aint8 dataset.size=small autoquant.method=gradient autoquant.batch_size=8 \
    "autoquant.memory_limit=$LIMIT"
  echo "== single-GEMM rate, same kernels and build profile:"
  cargo test -q -p qpipe-model --lib bench_gemm_4b_shapes -- --ignored --nocapture 2>&1 | grep GFLOP | sed 's/^/   /'
fi
if [ "$CASE" = klwide ] || [ "$CASE" = all ]; then
  dir=$(checkpoint klwide --preset mid --layers 2 --hidden 256 --intermediate 768 --heads 4 --kv-heads 2 \
    --head-dim 64 --vocab 151936 --dtype bf16)
  run klwide "$dir" quant_pair=wint8_afp16 dataset.max_calib_samples=16 dataset.calib_seq_len=512 \
    autoquant.method=kl_div autoquant.batch_size=8 autoquant.memory_limit=2GiB
fi
