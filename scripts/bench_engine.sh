#!/usr/bin/env bash
# Engine overhead on the seed's full grid (16 quant pairs × 3 calibration sizes).
#
#   scripts/bench_engine.sh            # debug build (dependencies are optimized anyway)
#   PROFILE=release scripts/bench_engine.sh
#
# 1. Copies the pipeline, the embedded checkpoint and captions into a temporary
#    workspace and widens `publish` to all 16 pairs × small/medium/large.
# 2. "Builds" it cold with examples/bench_domain.rs: the real planner, stage kinds and
#    code versions, but stages that only write a few bytes → per-stage scheduling overhead.
# 3. Times the real `qpipe status` and a no-op `qpipe build` on the up-to-date tree
#    (whole process; hyperfine when installed, else a loop of 20 runs, median).
set -euo pipefail

cd "$(dirname "$0")/.."
profile="${PROFILE:-debug}"
flag=()
[[ "$profile" == release ]] && flag=(--release)
cargo build -q "${flag[@]}" --bin qpipe --example bench_domain
target="${CARGO_TARGET_DIR:-target}/$profile"
qpipe="$(realpath "$target/qpipe")"
fake="$(realpath "$target/examples/bench_domain")"

ws="$(mktemp -d)"
trap 'rm -rf "$ws"' EXIT
mkdir -p "$ws/models/tiny_qwen3_vl" "$ws/data"
cp -r models/tiny_qwen3_vl/checkpoint "$ws/models/tiny_qwen3_vl/"
cp -r data/calibration data/coco "$ws/data/"
pairs="$(sed -n '/^  quant_pair:/,/^  quant_granularity:/p' pipeline.yaml | grep -oE '^    w[a-z0-9]+_a[a-z0-9]+' | tr -d ' ' | paste -sd, -)"
sed '/^publish:/,$d' pipeline.yaml > "$ws/pipeline.yaml"
cat >> "$ws/pipeline.yaml" <<YAML
publish:
  - model: tiny_qwen3_vl
    quant_pair: [$pairs]
    dataset.size: [small, medium, large]
YAML
cd "$ws"
n="$("$qpipe" dag --format json | grep -c '"kind":')"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
echo "profile: $profile; grid: $(echo "$pairs" | tr , '\n' | wc -l) pairs × 3 sizes = $n stage instances"

ms() { date +%s%N; }
t0=$(ms)
"$fake" build -j 1 >/dev/null 2>&1
t1=$(ms)
cold_ms=$(( (t1 - t0) / 1000000 ))
echo "cold build of $n trivial stages (-j 1): ${cold_ms} ms total, $(awk "BEGIN{printf \"%.2f\", $cold_ms/$n}") ms/stage"

"$qpipe" status >/dev/null   # up to date, and warms the stat cache
if command -v hyperfine >/dev/null; then
  hyperfine -N --warmup 3 --runs 30 --style basic --export-json "$ws/h.json" \
    "$qpipe status" "$qpipe build" >/dev/null
  python3 - "$ws/h.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    cpu = (r['user'] + r['system']) * 1000
    print(f"{r['command'].split('/')[-1]:<14} median {r['median']*1000:6.1f} ms  (min {r['min']*1000:.1f}, max {r['max']*1000:.1f}, "
          f"CPU {cpu:.1f} ms, {len(r['times'])} runs)")
PY
else
  for cmd in status build; do
    times=()
    for _ in $(seq 20); do a=$(ms); "$qpipe" $cmd >/dev/null 2>&1 || true; b=$(ms); times+=($(( (b - a) / 1000 ))); done
    med=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 10p)
    echo "qpipe $cmd     median $(awk "BEGIN{printf \"%.1f\", $med/1000}") ms (20 runs)"
  done
fi
"$qpipe" status >/dev/null && echo "status after the benchmark: up to date"
