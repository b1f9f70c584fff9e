#!/usr/bin/env bash
# The GPU machine's job: build epcomm with every core (NCCL from the nvidia-nccl-cu13 wheel), run
# the GPU tests and epcomm-bench, and leave logs under $OUT (or ./gpu-logs).
#
#   scripts/gpu-check.sh                 # build + tests + bench + python + ceiling
#   EPCOMM_CHECK_STEPS="build tests" scripts/gpu-check.sh
#   EPCOMM_GPU_TEST_FILTER='NormalGpu.*' EPCOMM_BENCH_ARGS='--sms 24,16' scripts/gpu-check.sh
#   EPCOMM_CHECK_STEPS="build tests sanitizer" EPCOMM_GPU_TEST_FILTER='Shrink*:Stress*' scripts/gpu-check.sh
#   EPCOMM_CHECK_STEPS="build isolated" scripts/gpu-check.sh   # each test in its own process
#   EPCOMM_CHECK_STEPS="build tests llvariants" scripts/gpu-check.sh  # LL tests under each opt-in path
#   EPCOMM_CHECK_STEPS="build repeat" EPCOMM_REPEAT_FILTER='StressGpu.RanksSharingOneGpu' scripts/gpu-check.sh
#   EPCOMM_CHECK_STEPS="build gin" scripts/gpu-check.sh   # NCCL GIN across processes (fake nodes), C++ and Python
#   EPCOMM_CHECK_STEPS="build bench-fake" scripts/gpu-check.sh   # epcomm-bench across fake nodes (byte counts)
#   EPCOMM_CHECK_STEPS="build smcurve" scripts/gpu-check.sh   # bandwidth against SMs, wire probe + bench, chart
#
# GoogleTest: the installed one, else the sources in $EPCOMM_GTEST_SOURCE_DIR (default
# .prebuilt/googletest, a copy of Debian's /usr/src/googletest).
set -uo pipefail
# NVLink multicast stays off on shared machines (README "Environment variables", docs/testing.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/gpu-logs}
mkdir -p "$out"
build=${EPCOMM_GPU_BUILD:-$root/build-gpu}
steps=${EPCOMM_CHECK_STEPS:-build tests bench python ceiling}
status=0
log() { echo "[gpu-check $(date +%H:%M:%S)] $*" | tee -a "$out/summary.txt"; }

nvidia-smi -L 2>&1 | tee -a "$out/summary.txt"
num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")  # the steps' layouts and repeats depend on it
nvidia-smi topo -m >>"$out/summary.txt" 2>&1 || true

if [[ " $steps " == *" build "* ]]; then
  gtest_src=${EPCOMM_GTEST_SOURCE_DIR:-$root/.prebuilt/googletest}
  host_cc=()
  [[ -x /opt/gcc/bin/g++ ]] && host_cc=(-DCMAKE_CXX_COMPILER=/opt/gcc/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/opt/gcc/bin/g++)
  log "configure ($build)"
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEPCOMM_GTEST_SOURCE_DIR="$gtest_src" \
    -DEPCOMM_BUILD_PYTHON=${EPCOMM_BUILD_PYTHON:-ON} -DEPCOMM_TORCH_OPS=${EPCOMM_TORCH_OPS_BUILD:-AUTO} "${host_cc[@]}" >"$out/build.log" 2>&1 || { log "configure FAILED"; tail -30 "$out/build.log"; exit 1; }
  grep "epcomm:" "$out/build.log" | tee -a "$out/summary.txt"
  start=$(date +%s)
  if ! cmake --build "$build" -j "$(nproc)" >>"$out/build.log" 2>&1; then
    # The optional torch-linked module (epcomm._torch_ops) must not cost the run: without it the
    # Python layer allocates from Python. Anything else failing ends the run.
    if grep -q "FAILED: .*_torch_ops" "$out/build.log"; then
      log "epcomm._torch_ops did not build (errors in build.log); again with EPCOMM_TORCH_OPS=OFF"
      grep -E "error" "$out/build.log" | head -10
      cmake -S "$root" -B "$build" -DEPCOMM_TORCH_OPS=OFF >>"$out/build.log" 2>&1 &&
        cmake --build "$build" -j "$(nproc)" >>"$out/build.log" 2>&1 || { log "build FAILED"; exit 1; }
    else
      log "build FAILED"; grep -E "error|Error" "$out/build.log" | head -40; exit 1
    fi
  fi
  log "build ok in $(( $(date +%s) - start )) s"
fi

if [[ " $steps " == *" tests "* ]]; then
  log "GPU tests"
  timeout ${EPCOMM_TEST_TIMEOUT:-900} "$build/tests/epcomm_gpu_tests" --gtest_filter="${EPCOMM_GPU_TEST_FILTER:-*}" \
    >"$out/gpu-tests.log" 2>&1
  rc=$?
  grep -E "^\[  (FAILED|PASSED|  OK) |^\[==========\]|skipped|threw|Failure|mismatch|Expected" "$out/gpu-tests.log" | head -80
  log "GPU tests rc=$rc"
  [[ $rc -ne 0 ]] && status=1
fi

if [[ " $steps " == *" tests "* ]]; then
  # A peer process killed with SIGKILL: the survivor's group barrier raises and it exits 0.
  log "peer-death test"
  timeout 200 "$build/tests/epcomm-peer-death-test" >"$out/peer-death.log" 2>&1
  rc=$?
  grep -E "rank 0|peer death|FAIL" "$out/peer-death.log" | cut -c1-400
  log "peer-death test rc=$rc"
  [[ $rc -ne 0 ]] && status=1
fi

if [[ " $steps " == *" tests "* ]]; then
  # The C++ examples (README "Using it from C++"): one thread per GPU, each checks its results.
  for ex in epcomm_example epcomm_decode_example; do
    log "example $ex"
    timeout ${EPCOMM_EXAMPLE_TIMEOUT:-120} "$build/examples/cpp/$ex" >"$out/$ex.log" 2>&1
    rc=$?
    tail -8 "$out/$ex.log"
    log "example $ex rc=$rc"
    [[ $rc -ne 0 ]] && status=1
  done
fi

if [[ " $steps " == *" repeat "* ]]; then
  # Tests that failed before, each run alone in a process of its own, once per seed in
  # EPCOMM_REPEAT_SEEDS (EPCOMM_STRESS_SEED; "random" draws one) and EPCOMM_REPEAT_TIMES times:
  #   EPCOMM_CHECK_STEPS="build repeat" EPCOMM_REPEAT_FILTER='StressGpu.RanksSharingOneGpu' \
  #     EPCOMM_REPEAT_SEEDS="12345 2056396047" EPCOMM_REPEAT_TIMES=3 scripts/gpu-check.sh
  : >"$out/repeat.log"
  for t in ${EPCOMM_REPEAT_FILTER:-StressGpu.RanksSharingOneGpu}; do
    for seed in ${EPCOMM_REPEAT_SEEDS:-random}; do
      for i in $(seq "${EPCOMM_REPEAT_TIMES:-3}"); do
        s=$seed; [[ $s == random ]] && s=$(( (RANDOM << 15) | RANDOM ))
        s0=$(date +%s%N)
        EPCOMM_STRESS_SEED=$s timeout ${EPCOMM_ISOLATED_TIMEOUT:-120} "$build/tests/epcomm_gpu_tests" \
          --gtest_filter="$t" >"$out/repeat-one.log" 2>&1
        rc=$?
        line="$t seed=$s try=$i rc=$rc $(( ($(date +%s%N) - s0) / 1000000 )) ms $(grep -E '^stress:' "$out/repeat-one.log" | head -1)"
        log "$line"
        if [[ $rc -ne 0 ]]; then
          status=1
          { echo "=== $line"; grep -vE '^\[ RUN|^\[       OK' "$out/repeat-one.log" | head -c 6000; } >>"$out/repeat.log"
        fi
      done
    done
  done
  rm -f "$out/repeat-one.log"
fi

if [[ " $steps " == *" llvariants "* ]]; then
  # The LL tests again under each opt-in path (EPCOMM_LL_VARIANTS: ';'-separated environment settings).
  IFS=';' read -r -a variants <<<"${EPCOMM_LL_VARIANTS:-EPCOMM_LL_PER_RANK=1;EPCOMM_LL_PER_RANK=0}"
  for v in "${variants[@]}"; do
    env $v timeout ${EPCOMM_TEST_TIMEOUT:-900} "$build/tests/epcomm_gpu_tests" \
      --gtest_filter='LowLatency*:Shrink*:Stress*:InternodeLowLatency*' >"$out/llvariant.log" 2>&1
    rc=$?
    log "LL tests with [$v]: rc=$rc, $(grep -E '^\[  PASSED  \]' "$out/llvariant.log" | head -1)"
    grep -E "^\[  FAILED  \]" "$out/llvariant.log" | head -10
    cat "$out/llvariant.log" >>"$out/llvariants.log"
    [[ $rc -ne 0 ]] && status=1
  done
  rm -f "$out/llvariant.log"
fi

if [[ " $steps " == *" gin "* ]]; then
  # NCCL GIN between processes that are nodes to NCCL (tests/gin): 2x1 and 4x1 (on GPU 0 when there is
  # one), 2x2 with 4 GPUs or more, through the test-only loopback net plugin (tests/gin_loopback)
  # where it was built. Without it NCCL has no GIN between the processes and only the "no GIN" cases
  # run (every rank must get the same RuntimeFailure). EPCOMM_GIN_PLUGIN names another plugin,
  # EPCOMM_GIN_ARGS adds options (e.g. --gtest_filter=GinNormal.*).
  plugin=${EPCOMM_GIN_PLUGIN:-$build/tests/gin_loopback/libnccl-net-epcomm-loopback.so}
  plugin_args=()
  if [[ -f $plugin ]]; then
    plugin_args=(--net-plugin "$plugin")
    log "gin: net plugin $plugin"
  else
    log "gin: net plugin $plugin is missing: only the no-GIN cases (GinUnavailable.*) run"
  fi
  layouts=${EPCOMM_GIN_LAYOUTS:-2x1,4x1}
  [[ -z ${EPCOMM_GIN_LAYOUTS:-} && $num_gpus -ge 4 ]] && layouts=$layouts,2x2
  log "gin: epcomm_gin_tests --layouts $layouts (logs: $out/gin)"
  rm -rf "$out/gin"
  mkdir -p "$out/gin"
  timeout ${EPCOMM_GIN_TIMEOUT:-3000} "$build/tests/epcomm_gin_tests" --layouts "$layouts" --log-dir "$out/gin" \
    --timeout-s ${EPCOMM_GIN_LAYOUT_TIMEOUT:-900} "${plugin_args[@]}" ${EPCOMM_GIN_ARGS:-} >"$out/gin-tests.log" 2>&1
  rc=$?
  grep -E "^\[gin\]|^  node|^epcomm GIN tests|HUNG|FAILED" "$out/gin-tests.log" | head -60
  [[ $rc -eq 124 ]] && log "gin: the launcher itself timed out after ${EPCOMM_GIN_TIMEOUT:-3000} s"
  log "gin tests rc=$rc"
  [[ $rc -ne 0 ]] && status=1
  if [[ -f $plugin && -z ${EPCOMM_GIN_NO_PYTHON:-} ]]; then
    # The same from Python: one process per rank, torch.distributed (gloo), import epcomm as
    # deep_ep, NCCL_HOSTID per fake node (tests/python/test_fake_nodes.py); EPCOMM_FAKE_CASES picks cases.
    log "gin: tests/python/test_fake_nodes.py (Python over fake nodes; logs: $out/fake-nodes)"
    PYTHONPATH=$root/python:$root/python/deep_ep_compat EPCOMM_TEST_NET_PLUGIN=$plugin EPCOMM_FAKE_NODES_LOG_DIR=$out/fake-nodes \
      timeout ${EPCOMM_FAKE_NODES_TIMEOUT_ALL:-900} python3 -m pytest -rs -q ${EPCOMM_FAKE_NODES_PYTEST_ARGS:-} \
      "$root/tests/python/test_fake_nodes.py" >"$out/python-fake-nodes.log" 2>&1
    rc=$?
    grep -E "^\[fake-nodes\] layout|^  rank|FAIL|SKIP|case .*: ok" "$out/python-fake-nodes.log" | head -60; tail -3 "$out/python-fake-nodes.log"
    log "python fake-node tests rc=$rc"
    [[ $rc -ne 0 ]] && status=1
    log "gin: examples/moe_layer.py --fake-nodes 2"
    PYTHONPATH=$root/python EPCOMM_TEST_NET_PLUGIN=$plugin timeout ${EPCOMM_MOE_FAKE_TIMEOUT:-400} python3 \
      "$root/examples/moe_layer.py" --fake-nodes 2 >"$out/moe-fake-nodes.log" 2>&1
    rc=$?
    tail -5 "$out/moe-fake-nodes.log"
    log "moe_layer --fake-nodes 2 rc=$rc"
    [[ $rc -ne 0 ]] && status=1
  fi
fi

if [[ " $steps " == *" bench-fake "* ]]; then
  # epcomm-bench across fake nodes (one process each, GIN through the loopback plugin): network and
  # NVLink bytes per call beside times that mean nothing through a loopback. Two ranks of a fake node
  # need two GPUs (NCCL refuses two ranks of one node on one GPU): 4 x 1 on one GPU.
  plugin=${EPCOMM_GIN_PLUGIN:-$build/tests/gin_loopback/libnccl-net-epcomm-loopback.so}
  layout="--ranks 4 --fake-nodes 2"
  [[ $num_gpus -lt 2 ]] && layout="--ranks 4 --fake-nodes 4"
  layout=${EPCOMM_BENCH_FAKE_LAYOUT:-$layout}
  rm -rf "$out/bench-fake"
  log "bench: epcomm-bench $layout (fake nodes, GIN through $plugin)"
  timeout ${EPCOMM_BENCH_FAKE_TIMEOUT:-300} "$build/bench/epcomm-bench" $layout --net-plugin "$plugin" \
    --log-dir "$out/bench-fake" --json "$out/bench-fake.json" >"$out/bench-fake.log" 2>&1
  rc=$?
  sed -n '/^summary/,$p' "$out/bench-fake.log"; grep -E "HUNG|FAILED|MISMATCH|NOT MEANINGFUL" "$out/bench-fake.log" | head -5
  log "bench fake nodes rc=$rc"
  [[ $rc -ne 0 ]] && status=1
fi

if [[ " $steps " == *" isolated "* ]]; then
  # Every GPU test (matching EPCOMM_GPU_TEST_FILTER) in a process of its own: a sticky CUDA error
  # (an illegal address) ends only its own test, so one fault cannot fail every test after it.
  log "GPU tests, one process each"
  "$build/tests/epcomm_gpu_tests" --gtest_list_tests --gtest_filter="${EPCOMM_GPU_TEST_FILTER:-*}" |
    awk '/^[A-Za-z]/{s=$1} /^  /{print s $1}' >"$out/isolated-list.txt"
  : >"$out/isolated.txt"
  : >"$out/isolated-failures.log"
  while read -r t; do
    s0=$(date +%s)
    timeout ${EPCOMM_ISOLATED_TIMEOUT:-120} "$build/tests/epcomm_gpu_tests" --gtest_filter="$t" >"$out/isolated-one.log" 2>&1
    rc=$?
    echo "$t rc=$rc $(( $(date +%s) - s0 )) s" >>"$out/isolated.txt"
    if [[ $rc -ne 0 ]]; then
      status=1
      { echo "=== $t rc=$rc"; head -c 8000 "$out/isolated-one.log"; } >>"$out/isolated-failures.log"
    fi
  done <"$out/isolated-list.txt"
  rm -f "$out/isolated-one.log"
  log "isolated: $(grep -c ' rc=0 ' "$out/isolated.txt") of $(wc -l <"$out/isolated.txt") passed"
  grep -v ' rc=0 ' "$out/isolated.txt" | head -20
fi

if [[ " $steps " == *" sanitizer "* ]]; then
  # compute-sanitizer (memcheck, racecheck, synccheck) over a small verified mix: StressGpu with
  # EPCOMM_STRESS_CALLS calls (normal layout/dispatch/cached dispatch/combine and LL dispatch/combine,
  # hooks, BF16/FP8, T from 0 to Tmax), 2 ranks on distinct GPUs (if there are 2) and 3 ranks sharing
  # GPU 0, through the local group (peer pointers; no NCCL kernels under the tools). Instrumented
  # kernels run 10-100x slower, so GPU waits get EPCOMM_SANITIZER_WAIT_MS. A tool that serializes
  # kernels or blocks would leave the cross-rank waits spinning: the per-tool timeout says so.
  #   EPCOMM_CHECK_STEPS="build sanitizer" EPCOMM_SANITIZER_TOOLS="memcheck" scripts/gpu-check.sh
  sanitizer=${EPCOMM_SANITIZER:-/usr/local/cuda/bin/compute-sanitizer}
  [[ -x $sanitizer ]] || sanitizer=$(command -v compute-sanitizer || echo compute-sanitizer)
  for tool in ${EPCOMM_SANITIZER_TOOLS:-memcheck racecheck synccheck}; do
    log "compute-sanitizer --tool $tool (filter ${EPCOMM_SANITIZER_FILTER:-StressGpu.*})"
    EPCOMM_TIMEOUT_MS=${EPCOMM_SANITIZER_WAIT_MS:-300000} EPCOMM_TEST_TRANSPORT=local \
      EPCOMM_STRESS_CALLS=${EPCOMM_SANITIZER_CALLS:-24} EPCOMM_STRESS_RANKS=2 \
      timeout ${EPCOMM_SANITIZER_TIMEOUT:-170} "$sanitizer" --tool "$tool" --error-exitcode 3 \
      "$build/tests/epcomm_gpu_tests" --gtest_filter="${EPCOMM_SANITIZER_FILTER:-StressGpu.*}" \
      >"$out/sanitizer-$tool.log" 2>&1
    rc=$?
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|SYNCCHECK SUMMARY|^stress:|^\[  (FAILED|PASSED) |skipped|Error:" \
      "$out/sanitizer-$tool.log" | head -20
    [[ $rc -eq 124 ]] && log "compute-sanitizer $tool: timed out after ${EPCOMM_SANITIZER_TIMEOUT:-170} s (log: sanitizer-$tool.log)"
    log "compute-sanitizer $tool rc=$rc"
    [[ $rc -ne 0 ]] && status=1
  done
fi

if [[ " $steps " == *" bench "* ]]; then
  # The standard problem (4096 tokens) with JSON, then the other sizes the issues ask for.
  for tokens in ${EPCOMM_BENCH_TOKENS:-4096 1024 128}; do
    log "epcomm-bench --tokens $tokens"
    json=()
    [[ $tokens == 4096 ]] && json=(--json "$out/bench.json")
    timeout ${EPCOMM_BENCH_TIMEOUT:-600} "$build/bench/epcomm-bench" --tokens "$tokens" ${EPCOMM_BENCH_ARGS:---sms 24,16} \
      "${json[@]}" >"$out/bench-$tokens.log" 2>&1
    rc=$?
    sed -n '/^summary/,$p' "$out/bench-$tokens.log" | grep -v "^check:"
    grep -E "MISMATCH|error|Error" "$out/bench-$tokens.log" | head -5
    log "epcomm-bench --tokens $tokens rc=$rc"
    [[ $rc -ne 0 ]] && status=1
  done
fi

if [[ " $steps " == *" smcurve "* ]]; then
  # Bandwidth against SMs (issue "Fewer SMs"): the wire probe's copies (and the copy engines, which
  # use none) and epcomm-bench with the NCCL baseline at every SM count, per token count, as JSON,
  # then one PNG (tools/bench_chart.py, where matplotlib is installed).
  sms=${EPCOMM_SM_CURVE:-4,6,8,12,16,24}
  log "smcurve: epcomm-wire-probe --sms $sms (+ copy engines)"
  timeout ${EPCOMM_BENCH_TIMEOUT:-600} "$build/bench/epcomm-wire-probe" --sms "$sms" \
    --modes store,load,tma-push,tma-pull,ce-push,ce-pull >"$out/smcurve-wire.log" 2>&1
  tee -a "$out/summary.txt" <"$out/smcurve-wire.log" | tail -40
  for tokens in ${EPCOMM_SM_CURVE_TOKENS:-4096 8192 1024 128}; do
    log "smcurve: epcomm-bench --tokens $tokens --sms $sms"
    timeout ${EPCOMM_BENCH_TIMEOUT:-600} "$build/bench/epcomm-bench" --tokens "$tokens" --sms "$sms" \
      --json "$out/smcurve-$tokens.json" >"$out/smcurve-$tokens.log" 2>&1
    rc=$?
    sed -n '/^summary/,$p' "$out/smcurve-$tokens.log" | grep -v "^check:" | tee -a "$out/summary.txt"
    log "smcurve: epcomm-bench --tokens $tokens rc=$rc"
    [[ $rc -ne 0 ]] && status=1
  done
  if python3 -c "import matplotlib" 2>/dev/null; then
    python3 "$root/tools/bench_chart.py" "$out"/smcurve-*.json -o "$out/smcurve.png" >>"$out/summary.txt" 2>&1 &&
      log "smcurve: chart in $out/smcurve.png"
  else
    log "smcurve: no matplotlib here; chart later with tools/bench_chart.py $out/smcurve-*.json"
  fi
fi

if [[ " $steps " == *" python "* ]]; then
  # The drop-in layer: its GPU suite (one process per GPU), the client-shaped suite through the
  # deep_ep package, the MoE example, and the Python-level bandwidth beside the C++ figure (same run).
  log "python: pytest tests/python/test_gpu.py"
  # python/deep_ep_compat: the `deep_ep` package the client-shaped tests import (as frameworks do).
  export PYTHONPATH=$root/python:$root/python/deep_ep_compat${PYTHONPATH:+:$PYTHONPATH}
  timeout ${EPCOMM_PYTHON_TIMEOUT:-900} python3 -m pytest -rs -q --durations=0 "$root/tests/python/test_gpu.py" >"$out/python.log" 2>&1
  rc=$?
  grep "^\[epcomm case\]" "$out/python.log" | head -80; tail -5 "$out/python.log"
  log "python tests rc=$rc"
  [[ $rc -ne 0 ]] && status=1
  log "python: pytest tests/python/test_exit.py (fresh processes exit cleanly)"
  timeout ${EPCOMM_PYTHON_TIMEOUT:-900} python3 -m pytest -rs -q "$root/tests/python/test_exit.py" >"$out/python-exit.log" 2>&1
  rc=$?
  grep "^\[epcomm exit\]" "$out/python-exit.log"; tail -3 "$out/python-exit.log"
  log "python exit tests rc=$rc"
  [[ $rc -ne 0 ]] && status=1
  log "python: pytest tests/python/test_process_death.py (a rank killed with SIGKILL; 1 GPU: 3 fake nodes)"
  # -s: the per-scenario reports (time from the kill to each survivor's error or mask) are prints.
  # Three runs of each scenario with one process per GPU (the issue's count), one with fake nodes.
  death_runs=1
  [[ $num_gpus -ge 2 ]] && death_runs=3
  EPCOMM_TEST_NET_PLUGIN=${EPCOMM_GIN_PLUGIN:-$build/tests/gin_loopback/libnccl-net-epcomm-loopback.so} \
    EPCOMM_DEATH_RUNS=${EPCOMM_DEATH_RUNS:-$death_runs} EPCOMM_DEATH_LOG_DIR=$out/death \
    timeout ${EPCOMM_DEATH_TIMEOUT:-1800} python3 -m pytest -rs -q -s \
    "$root/tests/python/test_process_death.py" \
    >"$out/python-death.log" 2>&1
  rc=$?
  grep -E "^\[epcomm death\]|^  rank " "$out/python-death.log" | cut -c1-600; tail -3 "$out/python-death.log"
  log "python process-death tests rc=$rc"
  [[ $rc -ne 0 ]] && status=1
  log "python: tests/python/test_fuzz.py (bad input for every public call, on the GPUs)"
  timeout ${EPCOMM_PYTHON_TIMEOUT:-900} python3 "$root/tests/python/test_fuzz.py" --gpu >"$out/python-fuzz.log" 2>&1
  rc=$?
  grep -E "^epcomm fuzz|^PASS|^FAIL|^SKIP" "$out/python-fuzz.log" | cut -c1-2000
  log "python fuzz rc=$rc"
  [[ $rc -ne 0 ]] && status=1
  log "python: pytest tests/python/test_clients.py (vLLM / SGLang / Megatron-LM call shapes through deep_ep)"
  timeout ${EPCOMM_PYTHON_TIMEOUT:-900} python3 -m pytest -rs -q --durations=0 "$root/tests/python/test_clients.py" \
    >"$out/python-clients.log" 2>&1
  rc=$?
  grep "^\[epcomm case\]" "$out/python-clients.log" | head -40; tail -5 "$out/python-clients.log"
  log "python client tests rc=$rc"
  [[ $rc -ne 0 ]] && status=1
  log "python: tests/python/test_deep_ep_compat.py (the deep_ep package: imports, signatures, Config)"
  timeout 600 python3 "$root/tests/python/test_deep_ep_compat.py" >"$out/python-deep-ep.log" 2>&1
  rc=$?
  grep -v "^PASS" "$out/python-deep-ep.log" | tail -8
  log "deep_ep compat tests rc=$rc"
  [[ $rc -ne 0 ]] && status=1
  log "python: examples/moe_layer.py"
  timeout 300 python3 "$root/examples/moe_layer.py" >>"$out/python.log" 2>&1
  rc=$?
  tail -5 "$out/python.log"
  log "moe_layer rc=$rc"
  [[ $rc -ne 0 ]] && status=1
  log "python: bench_python.py"
  timeout 600 python3 "$root/tests/python/bench_python.py" --cpp-bench "$build/bench/epcomm-bench" \
    >"$out/bench-python.log" 2>&1
  rc=$?
  tail -12 "$out/bench-python.log"
  log "bench_python rc=$rc"
  [[ $rc -ne 0 ]] && status=1
fi

if [[ " $steps " == *" tune "* ]]; then
  # Kernel-shape sweeps on the standard problem, one line per setting, same binary and call:
  # EPCOMM_TUNE_CONFIGS is a ';'-separated list of environment settings ("" = the defaults), e.g.
  # "EPCOMM_COMBINE_PUSHER_WARPS=2 EPCOMM_COMBINE_PUSHER_STAGES=4;".
  IFS=';' read -r -a configs <<<"${EPCOMM_TUNE_CONFIGS:-}"
  for cfg in "${configs[@]}"; do
    env $cfg "$build/bench/epcomm-bench" --no-baseline --no-verify ${EPCOMM_TUNE_ARGS:---sms 24} >"$out/tune-one.log" 2>&1
    echo "== [${cfg:-defaults}] rc=$?" >>"$out/tune.log"
    cat "$out/tune-one.log" >>"$out/tune.log"
    sed -n '/^summary/,$p' "$out/tune-one.log" | grep -E " us " | sed "s|^ *|[${cfg:-defaults}] |" | tee -a "$out/summary.txt"
  done
  rm -f "$out/tune-one.log"
fi

if [[ " $steps " == *" ceiling "* ]]; then
  # Each way of moving bytes that the kernels could use (SIMT or bulk copies, push or pull).
  if [[ -x $build/bench/epcomm-wire-probe ]]; then
    "$build/bench/epcomm-wire-probe" --sms 16,24,32 >"$out/wire-probe.log" 2>&1
    "$build/bench/epcomm-wire-probe" --sms 24 --modes tma-push,tma-pull --warps 2 --bufs 6 >>"$out/wire-probe.log" 2>&1
    tee -a "$out/summary.txt" <"$out/wire-probe.log"
  fi
  # The wire's ceiling on this machine: the naive LSA store probe (../shared/tools, carried in
  # .prebuilt/tools), 64 MiB and 8 MiB per pair, 24 and 16 SMs.
  probe=${EPCOMM_PROBE_DIR:-$root/.prebuilt/tools}/nvlink_ceiling.cu
  nccl_dir=$(python3 -c "import nvidia.nccl,os;print(list(nvidia.nccl.__path__)[0])" 2>/dev/null)
  if [[ -f $probe && -n $nccl_dir ]]; then
    nvcc -O3 -std=c++20 -arch=sm_90 "$probe" -I"$nccl_dir/include" -L"$nccl_dir/lib" -l:libnccl.so.2 \
      -Xlinker -rpath="$nccl_dir/lib" -o "$build/nvlink_ceiling" >"$out/ceiling.log" 2>&1
    for args in "64 24" "64 16" "8 24"; do "$build/nvlink_ceiling" $args >>"$out/ceiling.log" 2>&1; done
    grep -E "rank 0|rank 3" "$out/ceiling.log"
  else
    log "ceiling probe not found ($probe)"
  fi
fi
exit $status
