"""The `deep_ep` compatibility package (python/deep_ep_compat) as the frameworks use it, without a GPU:
imports in fresh processes (a subprocess, a multiprocessing spawn child, without PyTorch), the names
DeepEP 1.x has, stepping aside for a real DeepEP, the pip install, and every call the client files
make checked against the signatures (vLLM's all2all.py / deepep_ht.py / deepep_ll.py, SGLang's
token_dispatcher/deepep.py, Megatron-LM's fused_a2a.py; python/README.md lists them), Config by
DeepEP's keyword names, the size hints, and where PyTorch is installed (a CPU build is enough) the
Python layer's FP8 scale forms over a host stand-in for the core. The GPU side is test_clients.py.

    PYTHONPATH=python python tests/python/test_deep_ep_compat.py     (or: python -m pytest ...)
"""

import inspect
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
PYTHON_DIR = os.path.join(ROOT, "python")
COMPAT_DIR = os.path.join(PYTHON_DIR, "deep_ep_compat")
sys.path.insert(0, HERE)
if COMPAT_DIR not in sys.path:
    sys.path.insert(0, COMPAT_DIR)

from _runner import raises, run_tests, skip  # noqa: E402

import deep_ep  # noqa: E402
import deep_ep.utils  # noqa: E402
import epcomm  # noqa: E402
from epcomm import _epcomm  # noqa: E402

try:
    import torch
except ImportError:
    torch = None


def fresh_python(code, extra_path=(), env=None, block_torch=False):
    """Runs `code` in a fresh interpreter whose PYTHONPATH is only epcomm's python/ directory, the
    compatibility package and `extra_path` (what a framework's worker process would see); returns
    (returncode, stdout + stderr). block_torch: PyTorch cannot be imported there (as on CI)."""
    prelude = ""
    if block_torch:
        prelude = textwrap.dedent("""
            import sys
            class _NoTorch:
                def find_spec(self, name, path=None, target=None):
                    if name == "torch" or name.startswith("torch."):
                        raise ImportError("PyTorch is hidden in this test")
                    return None
            sys.meta_path.insert(0, _NoTorch())
        """)
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EPCOMM_DEEP_EP")}
    full_env["PYTHONPATH"] = os.pathsep.join([PYTHON_DIR, COMPAT_DIR, *extra_path])
    full_env["PYTHONDONTWRITEBYTECODE"] = "1"
    full_env.update(env or {})
    p = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=tempfile.gettempdir(),
                       env=full_env, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


# ---------------------------------------------------------------------------- imports
def test_import_in_a_fresh_process():
    rc, out = fresh_python("""
        import deep_ep, deep_ep.utils
        print(deep_ep.Buffer, deep_ep.utils.EventOverlap)
        from deep_ep import Buffer, Config
        from deep_ep.utils import EventHandle, EventOverlap
        import epcomm
        assert Buffer is epcomm.Buffer and Config is epcomm.Config and EventOverlap is epcomm.EventOverlap
        print("version", deep_ep.__version__, deep_ep.__backend__)
    """)
    assert rc == 0, out
    assert "<class 'epcomm.buffer.Buffer'> <class 'epcomm.event.EventOverlap'>" in out, out
    assert f"version 1.2.1+epcomm.{epcomm.__version__} epcomm" in out, out


def test_import_without_torch_then_buffer_says_why():
    """Without PyTorch (CI) the import works and names resolve; making a Buffer or an event raises
    RuntimeError naming PyTorch (DeepEP itself would fail at `import torch`; frameworks always have
    it, and a probe that imports deep_ep gets a true answer either way)."""
    rc, out = fresh_python("""
        import deep_ep, deep_ep.utils, deep_ep.buffer
        print(deep_ep.Buffer, deep_ep.utils.EventOverlap, deep_ep.topk_idx_t)
        for make in (lambda: deep_ep.Buffer(None), deep_ep.Buffer.capture, deep_ep.utils.EventHandle):
            try:
                make()
            except RuntimeError as e:
                assert "PyTorch" in str(e), e
            else:
                raise AssertionError("no RuntimeError without PyTorch")
        print("ok without torch")
    """, block_torch=True)
    assert rc == 0, out
    assert "ok without torch" in out and "<class 'epcomm.buffer.Buffer'>" in out and "None" in out, out


def _spawned_import(queue):
    import deep_ep as d
    import deep_ep.utils as u

    queue.put((repr(d.Buffer), repr(u.EventOverlap), d.__backend__))


def test_import_in_a_spawned_worker():
    """What frameworks do: a multiprocessing 'spawn' child (the parent's environment, a fresh
    interpreter) imports deep_ep."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([PYTHON_DIR, COMPAT_DIR])
    try:
        queue = ctx.Queue()
        p = ctx.Process(target=_spawned_import, args=(queue,))
        p.start()
        got = queue.get(timeout=120)
        p.join(timeout=60)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    assert p.exitcode == 0
    assert got == ("<class 'epcomm.buffer.Buffer'>", "<class 'epcomm.event.EventOverlap'>", "epcomm"), got


def test_names_deepep_1x_has():
    from epcomm.event import EventHandle

    assert deep_ep.Buffer is epcomm.Buffer and deep_ep.Config is epcomm.Config
    assert deep_ep.EventOverlap is epcomm.EventOverlap and deep_ep.EventHandle is EventHandle
    assert deep_ep.topk_idx_t is epcomm.topk_idx_t
    assert deep_ep.utils.EventOverlap is epcomm.EventOverlap and deep_ep.utils.EventHandle is EventHandle
    from deep_ep import buffer as deep_ep_buffer

    assert deep_ep_buffer.Buffer is epcomm.Buffer and deep_ep_buffer.Config is epcomm.Config
    assert deep_ep.utils.check_nvlink_connections(None) is None
    assert set(deep_ep.__all__) == {"Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t"}
    # DeepEP 2.x / hybrid-EP names are absent: vLLM's has_deep_ep_v2() and Megatron's HybridEP probe
    # must say no.
    assert not hasattr(deep_ep, "ElasticBuffer")
    raises(ImportError, lambda: exec("from deep_ep import HybridEPBuffer", {}), "HybridEPBuffer")
    assert deep_ep.__version__.startswith("1.2.1+epcomm.")


def _fake_deep_ep(where, marker):
    pkg = os.path.join(where, "deep_ep")
    os.makedirs(pkg)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write(f"MARK = {marker!r}\n")
    with open(os.path.join(pkg, "utils.py"), "w") as f:
        f.write("MARK = 'real utils'\n")


def test_steps_aside_for_a_real_deep_ep():
    """A real DeepEP further along sys.path is loaded instead (with a warning), submodules included;
    EPCOMM_DEEP_EP=1 keeps epcomm's. A second copy of the compatibility package is not mistaken for
    DeepEP."""
    with tempfile.TemporaryDirectory() as tmp:
        _fake_deep_ep(tmp, "real")
        code = """
            import warnings
            warnings.simplefilter("always")
            import deep_ep, deep_ep.utils
            print("MARK", getattr(deep_ep, "MARK", "epcomm"), getattr(deep_ep.utils, "MARK", "epcomm"))
        """
        rc, out = fresh_python(code, extra_path=[tmp])
        assert rc == 0 and "MARK real real utils" in out and "steps aside" in out, out
        rc, out = fresh_python(code, extra_path=[tmp], env={"EPCOMM_DEEP_EP": "1"})
        assert rc == 0 and "MARK epcomm epcomm" in out, out
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(os.path.join(COMPAT_DIR, "deep_ep"), os.path.join(tmp, "deep_ep"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        rc, out = fresh_python("""
            import deep_ep
            print("backend", deep_ep.__backend__)
        """, extra_path=[tmp])
        assert rc == 0 and "backend epcomm" in out and "steps aside" not in out, out


def _installer():
    """An interpreter that can build the package offline (pip, and setuptools with wheel support:
    the wheel package, or setuptools >= 70.1), or None."""
    probe = ("import setuptools, pip\n"  # setuptools first (Debian's distutils shim insists)
             "try:\n    import wheel\nexcept ImportError:\n"
             "    v = tuple(int(x) for x in setuptools.__version__.split('.')[:2])\n"
             "    assert v >= (70, 1)\n")
    seen = []
    for exe in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not exe or not os.path.exists(exe) or os.path.realpath(exe) in seen:
            continue
        seen.append(os.path.realpath(exe))
        if subprocess.run([exe, "-c", probe], capture_output=True).returncode == 0:
            return exe
    return None


def test_pip_install_offline():
    """`pip install --no-build-isolation --no-deps ./python/deep_ep_compat` with no network (into a
    target directory here), then the import from there in a fresh process."""
    exe = _installer()
    if exe is None:
        skip("no interpreter here has pip and setuptools that can build wheels offline")
    with tempfile.TemporaryDirectory() as tmp:
        src, target = os.path.join(tmp, "src"), os.path.join(tmp, "site")
        shutil.copytree(COMPAT_DIR, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
        p = subprocess.run([exe, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                            "--target", target, src], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert os.path.isfile(os.path.join(target, "deep_ep", "__init__.py"))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = os.pathsep.join([target, PYTHON_DIR])
        q = subprocess.run([sys.executable, "-c", "import deep_ep, deep_ep.utils; print(deep_ep.__file__, "
                            "deep_ep.Buffer, deep_ep.utils.EventOverlap)"], env=env, cwd=tmp,
                           capture_output=True, text=True, timeout=120)
        assert q.returncode == 0, q.stdout + q.stderr
        assert q.stdout.startswith(os.path.join(target, "deep_ep")), q.stdout
        assert "epcomm.buffer.Buffer" in q.stdout


# ---------------------------------------------------------------------------- Config and hints
SGLANG_DEEPEP_CONFIG = {  # the shape of SGLang's --deepep-config JSON (one of its tuned files)
    "normal_dispatch": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 16, "num_max_nvl_chunked_recv_tokens": 512,
                        "num_max_rdma_chunked_send_tokens": 16, "num_max_rdma_chunked_recv_tokens": 128},
    "normal_combine": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 6, "num_max_nvl_chunked_recv_tokens": 256,
                       "num_max_rdma_chunked_send_tokens": 16, "num_max_rdma_chunked_recv_tokens": 64},
}


def test_config_by_deepep_keywords():
    d = deep_ep.Config(**SGLANG_DEEPEP_CONFIG["normal_dispatch"])
    assert (d.num_sms, d.num_max_nvl_chunked_send_tokens, d.num_max_nvl_chunked_recv_tokens,
            d.num_max_rdma_chunked_send_tokens, d.num_max_rdma_chunked_recv_tokens) == (24, 16, 512, 16, 128)
    assert (d.nvl_chunk_size, d.nvl_buffer_size, d.rdma_chunk_size, d.rdma_buffer_size) == (16, 512, 16, 128)
    c = deep_ep.Config(**SGLANG_DEEPEP_CONFIG["normal_combine"])
    assert c.chunk_tokens == 8 and c.ring_slots == 16  # 6 -> 8 tokens per chunk; 256 / 8 = 32 -> 16 slots
    # Positionally in DeepEP's order (the vLLM/Megatron tables), and mixed with epcomm's names.
    p = deep_ep.Config(20, 6, 256, 6, 128)
    assert (p.num_sms, p.num_max_nvl_chunked_send_tokens, p.num_max_nvl_chunked_recv_tokens) == (20, 6, 256)
    m = deep_ep.Config(20, num_max_nvl_chunked_send_tokens=24, num_max_nvl_chunked_recv_tokens=288)
    assert (m.nvl_chunk_size, m.nvl_buffer_size, m.rdma_chunk_size, m.rdma_buffer_size) == (24, 288, 16, 128)
    assert repr(pickle.loads(pickle.dumps(d))) == repr(d)
    raises(ValueError, lambda: deep_ep.Config(24, 8, num_max_nvl_chunked_send_tokens=8), "name the same field")
    raises(ValueError, lambda: deep_ep.Config(num_sms=24, num_max_nvl_chunked_recv_tokens=0), "nvl_buffer_size")
    raises(TypeError, lambda: deep_ep.Config(num_sms=24, num_max_chunked_tokens=3))
    default = deep_ep.Config()
    assert (default.num_sms, default.nvl_chunk_size, default.nvl_buffer_size) == (24, 32, 128)


def test_config_says_what_it_ignores_at_debug_level():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("epcomm")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    try:
        logger.setLevel(logging.INFO)
        deep_ep.Config(**SGLANG_DEEPEP_CONFIG["normal_combine"])
        assert records == [], "nothing below DEBUG"
        logger.setLevel(logging.DEBUG)
        deep_ep.Config(**SGLANG_DEEPEP_CONFIG["normal_combine"])
        deep_ep.Config(24, 32, 128)  # nothing to say
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(records) == 1, records
    assert "chunks of 6 tokens become 8" in records[0] and "16 slots" in records[0], records
    assert "RDMA chunk sizes are not used" in records[0], records


def test_size_hints_as_clients_use_them():
    """Megatron and SGLang size a buffer with the max over the dispatch and combine configs' hints;
    vLLM asks get_dispatch_config only for DeepEP's table of rank counts. Inside one NVLink domain
    the RDMA hint is 0 (as DeepEP's), so no network memory is asked for."""
    for R in (2, 4, 8, 16, 24, 32, 64, 128, 144, 160):  # vLLM's available_rank_configs
        for cfg in (deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R)):
            assert isinstance(cfg, deep_ep.Config) and cfg.num_sms == deep_ep.Buffer.num_sms
    hidden_bytes = 7168 * max(2, 2)  # Megatron's get_hidden_bytes for BF16
    for R, rpn in ((8, 8), (4, 8), (1, 8), (16, 8), (16, 4)):
        nvl = rdma = 0
        for cfg in (deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R)):
            nvl = max(cfg.get_nvl_buffer_size_hint(hidden_bytes, R), nvl)
            rdma = max(cfg.get_rdma_buffer_size_hint(hidden_bytes, R, ranks_per_node=rpn), rdma)
        assert nvl > 0
        assert (rdma == 0) == (R <= rpn), (R, rpn, rdma)
    # Without ranks_per_node: EPCOMM_RANKS_PER_NODE, else the visible GPUs, else 8.
    domain = deep_ep.Config.nvlink_domain_ranks()
    want = int(os.environ.get("EPCOMM_RANKS_PER_NODE", "0")) or _epcomm.device_count() or 8
    assert domain == want, (domain, want)
    cfg = deep_ep.Buffer.get_dispatch_config(domain)
    assert cfg.get_rdma_buffer_size_hint(hidden_bytes, domain) == 0
    assert cfg.get_rdma_buffer_size_hint(hidden_bytes, 2 * domain) > 0
    rc, out = fresh_python("""
        import deep_ep
        c = deep_ep.Buffer.get_dispatch_config(8)
        print(deep_ep.Config.nvlink_domain_ranks(), c.get_rdma_buffer_size_hint(14336, 2), c.get_rdma_buffer_size_hint(14336, 8) > 0)
    """, env={"EPCOMM_RANKS_PER_NODE": "2"})
    assert rc == 0 and out.split() == ["2", "0", "True"], out
    raises(ValueError, lambda: cfg.get_rdma_buffer_size_hint(1024, 4, ranks_per_node=-1), "ranks_per_node")
    # The low-latency hint by keywords (vLLM) and positionally (SGLang).
    kw = deep_ep.Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank=128, hidden=7168,
                                                       num_ranks=8, num_experts=256)
    assert kw == deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) > 0


def test_set_num_sms_as_clients_do():
    old = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(20)  # Megatron's default, vLLM's HT default
        assert epcomm.Buffer.num_sms == 20 and deep_ep.Buffer.get_dispatch_config(8).num_sms == 20
    finally:
        deep_ep.Buffer.set_num_sms(old)


def test_default_timeout_is_deepeps_order():
    """EPCOMM_TIMEOUT_MS defaults to 100 s (DeepEP's kernels wait about that long), so a first call
    that meets slow-starting peers is not an error; the variable still overrides it."""
    rc, out = fresh_python("""
        from epcomm import _epcomm
        print(_epcomm.env_value("EPCOMM_TIMEOUT_MS"))
    """)
    assert rc == 0 and out.split()[-1] == "100000", out
    rc, out = fresh_python("""
        from epcomm import _epcomm
        print(_epcomm.env_value("EPCOMM_TIMEOUT_MS"))
    """, env={"EPCOMM_TIMEOUT_MS": "2500"})
    assert rc == 0 and out.split()[-1] == "2500", out


# ---------------------------------------------------------------------------- the clients' calls
class _Tensor:
    """Stands in for a tensor where only binding is checked."""


T = _Tensor()
HANDLE = object()
EVENT = object()

# Each client's calls exactly as its file makes them: (what, method, args, kwargs). The arguments are
# bound to the Buffer's signature: every keyword must exist, positions must line up.
CLIENT_CALLS = [
    # Megatron-LM megatron/core/transformer/moe/fused_a2a.py
    ("megatron get_buffer", "__init__", (None, 1 << 20, 0), {}),
    ("megatron layout", "get_dispatch_layout", (T, 64),
     dict(previous_event=EVENT, async_finish=True, allocate_on_comm_stream=True)),
    ("megatron dispatch", "dispatch", (T,),
     dict(topk_idx=T, topk_weights=T, num_tokens_per_rank=T, num_tokens_per_rdma_rank=None, is_token_in_rank=T,
          num_tokens_per_expert=T, previous_event=EVENT, async_finish=True, allocate_on_comm_stream=True)),
    ("megatron dispatch backward", "combine", (T, HANDLE),
     dict(topk_weights=T, previous_event=EVENT, async_finish=True, allocate_on_comm_stream=True)),
    ("megatron combine", "combine", (T,),
     dict(handle=HANDLE, async_finish=True, previous_event=EVENT, allocate_on_comm_stream=True)),
    ("megatron combine backward", "dispatch", (T,),
     dict(handle=HANDLE, previous_event=EVENT, async_finish=True, allocate_on_comm_stream=True)),
    # vLLM vllm/distributed/device_communicators/all2all.py
    ("vllm HT buffer", "__init__", (),
     dict(group=None, num_nvl_bytes=1 << 30, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=1,
          explicitly_destroy=True)),
    ("vllm LL buffer", "__init__", (),
     dict(group=None, num_nvl_bytes=1 << 30, num_rdma_bytes=1 << 30, low_latency_mode=True, num_qps_per_rank=8,
          allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=True, enable_shrink=True)),
    ("vllm LL rdma hint", "get_low_latency_rdma_size_hint", (),
     dict(num_max_dispatch_tokens_per_rank=128, hidden=7168, num_ranks=8, num_experts=256)),
    ("vllm mask query", "low_latency_query_mask_buffer", (T,), {}),
    ("vllm clean buffers", "get_local_buffer_tensor", (), dict(dtype=None, use_rdma_buffer=True)),
    ("vllm clean mask", "low_latency_clean_mask_buffer", (), {}),
    ("vllm destroy", "destroy", (), {}),
    # vLLM prepare_finalize/deepep_ht.py
    ("vllm HT layout", "get_dispatch_layout", (),
     dict(topk_idx=T, num_experts=64, previous_event=None, async_finish=False, allocate_on_comm_stream=False)),
    ("vllm HT dispatch", "dispatch", (),
     dict(x=(T, T), handle=None, num_tokens_per_rank=T, num_tokens_per_rdma_rank=None, is_token_in_rank=T,
          num_tokens_per_expert=T, topk_idx=T, topk_weights=T, expert_alignment=1, config=None,
          previous_event=None, async_finish=True, allocate_on_comm_stream=False)),
    ("vllm HT combine", "combine", (),
     dict(x=T, handle=HANDLE, topk_weights=None, config=None, previous_event=None, async_finish=True,
          allocate_on_comm_stream=False)),
    # vLLM prepare_finalize/deepep_ll.py
    ("vllm LL dispatch", "low_latency_dispatch", (T, T, 128, 256),
     dict(use_fp8=True, round_scale=True, use_ue8m0=True, async_finish=False, return_recv_hook=True)),
    ("vllm LL combine", "low_latency_combine", (T, T, T, HANDLE),
     dict(async_finish=False, zero_copy=False, return_recv_hook=True, out=T)),
    # SGLang python/sglang/srt/layers/moe/token_dispatcher/deepep.py
    ("sglang buffer", "__init__", (None, 1 << 30, 1 << 30),
     dict(low_latency_mode=True, num_qps_per_rank=32, allow_mnnvl=True)),
    ("sglang clean", "clean_low_latency_buffer", (128, 7168, 256), {}),
    ("sglang layout", "get_dispatch_layout", (T, 256),
     dict(previous_event=EVENT, async_finish=True, allocate_on_comm_stream=True)),
    ("sglang dispatch", "dispatch", ((T, T),),
     dict(topk_idx=T, topk_weights=T, num_tokens_per_rank=T, num_tokens_per_rdma_rank=None, is_token_in_rank=T,
          num_tokens_per_expert=T, previous_event=EVENT, async_finish=True, allocate_on_comm_stream=True,
          expert_alignment=128, config=None)),
    ("sglang combine", "combine", (T, HANDLE),
     dict(async_finish=True, previous_event=EVENT, allocate_on_comm_stream=True, config=None)),
    ("sglang LL dispatch", "low_latency_dispatch", (T, T, 128, 256),
     dict(use_fp8=True, async_finish=True, return_recv_hook=False, round_scale=False, use_ue8m0=False)),
    ("sglang LL combine", "low_latency_combine", (),
     dict(x=T, topk_idx=T, topk_weights=T, handle=HANDLE, async_finish=False, return_recv_hook=True)),
]

# What frameworks pass that only a patched DeepEP takes (not DeepEP 1.x): refused by epcomm as by
# DeepEP 1.x, with TypeError. SGLang: NVFP4 dispatch and single-batch overlap; vLLM: NVFP4 dispatch.
FORK_ONLY_CALLS = [
    ("low_latency_dispatch", (T, T, 128, 256), dict(use_nvfp4=True)),
    ("low_latency_dispatch", (T, T, 128, 256), dict(x_global_scale=T)),
    ("low_latency_combine", (T, T, T, HANDLE), dict(overlap=True, packed_recv_count=T, comp_signal=T, block_m=64,
                                                     threshold=1, num_sms=3)),
]


def test_client_calls_bind_to_the_signatures():
    for what, method, args, kwargs in CLIENT_CALLS:
        fn = getattr(deep_ep.Buffer, method)
        sig = inspect.signature(fn)
        static = isinstance(inspect.getattr_static(deep_ep.Buffer, method), staticmethod)
        try:
            sig.bind(*(() if static else (object(),)), *args, **kwargs)
        except TypeError as e:
            raise AssertionError(f"{what}: Buffer.{method}{sig} does not take the client's call: {e}") from e
    for method, args, kwargs in FORK_ONLY_CALLS:
        sig = inspect.signature(getattr(deep_ep.Buffer, method))
        raises(TypeError, lambda: sig.bind(object(), *args, **kwargs))


def test_client_attributes():
    """Attributes the clients read from a Buffer: Megatron `group`, `num_nvl_bytes`, `num_rdma_bytes`;
    SGLang `group_size`, `low_latency_mode`; both `Buffer.num_sms`. Set by the constructor (checked
    on a buffer built over stand-ins, as test_cpu_arguments.py does)."""
    import types

    from epcomm import buffer as buffer_module

    class _Runtime:
        num_nodes, max_tokens_per_rank = 1, 4096

        def __init__(self, *args, **kwargs):
            pass

    class _Stream:
        def __init__(self, device=None):
            self.cuda_stream = 0x10

    def all_gather_object(objects, obj, group):
        objects[:] = [obj] * len(objects)

    class _Group:
        def rank(self):
            return 0

        def size(self):
            return 1

    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_available=lambda: True, current_device=lambda: 0, Stream=_Stream),
        device=lambda kind, index: (kind, index),
        distributed=types.SimpleNamespace(all_gather_object=all_gather_object))
    saved = buffer_module.require_torch, _epcomm.Runtime, _epcomm.get_unique_id
    buffer_module.require_torch = lambda what: fake_torch
    _epcomm.Runtime, _epcomm.get_unique_id = _Runtime, lambda: b"u" * 128
    try:
        group = _Group()
        b = deep_ep.Buffer(group, 1 << 20, 0, low_latency_mode=True, num_qps_per_rank=32, allow_mnnvl=True)
    finally:
        buffer_module.require_torch, _epcomm.Runtime, _epcomm.get_unique_id = saved
    assert b.group is group and b.num_nvl_bytes == 1 << 20 and b.num_rdma_bytes == 0
    assert b.group_size == 1 and b.low_latency_mode is True and b.rank == 0
    assert isinstance(deep_ep.Buffer.num_sms, int)


# ---------------------------------------------------------------------------- FP8 scale forms (PyTorch on the CPU)
class _ScaleRuntime:
    """Runtime stand-in for one rank on host memory that records what the Python layer passes for
    FP8 scales and moves the words itself (every token to this rank), as the core would."""

    def __init__(self):
        self.seen = []

    def chunk_offset_stride(self, config):
        return 4

    def dispatch_prepare(self, x, x_scales, topk_idx, topk_weights, ntpr, in_rank, ntpe, alignment, num_worst_tokens,
                         config, rank_prefix_matrix, chunk_offset, stream, previous_event, async_finish, reserved):
        self.seen.append(("prepare", x_scales.dtype, tuple(x_scales.shape), tuple(x_scales.stride())))
        runtime = self

        class Call:
            num_rows, ran, num_recv_tokens_per_expert = x.size(0), False, [x.size(0)]
            meta = (x.size(0), x.size(0), 1, 32, x.size(0), 1)

            def run(self, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx):
                from _cpu_stand_ins import host_view as _host_view

                runtime.seen.append(("run", recv_x_scales))
                S = x_scales.size(1)
                out = _host_view(recv_x_scales, (x.size(0), S), x_scales.dtype)
                out.copy_(x_scales)
                _host_view(recv_x, tuple(x.shape), x.dtype).copy_(x)
                return None

        return Call()

    def cached_dispatch(self, x, x_scales, rpm, co, src, in_rank, meta, recv_x, recv_x_scales, config, stream, prev,
                        async_finish):
        self.seen.append(("cached", x_scales.dtype, recv_x_scales.dtype, tuple(recv_x_scales.shape),
                          recv_x_scales.is_contiguous()))
        recv_x_scales.copy_(x_scales)
        return None


def test_fp8_scale_forms_through_the_python_layer():
    """SGLang's packed UE8M0 scales (int32, [T, ceil(G/4)], column-major with the token stride
    rounded up to 4) and vLLM's float32 [T, G] reach the core as they are, and come back [rows, S]
    row-major in their own dtype, from dispatch and cached dispatch."""
    if torch is None:
        skip("PyTorch is not installed")
    if not hasattr(torch, "float8_e4m3fn"):
        skip("PyTorch without float8_e4m3fn")
    import _reference as ref
    from _cpu_stand_ins import fake_buffer as _fake_buffer

    T, H, K, E = 6, 1024, 2, 4
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, 256, (T, H), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    topk = ref.random_topk(T, K, E, g, drop=0.0, nowhere=0.0)
    ntpr, ntpe, in_rank = ref.layout(topk, E, 1)
    G = H // 128
    W = (G + 3) // 4
    aligned = (T + 3) // 4 * 4
    ue8m0 = torch.randint(-2 ** 31, 2 ** 31 - 1, (W, aligned), generator=g, dtype=torch.int32).t()[:T]
    float_rows = torch.rand(T, G, generator=g)
    for scales in (ue8m0, float_rows, float_rows.t().contiguous().t()):
        rt = _ScaleRuntime()
        b = _fake_buffer(rt, num_ranks=1, device=torch.device("cpu"))
        b.reserve_recv_rows = False
        recv, _, _, _, handle, _ = b.dispatch((x, scales), num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                              num_tokens_per_expert=ntpe, topk_idx=topk, expert_alignment=128)
        assert rt.seen[0] == ("prepare", scales.dtype, tuple(scales.shape), tuple(scales.stride())), rt.seen
        rx, rs = recv
        assert rs.dtype == scales.dtype and tuple(rs.shape) == (T, scales.size(1)) and rs.is_contiguous()
        assert torch.equal(rs, scales) and torch.equal(rx.view(torch.uint8), x.view(torch.uint8))
        recv2, *_ = b.dispatch((x, scales), handle=handle)
        kind, in_dtype, out_dtype, shape, contiguous = rt.seen[-1]
        assert (kind, in_dtype, out_dtype, shape, contiguous) == ("cached", scales.dtype, scales.dtype,
                                                                  (T, scales.size(1)), True)
        assert torch.equal(recv2[1], scales)


# ---------------------------------------------------------------------------- without pytest
if __name__ == "__main__":
    run_tests(globals())
