#!/usr/bin/env bash
# The CPU parts (reference backend, argument checks, CPU tests, epcomm-bench's CPU backend) under
# ASan + UBSan. CUDA's runtime maps memory where ASan keeps its shadow gap, hence protect_shadow_gap=0.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
export PATH=/usr/local/cuda/bin:$PATH
build=${EPCOMM_SANITIZE_BUILD_DIR:-$root/build-sanitize}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEPCOMM_SANITIZE=ON \
  -DEPCOMM_BUILD_PYTHON=OFF -DEPCOMM_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j "${EPCOMM_JOBS:-$(nproc)}" --target epcomm_cpu_tests epcomm-bench
export ASAN_OPTIONS=protect_shadow_gap=0:detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
"$build/tests/epcomm_cpu_tests" --gtest_brief=1
"$build/bench/epcomm-bench" --cpu >/dev/null
echo "sanitize.sh: CPU tests and the CPU benchmark are clean under ASan + UBSan"
