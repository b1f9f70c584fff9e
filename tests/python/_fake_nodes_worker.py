"""One rank of test_fake_nodes.py, a fresh interpreter in the environment of its fake node
(_fake_nodes.rank_env: NCCL_HOSTID, the loopback plugin with GIN, EPCOMM_MAX_TOKENS_PER_RANK): NCCL
takes every fake node for a host of its own, so the Buffer reaches other nodes' ranks through NCCL
GIN. The calls a client makes through `import epcomm as deep_ep`, on fresh random inputs, each output
checked against the torch reference (_reference.py, through the cases of _gpu_normal.py and
_gpu_low_latency.py):

    normal mode  get_dispatch_layout (num_tokens_per_rdma_rank per node included), dispatch, combine
                 and cached dispatch: BF16 (bias, expert_alignment), FP8 with column-major scales,
                 without top-k, num_worst_tokens;
    low latency  dispatch and combine with hooks, BF16 and FP8;

then a collective teardown (destroy, destroy_process_group) and an ordinary exit; the parent checks
the exit status and that nothing from CUDA was printed (_exit_check's rule).

    python3 _fake_nodes_worker.py     (environment: _fake_nodes.rank_env; EPCOMM_FAKE_CASES=a,b picks cases)

Prints one line per case ('... case NAME: ok (S s)' / ': FAIL' / ': ERROR'). A failed check (every
rank finished the case's collectives) goes on to the next case; any other error ends the process at
once (the ranks are out of step), exit 1.
"""

import datetime
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import _reference as ref  # noqa: E402
import epcomm as deep_ep  # noqa: E402
from _cluster import Context, dump_stacks_before_watchdog  # noqa: E402
from _exit_check import DONE_LINE  # noqa: E402
from _gpu_checks import Checks  # noqa: E402
from _gpu_low_latency import ll_shapes, low_latency, warm_expert_kernels  # noqa: E402
from _gpu_normal import Inputs, run_normal, verify_normal  # noqa: E402

HIDDEN = 2048  # normal mode; the buffer is sized for it (low latency: ll_shapes' "basic", hidden 1024)
NUM_TOPK = 8


def normal_across_nodes(ctx, seed, what, worst=False, **kw):
    """layout -> dispatch -> combine -> cached dispatch (_gpu_normal.run_normal) checked by
    verify_normal, and num_tokens_per_rdma_rank, which it leaves to this (it expects one node):
    [nodes] int32, the tokens that go to at least one rank of each node. `worst`: num_worst_tokens =
    R * the most tokens a rank has."""
    R, N, P = ctx.num_ranks, ctx.num_nodes, ctx.ranks_per_node
    tokens = int(os.environ["EPCOMM_MAX_TOKENS_PER_RANK"])
    if worst:
        kw["num_worst"] = R * tokens
    inp = Inputs(ctx, seed, tokens, HIDDEN, NUM_TOPK, 16 * R)
    out = run_normal(ctx, inp, **kw)
    ntpr, per_node, ntpe, itir = out["layout"]
    c = Checks(ctx, f"{what} (seed {seed})")
    in_rank = ref.layout(inp.topk, inp.num_experts, R)[2]
    want = in_rank.view(inp.num_tokens, N, P).any(dim=2).sum(dim=0).to(torch.int32)
    if per_node is None:
        c.fails.append(f"num_tokens_per_rdma_rank: None; want [{N}] int32 ({N} nodes)")
    elif per_node.dtype != torch.int32:
        c.fails.append(f"num_tokens_per_rdma_rank: dtype {per_node.dtype}, want torch.int32")
    else:
        c.bytes("num_tokens_per_rdma_rank", per_node, want)
    out["layout"] = (ntpr, None, ntpe, itir)
    check_kw = {k: kw[k] for k in ("fp8", "with_topk", "alignment", "num_worst", "bias") if k in kw}
    try:
        verify_normal(ctx, inp, out, f"{what} (seed {seed})", **check_kw)
    except AssertionError as e:
        c.fails.append(str(e))
    c.done()


def low_latency_across_nodes(ctx, seed, what, **kw):
    reports = low_latency(ctx, seed, what, "basic", **kw)
    return ", ".join(f"{r['rows']} rows, {r['combine_not_bit_exact']} combined not bit-exact" for r in reports)


def auto_mode_across_nodes(ctx, seed, what):
    """SGLang's auto mode: one Buffer with low_latency_mode=True and num_rdma_bytes = the larger of the
    normal-mode and low-latency hints, taking normal-mode calls (prefill) and low-latency calls
    (decode) in turn. Normal mode's data shares the low-latency region there: a low-latency call right
    after a normal-mode one must be refused until clean_low_latency_buffer (DeepEP's rule, which
    SGLang follows); low_latency() cleans first, as SGLang does on switching."""
    R, P = ctx.num_ranks, ctx.ranks_per_node
    if getattr(ctx, "auto_buffer", None) is None:
        hidden_bytes = HIDDEN * 2
        configs = (deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R))
        nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, R) for c in configs)
        rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, R, ranks_per_node=P) for c in configs)
        tmax, hidden, E = ll_shapes(R)["basic"]
        rdma = max(rdma, deep_ep.Buffer.get_low_latency_rdma_size_hint(tmax, hidden, R, E))
        ctx.auto_buffer = deep_ep.Buffer(ctx.group, nvl, rdma, low_latency_mode=True, explicitly_destroy=True)
    saved = ctx.buffer, ctx.ll_buffer
    ctx.buffer = ctx.ll_buffer = ctx.auto_buffer
    try:
        normal_across_nodes(ctx, seed, f"{what}: normal (prefill)", bias=True)
        tmax, hidden, E = ll_shapes(R)["basic"]
        x = torch.randn(tmax, hidden, dtype=torch.bfloat16, device=ctx.device)
        topk = torch.zeros(tmax, 8, dtype=torch.int64, device=ctx.device)
        try:
            ctx.auto_buffer.low_latency_dispatch(x, topk, tmax, E)
            raise AssertionError(f"{what}: a low-latency call right after a normal-mode one was not refused")
        except (ValueError, RuntimeError) as e:
            if "clean_low_latency_buffer" not in str(e):
                raise AssertionError(f"{what}: refused, but without naming clean_low_latency_buffer: {e}") from e
        note = low_latency_across_nodes(ctx, seed + 1, f"{what}: low latency (decode)", fp8=True, hook=True)
        normal_across_nodes(ctx, seed + 2, f"{what}: normal again", fp8=True)
    finally:
        ctx.buffer, ctx.ll_buffer = saved
    return note


# name -> (function, its arguments); each runs with its own seed.
CASES = {
    "bf16": (normal_across_nodes, dict(bias=True, alignment=4)),
    "fp8": (normal_across_nodes, dict(fp8=True)),
    "no-topk": (normal_across_nodes, dict(with_topk=False)),
    "worst-tokens": (normal_across_nodes, dict(worst=True)),
    "ll-bf16-hook": (low_latency_across_nodes, dict(fp8=False, hook=True)),
    "ll-fp8-hook": (low_latency_across_nodes, dict(fp8=True, hook=True)),
    "auto-mode": (auto_mode_across_nodes, {}),
}


def make_buffers(group, R, P):
    """The normal-mode and low-latency buffers, sized by the hints a client uses."""
    hidden_bytes = HIDDEN * 2
    configs = (deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R))
    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, R) for c in configs)
    # ranks_per_node: the node is P ranks here, not the GPUs this process sees. The hint covers
    # Buffer::internode_size_hint for EPCOMM_MAX_TOKENS_PER_RANK = 128, hidden 2048, top-8 at R <= 4.
    rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, R, ranks_per_node=P) for c in configs)
    buffer = deep_ep.Buffer(group, nvl, rdma, explicitly_destroy=True)
    tmax, hidden, E = ll_shapes(R)["basic"]
    # Exactly the hint, as DeepEP's clients size it: across nodes it must cover the network path.
    ll_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(tmax, hidden, R, E)
    ll_buffer = deep_ep.Buffer(group, num_rdma_bytes=ll_bytes, low_latency_mode=True, explicitly_destroy=True)
    return buffer, ll_buffer


def main() -> int:
    """The cases; returns the exit status."""
    rank, R = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    node, P = int(os.environ["EPCOMM_FAKE_NODE"]), int(os.environ["EPCOMM_FAKE_RANKS_PER_NODE"])
    gpu, seed = int(os.environ["EPCOMM_FAKE_GPU"]), int(os.environ["EPCOMM_TEST_SEED"])
    N = R // P
    chosen = [n for n in os.environ.get("EPCOMM_FAKE_CASES", "").split(",") if n] or list(CASES)
    unknown = [n for n in chosen if n not in CASES]
    if unknown:
        raise SystemExit(f"EPCOMM_FAKE_CASES: unknown case(s) {unknown}; the cases: {list(CASES)}")
    tag = f"[fake-nodes] rank {rank} of {R} (node {node} of {N}, GPU {gpu})"
    print(f"{tag}: NCCL_HOSTID={os.environ.get('NCCL_HOSTID')}, NCCL_NET_PLUGIN={os.environ.get('NCCL_NET_PLUGIN')}, "
          f"seed {seed}, cases {chosen}", flush=True)

    start = time.monotonic()
    dump_stacks_before_watchdog()
    torch.cuda.set_device(gpu)
    # gloo: ranks may share a GPU; epcomm makes its own NCCL communicator (through the plugin).
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=R, timeout=datetime.timedelta(seconds=900))
    group = dist.group.WORLD
    buffer, ll_buffer = make_buffers(group, R, P)
    rt = buffer.runtime
    print(f"{tag}: buffers made in {time.monotonic() - start:.1f} s: {rt.num_nodes} nodes of {rt.ranks_per_node}, "
          f"transport '{rt.transport}'", flush=True)
    if (rt.num_nodes, rt.ranks_per_node) != (N, P) or "GIN" not in rt.transport:
        print(f"{tag}: ERROR: the Buffer sees {rt.num_nodes} node(s) of {rt.ranks_per_node} rank(s) over "
              f"'{rt.transport}'; want {N} nodes of {P} through GIN (is NCCL_HOSTID honoured, the plugin loaded?)",
              flush=True)
        os._exit(1)
    ctx = Context(rank, R, buffer, group, torch.device("cuda", gpu))
    ctx.ll_buffer = ll_buffer  # _gpu_low_latency.ll_buffer takes it from here
    _, ll_hidden, ll_experts = ll_shapes(R)["basic"]
    warm_expert_kernels(ctx, ll_experts, ll_hidden)  # before any kernel spins (see its docstring)
    ctx.num_nodes, ctx.ranks_per_node = N, P

    failed = []
    for i, name in enumerate(chosen):
        fn, kw = CASES[name]
        case_seed = seed + 101 * (i + 1)
        t0 = time.monotonic()
        try:
            note = fn(ctx, case_seed, f"{name} across {N} fake nodes", **dict(kw))
            torch.cuda.synchronize()
            print(f"{tag}: case {name}: ok ({time.monotonic() - t0:.1f} s)" + (f"; {note}" if note else ""),
                  flush=True)
        except AssertionError as e:  # every rank is past the case's collectives: go on
            failed.append(name)
            print(f"{tag}: case {name}: FAIL ({time.monotonic() - t0:.1f} s, seed {case_seed})\n{e}", flush=True)
        except BaseException:  # noqa: BLE001 -- ranks are out of step: leave now, without teardown
            print(f"{tag}: case {name}: ERROR ({time.monotonic() - t0:.1f} s, seed {case_seed})\n"
                  f"{traceback.format_exc()}", flush=True)
            os._exit(1)
    if not failed:
        print(f"{tag}: {DONE_LINE}", flush=True)

    # Collective teardown, the same order on every rank.
    torch.cuda.synchronize()
    dist.barrier()
    ll_buffer.destroy()
    buffer.destroy()
    if getattr(ctx, "auto_buffer", None) is not None:
        ctx.auto_buffer.destroy()
    dist.destroy_process_group()
    print(f"{tag}: {'failed: ' + ', '.join(failed) if failed else 'passed'}, {time.monotonic() - start:.1f} s",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        status = main()
    except BaseException:  # noqa: BLE001 -- e.g. a Buffer that could not be made: no collective teardown
        print(f"[fake-nodes] rank {os.environ.get('RANK')}: ERROR\n{traceback.format_exc()}", flush=True)
        os._exit(1)
    sys.exit(status)
