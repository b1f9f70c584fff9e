"""Bad input for every public call of epcomm.Buffer: a mutation fuzzer, without torch.

Each case takes one public call with valid arguments (an Env makes them: real tensors on a GPU,
FakeTensors on the CPU), breaks exactly one argument in one way (wrong dtype, shape, device,
strides, None, a non-tensor, a negative or huge integer, a string for a flag, a damaged or foreign
handle, ...) and makes the call. The rule: a Python exception (ValueError, TypeError or
RuntimeError) whose message names the broken argument (or a name listed beside it), and nothing
else: no crash, no hang, no other exception type. test_fuzz.py runs the cases over the Python layer
with a stand-in core; _fuzz_gpu.py runs them on GPUs against the real core, with verified calls
between batches (a bad call must not corrupt a later one).

Cases are drawn from a seeded generator (print the seed; EPCOMM_FUZZ_SEED repeats a run).
"""

import random
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

DTYPES = ("bf16", "fp8", "f32", "i32", "i64", "bool", "u8", "f16")


class ReachedCore(Exception):
    """Raised by the CPU stand-ins where the call would reach the C++ core or allocate."""


# ---------------------------------------------------------------------------- argument kinds
class TensorArg:
    """A tensor argument: its valid dtype(s), whether any strides are accepted, which dimensions
    other arguments fix (changing one of them must be refused), and whether it may be None."""

    def __init__(self, dtypes: Sequence[str], any_strides=False, fixed_dims=(), optional=False, shape=None):
        self.dtypes, self.any_strides, self.fixed_dims, self.optional = tuple(dtypes), any_strides, fixed_dims, optional
        self.shape = shape  # env -> the valid shape, for an optional argument the valid call leaves out

    def mutations(self, env, value) -> List[Tuple[str, Callable[[], Any], bool]]:
        """(what, make the broken value, visible to the Python layer) for this argument."""
        shape = env.shape_of(value) if value is not None else tuple(self.shape(env))
        out = [("a list instead of a tensor", lambda: [1, 2, 3], True),
               ("an extra dimension", lambda: env.make(shape + (1,), self.dtypes[0]), False)]
        if len(shape) > 1:
            out.append(("a dimension fewer", lambda: env.make(shape[:-1], self.dtypes[0]), False))
        if not self.optional:
            out.append(("None", lambda: None, True))
        wrong = [d for d in DTYPES if d not in self.dtypes]
        for d in env.rng.sample(wrong, 2):
            out.append((f"dtype {d}", lambda d=d: env.make(shape, d), False))
        fixed = self.fixed_dims(env) if callable(self.fixed_dims) else self.fixed_dims
        for dim in fixed:
            for delta in (1, -1):
                if shape[dim] + delta >= 0:
                    bad = shape[:dim] + (shape[dim] + delta,) + shape[dim + 1:]
                    out.append((f"dim {dim} {shape[dim]} -> {shape[dim] + delta}",
                                lambda bad=bad: env.make(bad, self.dtypes[0]), False))
        if not self.any_strides and shape and shape[-1] > 1:
            out.append(("strided (every other element)", lambda: env.make(shape, self.dtypes[0], strided=True), False))
        out.append(("on the CPU", lambda: env.make(shape, self.dtypes[0], cpu=True), False))
        return out


class IntArg:
    """An integer in [lo, hi]; the Python layer refuses what is out of range (hi: the C++ int)."""

    def __init__(self, lo: Optional[int] = None, hi: int = (1 << 31) - 1):
        self.lo, self.hi = lo, hi

    def mutations(self, env, value):
        out = [("a float", lambda: 1.5, True), ("a string", lambda: "8", True), ("None", lambda: None, True),
               ("True", lambda: True, True)]
        if self.lo is not None:
            out.append((f"{self.lo - 1} (below {self.lo})", lambda: self.lo - 1, True))
        out.append(("-(2**40)", lambda: -(1 << 40), True))
        out.append(("2**62", lambda: 1 << 62, (1 << 62) > self.hi))
        out.append((f"{self.hi + 1} (above {self.hi})", lambda: self.hi + 1, True))
        return out


class BoolArg:
    def mutations(self, env, value):
        return [("a string", lambda: "yes", True), ("2", lambda: 2, True), ("None", lambda: None, True),
                ("a float", lambda: 0.5, True)]


class EventArg:
    def mutations(self, env, value):
        return [("an int", lambda: 42, True), ("a string", lambda: "event", True), ("a list", lambda: [], True)]


class ConfigArg:
    def mutations(self, env, value):
        return [("a string", lambda: "fast", True), ("an int", lambda: 24, True), ("a dict", lambda: {"num_sms": 24}, True)]


class HandleArg:
    """A normal-mode handle: structure (Python layer) and host facts (core)."""

    def mutations(self, env, h):
        m = h.meta
        out = [("None", lambda: None, True), ("a 3-tuple", lambda: tuple(h[:3]), True),
               ("a string", lambda: "handle", True),
               ("meta with a field too few", lambda: tuple(h[:4]) + (tuple(m[:-1]),), True)]
        for what, bad in (("num_rows + 1", m._replace(num_rows=m.num_rows + 1)),
                          ("max_chunks 10**6", m._replace(max_chunks=10 ** 6)),
                          ("chunk 0", m._replace(chunk=0)),
                          ("num_tokens + 1", m._replace(num_tokens=m.num_tokens + 1)),
                          ("num_experts 7 x R + 1", m._replace(num_experts=7 * env.R + 1) if env.R > 1 else None),
                          ("num_recv_tokens past num_rows", m._replace(num_recv_tokens=m.num_rows + 5))):
            if bad is not None:
                out.append((f"meta.{what}", lambda bad=bad: h._replace(meta=bad), False))
        out.append(("recv_src_idx of dtype i64", lambda: h._replace(recv_src_idx=env.make(
            env.shape_of(h.recv_src_idx), "i64")), False))
        out.append(("chunk_offset on the CPU", lambda: h._replace(chunk_offset=env.make(
            env.shape_of(h.chunk_offset), "i32", cpu=True)), False))
        return out


class LowLatencyHandleArg:
    def mutations(self, env, h):
        out = [("None", lambda: None, True), ("DeepEP's 5-tuple", lambda: tuple(h[:5]), True),
               ("a string", lambda: "handle", True),
               ("buffer_index 2", lambda: h._replace(buffer_index=2), False),
               ("hidden + 128", lambda: h._replace(hidden=h.hidden + 128), False),
               ("src_info of another tensor", lambda: h._replace(src_info=env.make(env.shape_of(h.src_info), "i32")),
                False),
               ("layout_range of dtype i32", lambda: h._replace(layout_range=env.make(
                   env.shape_of(h.layout_range), "i32")), False)]
        foreign = env.foreign_ll_handle()
        if foreign is not None:
            out.append(("a handle of another Buffer", lambda: foreign, False))
        stale = env.stale_ll_handle()
        if stale is not None:
            out.append(("a handle whose buffer a later dispatch took", lambda: stale, False))
        return out


# ---------------------------------------------------------------------------- the calls
class Call:
    """One public call: `valid(env)` gives its keyword arguments; `args` says how each may break;
    `names` lists the words an error about an argument may use instead of its own name."""

    def __init__(self, name: str, method: str, valid: Callable, args: Dict[str, Any],
                 names: Optional[Dict[str, Tuple[str, ...]]] = None, static=False):
        self.name, self.method, self.valid, self.args, self.names, self.static = name, method, valid, args, names or {}, static


def _fixed_experts(env):
    return (0,) if env.R > 1 else ()


def calls() -> List[Call]:
    T_ANY = TensorArg
    return [
        Call("get_dispatch_layout", "get_dispatch_layout",
             lambda e: dict(topk_idx=e.topk, num_experts=e.E),
             dict(topk_idx=T_ANY(["i64"]), num_experts=IntArg(lo=1), previous_event=EventArg(),
                  async_finish=BoolArg(), allocate_on_comm_stream=BoolArg()),
             names={"topk_idx": ("num_topk",), "num_experts": ("num_tokens_per_expert",)}),
        Call("dispatch", "dispatch",
             lambda e: dict(x=e.x, topk_idx=e.topk, topk_weights=e.weights, **e.layout),
             dict(x=T_ANY(["bf16"], fixed_dims=(0,)), num_tokens_per_rank=T_ANY(["i32"], fixed_dims=(0,)),
                  is_token_in_rank=T_ANY(["bool"], fixed_dims=(0, 1)),
                  num_tokens_per_expert=T_ANY(["i32"], fixed_dims=_fixed_experts),
                  topk_idx=T_ANY(["i64"], fixed_dims=(0, 1), optional=True),
                  topk_weights=T_ANY(["f32"], fixed_dims=(0, 1), optional=True),
                  expert_alignment=IntArg(lo=1, hi=1 << 20), num_worst_tokens=IntArg(lo=0), config=ConfigArg(),
                  previous_event=EventArg(), async_finish=BoolArg(), allocate_on_comm_stream=BoolArg()),
             # A mismatch between two arguments may be reported under either name.
             names={"x": ("hidden", "x_scales", "tokens", "is_token_in_rank", "topk_idx"),
                    "num_tokens_per_expert": ("num_experts",), "topk_idx": ("num_topk", "topk_weights"),
                    "topk_weights": ("topk", "topk_idx"), "is_token_in_rank": ("tokens", "x", "num_tokens_per_rank"),
                    "num_tokens_per_rank": ("is_token_in_rank",), "num_worst_tokens": ("recv",)}),
        Call("dispatch FP8", "dispatch",
             lambda e: dict(x=(e.x8, e.scales), topk_idx=e.topk, topk_weights=e.weights, **e.layout),
             dict(x=_Fp8Pair()),
             names={"x": ("x_scales", "hidden", "tokens", "is_token_in_rank", "topk_idx")}),
        Call("cached dispatch", "dispatch", lambda e: dict(x=e.x, handle=e.handle),
             dict(x=T_ANY(["bf16"], fixed_dims=(0,)), handle=HandleArg(), config=ConfigArg()),
             names={"x": ("hidden", "tokens"), "handle": ("topk_idx",)}),
        Call("combine", "combine",
             lambda e: dict(x=e.y, handle=e.handle, topk_weights=e.recv_weights, bias=e.bias),
             dict(x=T_ANY(["bf16"], fixed_dims=(0,)), handle=HandleArg(),
                  topk_weights=T_ANY(["f32"], fixed_dims=(0,), optional=True),
                  bias=T_ANY(["bf16"], fixed_dims=(0, 1), optional=True), config=ConfigArg(), previous_event=EventArg(),
                  async_finish=BoolArg(), allocate_on_comm_stream=BoolArg()),
             names={"x": ("hidden", "rows", "bias", "bias0"), "bias": ("bias0", "bias[0]", "hidden", "x"),
                    "topk_weights": ("num_topk", "combined_topk_weights")}),
        Call("low_latency_dispatch", "low_latency_dispatch",
             lambda e: dict(x=e.ll_x, topk_idx=e.ll_topk, num_max_dispatch_tokens_per_rank=e.tmax, num_experts=e.ll_E),
             dict(x=T_ANY(["bf16"], fixed_dims=(0, 1)), topk_idx=T_ANY(["i64"], fixed_dims=(0,)),
                  num_max_dispatch_tokens_per_rank=IntArg(lo=1), num_experts=IntArg(lo=1),
                  cumulative_local_expert_recv_stats=T_ANY(["i32"], fixed_dims=(0,), optional=True,
                                                           shape=lambda e: (e.ll_E // e.R,)),
                  dispatch_wait_recv_cost_stats=T_ANY(["i64"], fixed_dims=(0,), optional=True, shape=lambda e: (e.R,)),
                  use_fp8=BoolArg(), round_scale=BoolArg(), use_ue8m0=BoolArg(), async_finish=BoolArg(),
                  return_recv_hook=BoolArg()),
             names={"x": ("hidden", "num_max_dispatch_tokens_per_rank", "tokens", "topk_idx"),
                    "topk_idx": ("num_topk", "tokens", "x"),
                    "num_max_dispatch_tokens_per_rank": ("num_rdma_bytes", "clean_low_latency_buffer"),
                    "num_experts": ("num_rdma_bytes", "clean_low_latency_buffer")}),
        Call("low_latency_combine", "low_latency_combine",
             lambda e: dict(x=e.ll_y, topk_idx=e.ll_topk, topk_weights=e.ll_weights, handle=e.ll_handle),
             dict(x=T_ANY(["bf16"], fixed_dims=(0, 1, 2)), topk_idx=T_ANY(["i64"], fixed_dims=(0, 1)),
                  topk_weights=T_ANY(["f32"], fixed_dims=(0, 1)), handle=LowLatencyHandleArg(),
                  use_logfmt=BoolArg(), zero_copy=BoolArg(), async_finish=BoolArg(), return_recv_hook=BoolArg(),
                  out=T_ANY(["bf16"], fixed_dims=(0, 1), optional=True,
                            shape=lambda e: (e.shape_of(e.ll_topk)[0], e.ll_hidden)),
                  combine_wait_recv_cost_stats=T_ANY(["i64"], fixed_dims=(0,), optional=True, shape=lambda e: (e.R,))),
             names={"x": ("hidden", "num_experts"), "topk_idx": ("num_topk", "tokens", "topk_weights", "out"),
                    "topk_weights": ("topk", "tokens", "topk_idx"), "out": ("topk_idx",),
                    "handle": ("hidden", "clean_low_latency_buffer")}),
        Call("get_next_low_latency_combine_buffer", "get_next_low_latency_combine_buffer",
             lambda e: dict(handle=e.ll_handle), dict(handle=LowLatencyHandleArg()),
             names={"handle": ("hidden", "clean_low_latency_buffer")}),
        Call("clean_low_latency_buffer", "clean_low_latency_buffer",
             lambda e: dict(num_max_dispatch_tokens_per_rank=e.tmax, hidden=e.ll_hidden, num_experts=e.ll_E),
             dict(num_max_dispatch_tokens_per_rank=IntArg(lo=1), hidden=IntArg(lo=1), num_experts=IntArg(lo=1)),
             names={"num_max_dispatch_tokens_per_rank": ("num_rdma_bytes",), "hidden": ("num_rdma_bytes",),
                    "num_experts": ("num_rdma_bytes",)}),
        Call("low_latency_update_mask_buffer", "low_latency_update_mask_buffer",
             lambda e: dict(rank_to_mask=e.rank, mask=False),
             dict(rank_to_mask=IntArg(lo=0), mask=BoolArg())),
        Call("low_latency_query_mask_buffer", "low_latency_query_mask_buffer",
             lambda e: dict(mask_status=e.mask_status), dict(mask_status=T_ANY(["i32"], fixed_dims=(0,)))),
        Call("get_local_buffer_tensor", "get_local_buffer_tensor",
             lambda e: dict(dtype=e.dtype_object("bf16"), size=None, offset=0, use_rdma_buffer=False),
             dict(offset=IntArg(lo=0, hi=(1 << 63) - 1), use_rdma_buffer=BoolArg(), dtype=_DtypeArg(), size=_SizeArg())),
        Call("get_low_latency_rdma_size_hint", "get_low_latency_rdma_size_hint",
             lambda e: dict(num_max_dispatch_tokens_per_rank=e.tmax, hidden=e.ll_hidden, num_ranks=e.R,
                            num_experts=e.ll_E),
             dict(num_max_dispatch_tokens_per_rank=IntArg(lo=1), hidden=IntArg(lo=1), num_ranks=IntArg(lo=1),
                  num_experts=IntArg(lo=1)), static=True),
        Call("get_dispatch_config", "get_dispatch_config", lambda e: dict(num_ranks=e.R),
             dict(num_ranks=IntArg(lo=1)), static=True),
    ]


class _Fp8Pair:
    """The FP8 pair (x_e4m3, scales): each half broken on its own."""

    def mutations(self, env, pair):
        x8, scales = pair
        out = [("a pair of three", lambda: (x8, scales, scales), True), ("scales None", lambda: (x8, None), True)]
        for what, make, visible in TensorArg(["fp8"], fixed_dims=(0,)).mutations(env, x8):
            out.append((f"x_e4m3 {what}", lambda make=make: (make(), scales), visible))
        # Scales: float32 groups or packed int32 words, any count and strides; only T is fixed.
        for what, make, visible in TensorArg(["f32", "i32"], any_strides=True, fixed_dims=(0,)).mutations(env, scales):
            if what != "None":
                out.append((f"scales {what}", lambda make=make: (x8, make()), visible))
        return out


class _DtypeArg:
    def mutations(self, env, value):
        return [("a string", lambda: "bfloat16", True), ("None", lambda: None, True), ("an int", lambda: 2, True)]


class _SizeArg:
    def mutations(self, env, value):
        return [("more elements than the region", lambda: (1 << 40,), False)]


# ---------------------------------------------------------------------------- running cases
def names_of(call: Call, arg: str) -> Tuple[str, ...]:
    return (arg,) + call.names.get(arg, ())


def names_argument(message: str, names: Sequence[str]) -> bool:
    return any(re.search(r"(?<![A-Za-z0-9_])" + re.escape(n) + r"(?![A-Za-z0-9_])", message) for n in names)


def draw_cases(env, count: int, seed: int) -> List[Tuple[Call, str, str, Callable, bool]]:
    """`count` (call, argument, mutation, make value, visible to Python) drawn with `seed`."""
    rng = random.Random(seed)
    every = []
    for call in calls():
        valid = call.valid(env)
        for arg, kind in call.args.items():
            every.extend((call, arg, what, make, visible) for what, make, visible in kind.mutations(env, valid.get(arg)))
    return [every[rng.randrange(len(every))] for _ in range(count)]


def run_case(target, env, case) -> Tuple[str, str]:
    """Makes one broken call on `target` (a Buffer, or the Buffer class for static calls).
    Returns (outcome, detail): "named" (an accepted exception naming the argument), "core" (reached
    the core or an allocation: ReachedCore), or "bad" (anything else)."""
    call, arg, what, make, _ = case
    kwargs = call.valid(env)
    kwargs[arg] = make()
    fn = getattr(target, call.method)  # static methods too (through the instance)
    try:
        fn(**kwargs)
    except ReachedCore:
        return "core", ""
    except (ValueError, TypeError, RuntimeError) as e:
        message = f"{type(e).__name__}: {e}"
        if names_argument(str(e), names_of(call, arg)):
            return "named", message
        return "bad", f"the error does not name {list(names_of(call, arg))}: {message}"
    except Exception as e:  # noqa: BLE001 -- the point of the test
        return "bad", f"{type(e).__name__}: {e}"
    return "bad", "no error"


def describe(case) -> str:
    call, arg, what, _, _ = case
    return f"{call.name}({arg} = {what})"
