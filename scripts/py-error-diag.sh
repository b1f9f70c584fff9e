#!/usr/bin/env bash
# Why do Python calls that should raise an epcomm error segfault on the GPU machine (runs 9-12)?
# One GPU, under a minute, after the module is built in-tree (e.g. EPCOMM_CHECK_STEPS=build
# scripts/gpu-check.sh). Each step is a separate process; "rc=139" (or -11) is a segfault.
#
#   scripts/py-error-diag.sh 2>&1 | tee $OUT/py-error-diag.log
#
# What the steps decide:
#   probe-*   a tiny .so built here with the same g++ that builds epcomm: std::ostringstream, and an
#             exception thrown and caught inside it, called through ctypes without and with torch
#             imported. Crash only with torch => iostreams of GCC-built code in a torch process (the
#             hypothesis behind removing ostringstream from libepcomm's error paths).
#   libs      which libstdc++ / libgcc_s the torch process maps; every mapped DSO that exports the
#             ostringstream vtable or std::locale::classic (a second copy would be the culprit); and
#             where dlsym finds them from the global scope (searched first when libepcomm binds) and
#             from libepcomm's own scope.
#   repro     the failing call itself on one rank: get_dispatch_layout with an int32 topk_idx, and the
#             low-latency x-float32 error, through epcomm.Buffer. Must print ValueError lines.
#   gdb       the same repro under cuda-gdb, for a native backtrace if it still crashes.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH} PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
py=${PYTHON:-python3}
cxx=${CXX:-$([[ -x /opt/gcc/bin/g++ ]] && echo /opt/gcc/bin/g++ || echo g++)}
tmp=$(mktemp -d)
step() {
  local name=$1
  shift
  echo "== $name"
  timeout 60 "$@" >"$tmp/out" 2>&1
  rc=$?
  tail -30 "$tmp/out"
  echo "-- $name rc=$rc"
}

cat >"$tmp/probe.cpp" <<'EOF'
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
extern "C" const char* probe_stream(int n) {
  static std::string keep;
  std::ostringstream s;
  s << "[" << n << ", " << 2 * n << "] int32";
  keep = s.str();
  return keep.c_str();
}
extern "C" int probe_throw(int n) {
  try {
    throw std::runtime_error("x" + std::to_string(n));
  } catch (const std::runtime_error& e) {
    return static_cast<int>(std::strlen(e.what()));
  }
}
EOF
"$cxx" --version | head -1
"$cxx" -O2 -fPIC -shared -o "$tmp/libprobe.so" "$tmp/probe.cpp" || echo "probe: build failed"
probe="import ctypes; l = ctypes.CDLL('$tmp/libprobe.so'); l.probe_stream.restype = ctypes.c_char_p; \
print('stream:', l.probe_stream(7)); print('throw:', l.probe_throw(7))"
step probe-plain "$py" -c "$probe"
step probe-torch "$py" -c "import torch; torch.cuda.init(); $probe"
step probe-epcomm "$py" -c "import torch, epcomm; torch.cuda.init(); $probe"

step libs "$py" - <<'EOF'
import ctypes, os, subprocess, torch, epcomm  # noqa: F401
torch.cuda.init()
maps = sorted({l.split()[-1] for l in open("/proc/self/maps") if ".so" in l})
for m in maps:
    if any(k in m for k in ("libstdc++", "libgcc_s", "libepcomm", "_epcomm")):
        print("mapped:", m, "->", os.path.realpath(m))
syms = ("_ZTVNSt7__cxx1119basic_ostringstreamIcSt11char_traitsIcESaIcEEE", "_ZNSt6locale7classicEv",
        "_ZNSt9basic_iosIcSt11char_traitsIcEE4initEPSt15basic_streambufIcS1_E", "__cxa_throw",
        "_Unwind_RaiseException")
for m in maps:
    try:
        out = subprocess.run(["nm", "-D", "--defined-only", m], capture_output=True, text=True).stdout
    except FileNotFoundError:
        print("nm not found"); break
    for s in syms[:2]:
        if " " + s in out:
            print("exports", s[:44], "...:", m)
class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]
dl = ctypes.CDLL(None)
dl.dlsym.restype, dl.dlsym.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
dl.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
lib = next((m for m in maps if "libepcomm" in m), None)
handles = [("global", None)] + ([("libepcomm", ctypes.CDLL(lib)._handle)] if lib else [])
for s in syms:
    for where, h in handles:
        a = dl.dlsym(h, s.encode())
        info = DlInfo()
        if a and dl.dladdr(a, ctypes.byref(info)):
            print(f"{where:9s} {s[:44]:44s} -> {info.fname.decode()}")
        else:
            print(f"{where:9s} {s[:44]:44s} -> not found")
EOF

cat >"$tmp/repro.py" <<'EOF'
import torch, epcomm
class Comm:  # one rank, no torch.distributed
    def Get_rank(self): return 0
    def Get_size(self): return 1
    def allgather(self, obj): return [obj]
buf = epcomm.Buffer(None, num_nvl_bytes=1 << 26, comm=Comm())
topk = torch.randint(0, 8, (64, 4), device="cuda")
print("layout ok:", buf.get_dispatch_layout(topk, 8)[0].tolist())
for what, fn in (("int32 topk_idx", lambda: buf.get_dispatch_layout(topk.int(), 8)),
                 ("17 experts per token (C++ to_string path)",
                  lambda: buf.get_dispatch_layout(torch.zeros(64, 17, dtype=torch.int64, device="cuda"), 8))):
    try:
        fn(); print(what, ": no error")
    except Exception as e:  # noqa: BLE001
        print(what, ":", type(e).__name__, e)
print("repr:", epcomm.Config())
print("after errors:", buf.get_dispatch_layout(topk, 8)[0].tolist())
EOF
step repro "$py" "$tmp/repro.py"
if [[ $rc -ne 0 ]] && command -v cuda-gdb >/dev/null; then
  step gdb cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args "$py" "$tmp/repro.py"
fi
rm -rf "$tmp"
