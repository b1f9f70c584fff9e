"""Bad input for every public call of epcomm.Buffer (_fuzz.py: one argument broken per case).

CPU (CI, no torch, no GPU): 600 seeded cases over the Python layer, with a stand-in for the C++
core and for torch's allocations. A case passes if the call raises ValueError / TypeError /
RuntimeError naming the broken argument, or, for a break only the core can see (a dtype, a size,
a device, strides, a handle's host facts), if it reaches the core untouched; a break the Python
layer can see (a non-tensor, None, a bad integer or flag, a damaged handle tuple) must be refused
by it. Every call on a destroyed buffer says so.

GPU (scripts/gpu-check.sh): the same cases against the real core on every visible GPU (one
process each), where each must raise naming the argument; every 50 cases a verified dispatch /
combine / low-latency round shows that nothing was corrupted, and a timeout per batch catches a
hang (_fuzz_gpu.py).

    PYTHONPATH=python python3 tests/python/test_fuzz.py [--gpu]   (own runner: the CPU part, --gpu adds the GPU one)
    PYTHONPATH=python python3 -m pytest -rs tests/python/test_fuzz.py
EPCOMM_FUZZ_SEED repeats a run (the seed is printed); EPCOMM_FUZZ_CASES sets the count.
"""

import collections
import contextlib
import os
import random
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _fuzz  # noqa: E402
from _runner import run_tests, skip  # noqa: E402
import epcomm  # noqa: E402
from epcomm import _low_latency, buffer as buffer_module  # noqa: E402
from epcomm.handle import DispatchHandle, HandleMeta, LowLatencyHandle  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

SEED = int(os.environ.get("EPCOMM_FUZZ_SEED", random.randrange(1 << 30)))
CASES = int(os.environ.get("EPCOMM_FUZZ_CASES", 600))


# ---------------------------------------------------------------------------- CPU stand-ins
class FakeTensor:
    """What the Python layer reads of a tensor (duck typing, no torch)."""

    def __init__(self, shape, dtype, device=0, strided=False):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        strides, acc = [], 2 if strided else 1
        for n in reversed(self.shape):
            strides.insert(0, acc)
            acc *= max(n, 1)
        self._strides = tuple(strides)

    def data_ptr(self):
        return 0x10000

    def stride(self, dim=None):
        return self._strides if dim is None else self._strides[dim]

    def dim(self):
        return len(self.shape)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]


class CpuEnv:
    """Valid arguments for every call of a 2-rank group, as FakeTensors; handles made up to be
    consistent (the core is never reached)."""

    def __init__(self, seed, R=2):
        self.rng, self.R, self.rank = random.Random(seed), R, 0
        T, H, K, self.E = 24, 256, 4, 8 * R
        rows = 30
        f = self.make
        self.topk, self.x, self.weights = f((T, K), "i64"), f((T, H), "bf16"), f((T, K), "f32")
        self.x8, self.scales = f((T, H), "fp8"), f((T, H // 128), "f32")
        self.layout = dict(num_tokens_per_rank=f((R,), "i32"), is_token_in_rank=f((T, R), "bool"),
                           num_tokens_per_expert=f((self.E,), "i32"))
        self.handle = DispatchHandle(f((R, R), "i32"), f((R, 10), "i32"), f((rows,), "i32"), f((T, R), "bool"),
                                     HandleMeta(rows, rows, 1, 32, T, self.E))
        self.y, self.recv_weights, self.bias = f((rows, H), "bf16"), f((rows, K), "f32"), f((T, H), "bf16")
        self.tmax, self.ll_hidden, self.ll_E = 16, 256, 4 * R
        EL, RT = self.ll_E // R, R * self.tmax
        self.ll_x, self.ll_topk, self.ll_weights = f((8, 256), "bf16"), f((8, K), "i64"), f((8, K), "f32")
        self.ll_y = f((EL, RT, 256), "bf16")
        self.ll_handle = LowLatencyHandle(f((EL, RT), "i32"), f((EL, R), "i64"), self.tmax, 256, self.ll_E, 0)
        self.mask_status = f((R,), "i32")

    def make(self, shape, dtype, strided=False, cpu=False):
        return FakeTensor(shape, dtype, device="cpu" if cpu else 0, strided=strided)

    @staticmethod
    def shape_of(t):
        return tuple(t.shape)

    @staticmethod
    def dtype_object(name):
        return _StubTorch.bfloat16

    def foreign_ll_handle(self):
        return None  # needs a second real buffer (GPU part)

    def stale_ll_handle(self):
        return None


class _StubDtype:
    def __init__(self, name):
        self.name = name


class _StubTorch:
    """Stands in for torch inside the Python layer: dtypes are names, allocation reaches the core."""
    dtype = _StubDtype
    bfloat16, float32, int32, int64, bool = (_StubDtype(n) for n in ("bf16", "f32", "i32", "i64", "bool"))
    float8_e4m3fn, uint8 = _StubDtype("fp8"), _StubDtype("u8")

    @staticmethod
    def empty(*args, **kwargs):
        raise _fuzz.ReachedCore()

    empty_like = empty_strided = zeros = empty


class _CoreStandIn:
    """Every method of the C++ Runtime: reaching it is what a core-visible break may do."""
    max_tokens_per_rank = 4096

    def __getattr__(self, name):
        def reached(*args, **kwargs):
            raise _fuzz.ReachedCore()
        return reached


def _cpu_buffer(runtime, R):
    b = object.__new__(epcomm.Buffer)
    b.runtime, b.group_size, b.rank = runtime, R, 0
    b._device = types.SimpleNamespace(type="cpu", index=None)
    b._num_nodes, b._chunk_offset_strides, b._default_configs, b._ll_shapes = 1, {}, {}, set()
    b._max_recv_rows = R * 4096
    b._recent_rows = collections.deque(maxlen=epcomm.Buffer.RESERVE_WINDOW)
    return b


@contextlib.contextmanager
def _stub_torch():
    # The output tensors come from epcomm._alloc.empty (imported by name into both modules).
    saved = buffer_module.torch, _low_latency.torch, buffer_module.empty, _low_latency.empty
    buffer_module.torch = _low_latency.torch = _StubTorch
    buffer_module.empty = _low_latency.empty = _StubTorch.empty
    try:
        yield
    finally:
        buffer_module.torch, _low_latency.torch, buffer_module.empty, _low_latency.empty = saved


# ---------------------------------------------------------------------------- CPU tests
def test_fuzz_python_layer():
    """600 seeded broken calls over the Python layer (see the module docstring)."""
    print(f"epcomm fuzz (CPU): seed {SEED} (EPCOMM_FUZZ_SEED), {CASES} cases")
    env = CpuEnv(SEED)
    buf = _cpu_buffer(_CoreStandIn(), env.R)
    failures, tally = [], collections.Counter()
    num_sms = epcomm.Buffer.num_sms
    with _stub_torch():
        for case in _fuzz.draw_cases(env, CASES, SEED):
            outcome, detail = _fuzz.run_case(buf, env, case)
            visible = case[4]
            tally[outcome] += 1
            if outcome == "bad" or (outcome == "core" and visible):
                failures.append(f"{_fuzz.describe(case)}: {detail or 'reached the core; the Python layer must refuse it'}")
    epcomm.Buffer.num_sms = num_sms
    print(f"epcomm fuzz (CPU): {dict(tally)}")
    assert len(set(map(lambda c: _fuzz.describe(c), _fuzz.draw_cases(env, CASES, SEED)))) >= 150, "too few distinct cases"
    assert not failures, f"seed {SEED}: {len(failures)} of {CASES} cases failed:\n  " + "\n  ".join(sorted(set(failures)))


def test_fuzz_calls_after_destroy():
    """Every call of a destroyed buffer raises RuntimeError saying so, whatever its arguments."""
    env = CpuEnv(SEED)
    gone = _cpu_buffer(None, env.R)
    failures = []
    with _stub_torch():
        for call in _fuzz.calls():
            if call.static:
                continue
            try:
                getattr(gone, call.method)(**call.valid(env))
                failures.append(f"{call.name}: no error")
            except RuntimeError as e:
                if "destroy" not in str(e):
                    failures.append(f"{call.name}: {e}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------- GPU test
def _gpu_count():
    try:
        return torch.cuda.device_count() if torch is not None else 0
    except Exception:  # noqa: BLE001 -- no driver
        return 0


def test_fuzz_on_gpus():
    """The cases against the real core, one process per GPU (_fuzz_gpu.py)."""
    if torch is None or _gpu_count() == 0:
        skip("skipped (no GPU)" if torch is not None else "PyTorch is not installed")
    from _cluster import Cluster, ranks_for_tests

    import _fuzz_gpu
    os.environ.setdefault("EPCOMM_TIMEOUT_MS", "10000")  # a hang shows as an error within seconds
    R = ranks_for_tests()
    print(f"\nepcomm fuzz (GPU): {R} ranks, seed {SEED} (EPCOMM_FUZZ_SEED), {CASES} cases")
    cluster = Cluster(R, "_fuzz_gpu", _fuzz_gpu.buffer_bytes(R))
    try:
        reports = cluster.run("fuzz", timeout=900.0, seed=SEED, count=CASES)
    finally:
        cluster.close()
    print(f"epcomm fuzz (GPU): rank 0 {reports[0]}")


if __name__ == "__main__":
    run_tests(globals(), ["test_fuzz_python_layer", "test_fuzz_calls_after_destroy"] +
              (["test_fuzz_on_gpus"] if "--gpu" in sys.argv else []))
