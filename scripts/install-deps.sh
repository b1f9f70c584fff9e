#!/usr/bin/env bash
# Installs what epcomm builds with, from Debian/Ubuntu packages, when it is missing. The CUDA 13
# toolkit (nvcc, and NCCL >= 2.28 in it or as the nvidia-nccl-cu13 wheel) is not a Debian package:
# this script only checks for it. Usage: install-deps.sh [--tests]
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja-build)
command -v g++ >/dev/null || need+=(g++)
[[ -f /usr/include/gtest/gtest.h ]] || need+=(libgtest-dev)
[[ -d /usr/include/pybind11 ]] || need+=(pybind11-dev)
python3 -c 'import sysconfig,os,sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")) else 1)' 2>/dev/null \
  || compgen -G '/usr/include/python3*/Python.h' >/dev/null || need+=(python3-dev)
/usr/bin/python3 -c 'import pytest' 2>/dev/null || need+=(python3-pytest)
# --tests (scripts/test.sh): PyTorch and matplotlib for the Python tests that need them (they skip
# without), as Debian's python3-torch (CPU, 1.13), libtorch-dev (its headers, for epcomm._torch_ops)
# and python3-matplotlib. They serve Debian's python3, so only where the build's python3 has no torch
# and the two share an ABI: the no-GPU Python tests then run with Debian's (python/CMakeLists.txt,
# EPCOMM_PYTHON_TEST_EXECUTABLE). Optional: where apt cannot install them, a line says so.
extra=()
if [[ ${1:-} == --tests ]] && ! python3 -c 'import torch' 2>/dev/null; then
  soabi='import sysconfig; print(sysconfig.get_config_var("SOABI"))'
  if [[ -x /usr/bin/python3 && "$(python3 -c "$soabi" 2>/dev/null)" == "$(/usr/bin/python3 -c "$soabi")" ]]; then
    /usr/bin/python3 -c 'import torch' 2>/dev/null || extra+=(python3-torch)
    [[ -f /usr/include/torch/csrc/autograd/python_variable.h ]] || extra+=(libtorch-dev)
    /usr/bin/python3 -c 'import matplotlib' 2>/dev/null || extra+=(python3-matplotlib)
  fi
fi
if ((${#need[@]} + ${#extra[@]})); then
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -q
  if ((${#need[@]})); then
    echo "install-deps: installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${need[@]}"
  fi
  if ((${#extra[@]})); then
    echo "install-deps: installing ${extra[*]} (for the Python tests that need PyTorch)"
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${extra[@]}" ||
      echo "install-deps: could not install ${extra[*]}; the Python tests that need them will skip"
  fi
fi
if ! command -v nvcc >/dev/null && [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  echo "install-deps: the CUDA 13 toolkit (nvcc) was not found; install it (it is not a Debian package)" >&2
  exit 1
fi
