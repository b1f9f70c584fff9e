#!/usr/bin/env bash
# The GPU machine's planned calls, by name (BENCHMARKS.md "Next" says which comes first and what each
# is predicted to show). They live in the tree so that a fresh checkout has them.
#
#   scripts/device-calls.sh prepare          # here, before the first call: .prebuilt/ for the machine
#   CALL_S=585 scripts/device-calls.sh one-gpu   # on the machine (carry .prebuilt); logs under $OUT
#   scripts/device-calls.sh --list
#
# `prepare` copies what the GPU machine cannot fetch into .prebuilt/ (git-ignored, carried with the
# call): Debian's GoogleTest sources (gpu-check's EPCOMM_GTEST_SOURCE_DIR) and the shared probes
# (../shared/tools: the ceiling step's nvlink_ceiling.cu). Every call runs under scripts/packed.sh
# (the machine hands back a few files: logs.tgz and summary.txt) and ends within CALL_S seconds
# (default 580): each step gets what is left of it, less a margin for packing.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=${1:-}

calls() {
  cat <<'EOF'
one-gpu     one GPU: gpu-check build, tests, python; then NCCL GIN at 2x1 fake nodes (C++ and Python)
four-gpu-1  4 GPUs: gpu-check build, tests (ScaleGpu at R = 4), GIN at 2x2 and 4x1 (issues 18, 21)
four-gpu-2  4 GPUs: gpu-check python (death tests one process per GPU, x 3 runs), issue 22
four-gpu-3  4 GPUs: gpu-check bench, then bandwidth against 4-24 SMs with the chart (issue 23)
EOF
}

case $name in
  prepare)
    mkdir -p "$root/.prebuilt"
    [[ -d /usr/src/googletest ]] || { echo "device-calls: /usr/src/googletest missing (apt-get install googletest)" >&2; exit 1; }
    rm -rf "$root/.prebuilt/googletest" "$root/.prebuilt/tools"
    cp -r /usr/src/googletest "$root/.prebuilt/googletest"
    shared=${EPCOMM_SHARED_TOOLS:-$root/../shared/tools}
    if [[ -d $shared ]]; then cp -r "$shared" "$root/.prebuilt/tools"; else echo "device-calls: no $shared (the ceiling step's probe)"; fi
    du -sh "$root/.prebuilt"
    exit 0
    ;;
  --list | -h | --help | "")
    calls
    [[ -n $name ]] && exit 0 || exit 2
    ;;
esac
calls | grep -q "^$name " || { echo "device-calls: no call '$name'" >&2; calls >&2; exit 2; }
[[ -d $root/.prebuilt/googletest ]] || echo "device-calls: no .prebuilt/googletest (run 'prepare' here and carry .prebuilt)" >&2

budget=${CALL_S:-580}
export EPCOMM_CALL_END=$(( $(date +%s) + budget - 15 ))  # 15 s for packing the logs
# One gpu-check run with the given steps, bounded by what is left of the call.
step() {
  local left=$(( EPCOMM_CALL_END - $(date +%s) ))
  if (( left < 20 )); then echo "[device-calls] no time left for: $*" | tee -a "$OUT/summary.txt"; return 0; fi
  echo "[device-calls] $* (at most $left s)" | tee -a "$OUT/summary.txt"
  env "$@" timeout -k 5 "$left" "$root/scripts/gpu-check.sh"
  local rc=$?
  [[ $rc -eq 124 ]] && echo "[device-calls] timed out: $*" | tee -a "$OUT/summary.txt"
  return 0
}
export -f step
export root

case $name in
  one-gpu)
    body='step EPCOMM_CHECK_STEPS="build tests python"
          step EPCOMM_CHECK_STEPS=gin EPCOMM_GIN_LAYOUTS=2x1'
    ;;
  four-gpu-1)
    body='step EPCOMM_CHECK_STEPS="build tests gin" EPCOMM_GIN_LAYOUTS=2x2,4x1'
    ;;
  four-gpu-2)
    body='step EPCOMM_CHECK_STEPS="build python" EPCOMM_DEATH_RUNS=3'
    ;;
  four-gpu-3)
    body='step EPCOMM_CHECK_STEPS="build bench smcurve"'
    ;;
esac
exec "$root/scripts/packed.sh" "$body"
