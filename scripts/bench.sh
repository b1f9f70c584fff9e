#!/usr/bin/env bash
# The newcomer's main command (README): installs what is missing, builds, runs epcomm-bench.
# Without a GPU, epcomm-bench says so and runs the CPU reference backend. Arguments go to
# epcomm-bench (see epcomm-bench --help).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
export PATH=/usr/local/cuda/bin:$PATH
build=${EPCOMM_BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "${EPCOMM_JOBS:-$(nproc)}" --target epcomm-bench
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec "$build/bench/epcomm-bench" "$@"
