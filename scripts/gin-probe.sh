#!/usr/bin/env bash
# NCCL's real GIN path on one GPU host with no NIC: epcomm-gin-probe starts P processes, each a
# fake node of its own (NCCL_HOSTID), and drives GIN puts and signals between them through the
# test-only loopback plugin (tests/gin_loopback, libnccl-net-epcomm-loopback.so). Builds nothing:
# pass the build directory that scripts/gpu-check.sh made (NCCL from the nvidia-nccl-cu13 wheel,
# as libepcomm). Logs go under ${OUT:-./gpu-logs}; a summary is printed and appended to summary.txt.
#
#   EPCOMM_CHECK_STEPS=build scripts/gpu-check.sh     # builds ./build-gpu
#   scripts/gin-probe.sh build-gpu                     # P = 2 and P = 4, all on GPU 0 if one GPU
#   EPCOMM_GIN_PROBE_ARGS="--rounds 3 --bytes 65536" scripts/gin-probe.sh build-gpu
#
# Cases: P = 2 and P = 4 with the probe's default placement (rank r on GPU r % GPUs: all on GPU 0
# with one GPU, one GPU per process with enough GPUs); with several GPUs also P = 2 and 4 all on
# GPU 0; with 4 or more, 2 processes x 2 ranks (an LSA team of 2 inside each fake node).
# The probe gives each process (unless set already) NCCL_NET_PLUGIN=<that .so>,
# NCCL_NET=EpcommLoopback (no fallback to NCCL's own nets), NCCL_GIN_TYPE=2 (proxy), and always
# NCCL_HOSTID=epcomm-gin-probe-node-<k>. EPCOMM_LOOPBACK_TIMEOUT_MS bounds the plugin's waits.
set -uo pipefail
# NVLink multicast stays off on shared machines (README "Environment variables", docs/testing.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# NCCL 2.28.9 has no GIN debug subsystem: its GIN messages are under NET and INIT (src/debug.cc).
export NCCL_DEBUG=${NCCL_DEBUG:-INFO} NCCL_DEBUG_SUBSYS=${NCCL_DEBUG_SUBSYS:-INIT,NET,ENV}

root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-${EPCOMM_GPU_BUILD:-$root/build-gpu}}
out=${OUT:-$root/gpu-logs}
mkdir -p "$out"
log() { echo "[gin-probe.sh $(date +%H:%M:%S)] $*" | tee -a "$out/summary.txt"; }

if [[ ! -d $build ]]; then
  log "no build directory $build (build first: EPCOMM_CHECK_STEPS=build scripts/gpu-check.sh)"
  exit 1
fi
build=$(cd "$build" && pwd)  # NCCL dlopens the plugin by the path it is given
probe=$build/tests/gin_loopback/epcomm-gin-probe
plugin=$build/tests/gin_loopback/libnccl-net-epcomm-loopback.so
if [[ ! -x $probe || ! -f $plugin ]]; then
  log "$probe or $plugin is missing: build the targets epcomm-gin-probe and nccl-net-epcomm-loopback"
  exit 1
fi
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
log "GPUs: ${ngpu:-0}; probe links $(ldd "$probe" | awk '/libnccl/ {print $3}'); plugin $plugin"

timeout_s=${EPCOMM_GIN_PROBE_TIMEOUT:-240}
cases=("p2|--procs 2" "p4|--procs 4")
if [[ ${ngpu:-0} -gt 1 ]]; then
  cases+=("p2-gpu0|--procs 2 --device-of-rank 0,0" "p4-gpu0|--procs 4 --device-of-rank 0,0,0,0")
fi
if [[ ${ngpu:-0} -ge 4 ]]; then
  cases+=("p2x2|--procs 2 --ranks-per-proc 2")
fi

status=0
passed=0
for c in "${cases[@]}"; do
  name=${c%%|*}
  args=${c#*|}
  file=$out/gin-probe-$name.log
  start=$(date +%s)
  # The probe's own watchdog ends it at --timeout; `timeout` is the last resort if that fails.
  # shellcheck disable=SC2086
  NCCL_NET_PLUGIN=$plugin timeout -k 10 $((timeout_s + 30)) "$probe" $args --timeout "$timeout_s" \
    ${EPCOMM_GIN_PROBE_ARGS:-} >"$file" 2>&1
  rc=$?
  grep -E '^\[gin-probe' "$file" | grep -vE 'ncclDevCommCreate:|every put' | tail -n 12
  if [[ $rc -eq 77 ]]; then
    log "case $name: skipped (no GPU)"
    continue
  elif [[ $rc -ne 0 ]]; then
    status=1
    # What NCCL and the plugin said when it failed.
    grep -E 'NCCL WARN|loopback (net|gin)|GIN|Failed|failed' "$file" | grep -v '^\[gin-probe' | head -n 20
  else
    passed=$((passed + 1))
  fi
  log "case $name ($args): rc=$rc in $(( $(date +%s) - start )) s (log: $file)"
done
log "gin probe: $passed of ${#cases[@]} cases passed"
exit $status
