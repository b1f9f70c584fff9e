"""The GPU side of test_fuzz.py, run on every rank by _cluster (one process per GPU): _fuzz's
broken calls against the real core. Each must raise naming its argument (no other outcome); after
every batch a verified normal-mode round and low-latency round (the _gpu_cases checks) show that
nothing was corrupted. Ranks draw the same cases (same seed) and stay in step: the core refuses
every broken call before any collective or kernel."""

import collections

import torch

import _fuzz
import _gpu_cases as cases
import epcomm

BATCH = 50
HIDDEN, NUM_TOPK, TOKENS = 512, 4, 64
_DTYPES = {"bf16": torch.bfloat16, "fp8": getattr(torch, "float8_e4m3fn", None), "f32": torch.float32,
           "i32": torch.int32, "i64": torch.int64, "bool": torch.bool, "u8": torch.uint8, "f16": torch.float16}


def buffer_bytes(R):
    return max(epcomm.Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(2048 * 2, R),
               epcomm.Buffer.get_combine_config(R).get_nvl_buffer_size_hint(2048 * 2, R))


class GpuEnv:
    """Valid arguments made by real calls: the layout, a dispatch's handle, a low-latency dispatch's
    handle (and one of a second buffer, and one a later dispatch made stale)."""

    def __init__(self, ctx, seed):
        import random
        self.rng, self.ctx, self.R, self.rank = random.Random(seed), ctx, ctx.num_ranks, ctx.rank
        R, dev = self.R, ctx.device
        g = torch.Generator(device=dev).manual_seed(seed + ctx.rank)
        self.E = 8 * R
        inp = cases.Inputs(ctx, seed, TOKENS, HIDDEN, NUM_TOPK, self.E, fixed_tokens=TOKENS)
        self.topk, self.x, self.weights, self.x8, self.scales = inp.topk, inp.x, inp.weights, inp.x8, inp.scales
        buf = ctx.buffer
        ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(self.topk, self.E)
        self.layout = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe)
        recv, _, rw, _, self.handle, _ = buf.dispatch(self.x, topk_idx=self.topk, topk_weights=self.weights,
                                                      **self.layout)
        self.y, self.recv_weights = recv, rw
        self.bias = torch.randn(TOKENS, HIDDEN, generator=g, device=dev).to(torch.bfloat16)
        # Low latency: the "small" shape of the GPU cases, a dispatch whose handle stays current.
        self.tmax, self.ll_hidden, self.ll_E = cases.ll_shapes(R)["small"]
        self.ll = cases.ll_buffer(ctx)
        self.ll.clean_low_latency_buffer(self.tmax, self.ll_hidden, self.ll_E)
        ll_in = cases.LLInputs(ctx, seed, self.tmax, self.ll_hidden, NUM_TOPK, self.ll_E, fixed_tokens=self.tmax)
        self.ll_x, self.ll_topk, self.ll_weights = ll_in.x, ll_in.topk, ll_in.weights
        _, _, self._stale, _, _ = self.ll.low_latency_dispatch(self.ll_x, self.ll_topk, self.tmax, self.ll_E)
        self.ll.low_latency_combine(torch.zeros((self.ll_E // R, R * self.tmax, self.ll_hidden), dtype=torch.bfloat16,
                                                device=dev), self.ll_topk, self.ll_weights, self._stale)
        # Two more dispatches: the first's buffer (index 0) is taken again, so _stale is stale.
        recv, _, self.ll_handle, _, _ = self.ll.low_latency_dispatch(self.ll_x, self.ll_topk, self.tmax, self.ll_E)
        self.ll_y = torch.zeros((self.ll_E // R, R * self.tmax, self.ll_hidden), dtype=torch.bfloat16, device=dev)
        self.ll.low_latency_combine(self.ll_y, self.ll_topk, self.ll_weights, self.ll_handle)
        _, _, self.ll_handle, _, _ = self.ll.low_latency_dispatch(self.ll_x, self.ll_topk, self.tmax, self.ll_E)
        self.mask_status = torch.zeros((R,), dtype=torch.int32, device=dev)
        self._foreign = None

    def make(self, shape, dtype, strided=False, cpu=False):
        dev = "cpu" if cpu else self.ctx.device
        if strided and shape:
            return torch.zeros(tuple(shape[:-1]) + (2 * shape[-1],), device=dev).to(_DTYPES[dtype])[..., ::2]
        return torch.zeros(tuple(shape), device=dev).to(_DTYPES[dtype])

    @staticmethod
    def shape_of(t):
        return tuple(t.shape)

    @staticmethod
    def dtype_object(name):
        return _DTYPES[name]

    def foreign_ll_handle(self):
        return self._foreign

    def stale_ll_handle(self):
        return self._stale


def fuzz(ctx, seed, count):
    """`count` broken calls (same on every rank) in batches of BATCH, each batch followed by
    verified rounds; returns the tally. Raises AssertionError listing every case that did not
    raise an error naming its argument."""
    env = GpuEnv(ctx, seed)
    other = epcomm.Buffer(ctx.group, num_rdma_bytes=env.ll.num_rdma_bytes, low_latency_mode=True,
                          explicitly_destroy=True)
    other.clean_low_latency_buffer(env.tmax, env.ll_hidden, env.ll_E)
    _, _, env._foreign, _, _ = other.low_latency_dispatch(env.ll_x, env.ll_topk, env.tmax, env.ll_E)
    failures, tally = [], collections.Counter()
    num_sms = epcomm.Buffer.num_sms
    drawn = _fuzz.draw_cases(env, count, seed)
    for start in range(0, len(drawn), BATCH):
        for case in drawn[start:start + BATCH]:
            outcome, detail = _fuzz.run_case(ctx.buffer if not case[0].name.startswith(("low_latency", "get_next",
                                                                                          "clean_low"))
                                             else env.ll, env, case)
            tally[outcome] += 1
            if outcome != "named":
                failures.append(f"{_fuzz.describe(case)}: {detail}")
            epcomm.Buffer.num_sms = num_sms
        torch.cuda.synchronize()  # a sticky CUDA error (an illegal address) would surface here
        # Nothing corrupted: a verified normal round and low-latency round, then a fresh LL handle
        # (the round's dispatches took both buffers).
        cases.normal_case(ctx, seed + start, f"after fuzz cases {start}..{start + BATCH - 1}", hidden=1024)
        cases.low_latency(ctx, seed + start, what=f"after fuzz cases {start}..", shape="small", num_topk=NUM_TOPK)
        env.ll.clean_low_latency_buffer(env.tmax, env.ll_hidden, env.ll_E)
        _, _, env.ll_handle, _, _ = env.ll.low_latency_dispatch(env.ll_x, env.ll_topk, env.tmax, env.ll_E)
        env._stale = None
    other.destroy()
    if failures:
        shown = sorted(set(failures))
        raise AssertionError(f"rank {ctx.rank}, seed {seed}: {len(failures)} of {count} cases failed "
                             f"({len(shown)} distinct):\n  " + "\n  ".join(shown[:80]))
    return dict(tally)
