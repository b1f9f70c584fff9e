#!/usr/bin/env bash
# The newcomer's test command (README): installs what is missing, builds everything (all CUDA code
# included), runs every CPU test (GPU tests print "skipped (no GPU)" where there is none), then
# installs the package to a scratch prefix and builds the C++ examples against it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh" --tests
export PATH=/usr/local/cuda/bin:$PATH
build=${EPCOMM_BUILD_DIR:-$root/build}
jobs=${EPCOMM_JOBS:-$(nproc)}
# libepcomm and the Python module build their messages without iostreams: GCC iostream code called
# in a process that has PyTorch loaded segfaults on the GPU machines (BENCHMARKS.md, run 13).
if grep -rlE '#include <(sstream|iostream|fstream|ostream)>' "$root/src" "$root/include" "$root/python/src"; then
  echo "test.sh: the files above include iostreams; build strings with std::string / std::to_string" >&2
  exit 1
fi
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$jobs"
(cd "$build" && ctest --output-on-failure -j "$jobs" -LE gpu)
# GPU tests: run where there is a GPU, otherwise they say "skipped (no GPU)" (exit 77 = skipped).
(cd "$build" && ctest -L gpu --verbose 2>&1 | grep -E "GPU tests|skipped|Passed|Failed|\*\*\*|tests passed" || true)
# The installed CMake package must be usable by a program outside the tree.
prefix=$(mktemp -d)
trap 'rm -rf "$prefix" "$build/example-installed"' EXIT
cmake --install "$build" --prefix "$prefix" >/dev/null
cmake -S "$root/examples/cpp" -B "$build/example-installed" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$build/example-installed" -j "$jobs" >/dev/null
echo "test.sh: the C++ examples build against the installed epcomm package ($prefix)"
