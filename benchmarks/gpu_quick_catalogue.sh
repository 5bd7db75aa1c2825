#!/usr/bin/env bash
# The whole quick-profile claim catalogue on smollm2-135m on one GPU, wall time recorded.
#
#   benchmarks/gpu_quick_catalogue.sh [OUT_DIR]          # default OUT_DIR: reports/gpu-catalogue
#
# Runs, in order, those RUNS names (default "cached ray1 ray2"; add "fresh" for the fourth):
#   cached  one process, the committed ranking cache (fixtures/rankings: time spent on ablations);
#   ray1    one Ray replica holding the GPU (--ray local --replicas 1 --gpus-per-replica 1);
#   ray2    two Ray replicas sharing it (--replicas 2 --gpus-per-replica 0.5): #29's 1 against 2;
#   fresh   one process, an empty ranking cache (every ranking identified on the GPU).
# Each compares every verdict with fixtures/expected/smollm2-135m.json, recorded on CPUs: a verdict
# that differs is a failed test, recorded, not fatal (the report names the GPU's numerics). Writes
# OUT_DIR/catalogue.txt (hardware, wall time, pytest's exit code and token-layers per second of
# each) and the HTML/JSON reports.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/gpu-catalogue}
mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
MODEL=${MODEL:-smollm2-135m}  # MODEL=tiny-llama DEVICE=cpu RUNS=cached: the script itself, checked on a CPU
DEVICE=${DEVICE:-cuda}
EXPECTED=${EXPECTED-fixtures/expected/$MODEL.json}
[ -f "$EXPECTED" ] || EXPECTED=
LOG="$OUT/catalogue.txt"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  .venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "cuda available", torch.cuda.is_available())'
} > "$LOG"

run() {  # $1 = label, rest = extra pytest options
  local label=$1; shift
  local t0 t1 rc ms
  t0=$(date +%s%N)
  .venv/bin/python -m pytest claims/ -p no:cacheprovider -q --model "$MODEL" --device "$DEVICE" \
    ${EXPECTED:+--expected "$EXPECTED"} --report-dir "$OUT/$label" "$@" > "$OUT/$label.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  local tl
  tl=$(.venv/bin/python -c 'import json, sys, glob
f = sorted(glob.glob(sys.argv[1] + "/*.json"))
print(json.load(open(f[-1]))["meta"]["cost"]["total"] if f else 0)' "$OUT/$label")
  printf '%s: wall %d.%01d s, pytest exit %d, %s token-layers, %s token-layers/s (%s)\n' "$label" \
    $((ms / 1000)) $((ms % 1000 / 100)) "$rc" "$tl" "$(( tl * 1000 / (ms > 0 ? ms : 1) ))" \
    "$(tail -n 1 "$OUT/$label.log")" | tee -a "$LOG"
}

for r in ${RUNS:-cached ray1 ray2}; do
  case $r in
    cached) run cached ;;
    ray1) run ray1 --ray local --replicas 1 --gpus-per-replica 1 ;;
    ray2) run ray2 --ray local --replicas 2 --gpus-per-replica 0.5 ;;
    fresh) CACHE=$(mktemp -d); run fresh --ranking-cache "$CACHE"; rm -rf "$CACHE" ;;
    *) echo "unknown run $r (cached, ray1, ray2, fresh)" | tee -a "$LOG" ;;
  esac
done
cat "$LOG"
