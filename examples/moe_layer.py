"""A small trainable MoE layer on epcomm's DeepEP-compatible API.

    gate -> top-k -> dispatch -> per-expert MLP -> combine

Dispatch and combine are torch.autograd.Functions: dispatch's backward is a combine (a token's
copies went to several ranks, so its gradient is the sum of theirs) and combine's backward is a
cached dispatch (every row that was summed gets the token's gradient). One process per GPU:

    PYTHONPATH=python python examples/moe_layer.py --ranks 4
    torchrun --nnodes N --nproc-per-node G ... examples/moe_layer.py     (one rank per torchrun process)

Every rank checks its forward output and its gradients (input, gate, its own experts' weights)
against the same layer computed on one GPU without communication, and prints the errors.

Across nodes without a second machine: --fake-nodes N starts one process per rank (--ranks, default
N) over N fake nodes, processes that NCCL takes for different hosts (distinct NCCL_HOSTID), joined by
the test-only loopback net plugin with GIN (tests/gin_loopback; --net-plugin), so dispatch and
combine take epcomm's path across nodes. Ranks share GPUs where there are fewer GPUs than ranks
(slowly: their kernels take turns).

    PYTHONPATH=python python examples/moe_layer.py --fake-nodes 2 [--ranks 4] [--net-plugin PATH]
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import epcomm


class _Route:
    """What the two Functions share within one forward: the buffer and the dispatch handle."""

    def __init__(self, buffer: epcomm.Buffer, num_experts: int):
        self.buffer, self.num_experts, self.handle = buffer, num_experts, None


class Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, route):
        buffer = route.buffer
        ntpr, ntprdma, ntpe, in_rank, _ = buffer.get_dispatch_layout(topk_idx, route.num_experts)
        recv_x, recv_idx, recv_weights, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntprdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=ntpe, topk_idx=topk_idx, topk_weights=topk_weights)
        route.handle = ctx.handle = handle
        ctx.buffer, ctx.num_topk = buffer, topk_idx.size(1)
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_weights, recv_idx

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_weights, _grad_idx):
        if grad_recv_weights is None:
            grad_recv_weights = torch.zeros(ctx.handle.meta.num_rows, ctx.num_topk, device=grad_recv_x.device)
        grad_x, grad_weights, _ = ctx.buffer.combine(grad_recv_x.contiguous(), ctx.handle,
                                                     topk_weights=grad_recv_weights.float().contiguous())
        return grad_x, grad_weights, None, None


class Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, route):
        ctx.buffer, ctx.handle = route.buffer, route.handle
        combined, _, _ = route.buffer.combine(y, route.handle)
        return combined

    @staticmethod
    def backward(ctx, grad_out):
        grad_y, _, _, _, _, _ = ctx.buffer.dispatch(grad_out.contiguous(), handle=ctx.handle)
        return grad_y, None


def expert_mlp(x, weights, idx, w1, w2):
    """out[row] = sum over k with idx[row, k] = e >= 0 of weights[row, k] * MLP_e(x[row]), float32.
    idx holds ids of the experts in w1/w2 (local ids on a rank, global ones on one GPU)."""
    xf = x.float()
    out = torch.zeros(x.size(0), w2.size(2), dtype=torch.float32, device=x.device)
    for e in range(w1.size(0)):
        hit = idx == e
        rows = hit.any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        row_weights = (weights * hit).sum(dim=1)[rows]
        h = F.gelu(xf[rows] @ w1[e]) @ w2[e]
        out = out.index_add(0, rows, h * row_weights[:, None])
    return out


def init_weights(hidden, ffn, num_experts, seed):
    """The whole layer's weights, identical on every rank (each keeps its experts)."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(num_experts, hidden, generator=g) / hidden ** 0.5
    w1 = torch.randn(num_experts, hidden, ffn, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, ffn, hidden, generator=g) / ffn ** 0.5
    return gate, w1, w2


class MoELayer(torch.nn.Module):
    def __init__(self, buffer: epcomm.Buffer, hidden: int, ffn: int, num_experts: int, num_topk: int, seed: int = 0,
                 device=None):
        super().__init__()
        R, rank = buffer.group_size, buffer.rank
        if num_experts % R:
            raise ValueError(f"num_experts = {num_experts} must be divisible by the {R} ranks")
        local = num_experts // R
        gate, w1, w2 = init_weights(hidden, ffn, num_experts, seed)
        device = device or torch.device("cuda", torch.cuda.current_device())
        self.gate = torch.nn.Parameter(gate.to(device))
        self.w1 = torch.nn.Parameter(w1[rank * local:(rank + 1) * local].to(device))
        self.w2 = torch.nn.Parameter(w2[rank * local:(rank + 1) * local].to(device))
        self.buffer, self.num_experts, self.num_topk = buffer, num_experts, num_topk

    def forward(self, x):
        """x: [T, hidden] bf16 -> (output [T, hidden] bf16, the top-k expert ids chosen)."""
        probs = torch.softmax(x.float() @ self.gate.t(), dim=1)
        topk_weights, topk_idx = probs.topk(self.num_topk, dim=1)
        route = _Route(self.buffer, self.num_experts)
        recv_x, recv_weights, recv_idx = Dispatch.apply(x, topk_weights, topk_idx, route)
        y = expert_mlp(recv_x, recv_weights, recv_idx, self.w1, self.w2)
        return Combine.apply(y.to(torch.bfloat16), route), topk_idx


def _gather(t, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def warm_up(hidden, ffn, num_experts, num_topk, seed, device):
    """The layer on one GPU, forward and backward on a few tokens, without communication.

    CUDA loads a kernel's module at its first launch, and the load waits for the kernels already
    running. Across fake nodes the data a spinning dispatch waits for is copied by CUDA calls of
    this same process (the loopback plugin), so an expert kernel launched for the first time during
    a dispatch would wait for ever; real NICs need no CUDA call, and there it costs one wait."""
    gate, w1, w2 = (t.to(device).requires_grad_() for t in init_weights(hidden, ffn, num_experts, seed))
    x = torch.randn(8, hidden, device=device).to(torch.bfloat16).requires_grad_()
    weights, idx = torch.softmax(x.float() @ gate.t(), dim=1).topk(num_topk, dim=1)
    out = expert_mlp(x, weights, idx, w1, w2).to(torch.bfloat16)
    (out.float() * torch.randn_like(out.float())).sum().backward()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_against_single_gpu(buffer, group, seed=0, tokens=128, hidden=512, ffn=1024, num_topk=4,
                             experts_per_rank=8, tol=3e-2, device=None):
    """Runs the layer forward and backward on every rank and the same layer on one GPU (each rank
    computes it for all tokens); returns relative errors and whether all are below `tol`."""
    R, rank = buffer.group_size, buffer.rank
    E = experts_per_rank * R
    device = device or torch.device("cuda", torch.cuda.current_device())
    warm_up(hidden, ffn, E, num_topk, seed, device)  # kernels loaded before any dispatch spins
    layer = MoELayer(buffer, hidden, ffn, E, num_topk, seed, device)
    g = torch.Generator().manual_seed(seed * 1000 + rank + 1)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device).requires_grad_()
    grad_out = torch.randn(tokens, hidden, generator=g).to(device)

    out, topk_idx = layer(x)
    (out.float() * grad_out).sum().backward()
    gate_grad = layer.gate.grad.clone()
    dist.all_reduce(gate_grad, group=group)  # the gate is replicated: its gradient sums over ranks

    # The same layer on one GPU, for every rank's tokens, with the routing the ranks chose.
    x_all = _gather(x.detach().float(), group).to(torch.bfloat16).requires_grad_()  # exact round trip
    idx_all, grad_all = _gather(topk_idx, group), _gather(grad_out, group)
    gate, w1, w2 = (t.to(device).requires_grad_() for t in init_weights(hidden, ffn, E, seed))
    probs = torch.softmax(x_all.float() @ gate.t(), dim=1)
    ref = expert_mlp(x_all, probs.gather(1, idx_all), idx_all, w1, w2)
    (ref * grad_all).sum().backward()

    mine = slice(rank * tokens, (rank + 1) * tokens)
    local = slice(rank * experts_per_rank, (rank + 1) * experts_per_rank)
    errors = {
        "forward": _rel(out, ref[mine]),
        "grad_x": _rel(x.grad, x_all.grad[mine]),
        "grad_gate": _rel(gate_grad, gate.grad),
        "grad_w1": _rel(layer.w1.grad, w1.grad[local]),
        "grad_w2": _rel(layer.w2.grad, w2.grad[local]),
    }
    return {"rank": rank, "ok": all(v < tol for v in errors.values()), **errors}


def _run_rank(rank, num_ranks, ranks_per_node, args):
    """One rank's check, once its process group exists; raises SystemExit if the layer differs."""
    configs = (epcomm.Buffer.get_dispatch_config(num_ranks), epcomm.Buffer.get_combine_config(num_ranks))
    hidden_bytes = args.hidden * 2
    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    # Network memory for normal mode across nodes (0 when the ranks fit in one node, as DeepEP's hint);
    # epcomm's internode region holds every token of every source node (EPCOMM_MAX_TOKENS_PER_RANK).
    rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks, ranks_per_node=ranks_per_node) for c in configs)
    if ranks_per_node < num_ranks:
        os.environ.setdefault("EPCOMM_MAX_TOKENS_PER_RANK", str(args.tokens))
        rdma = max(rdma, epcomm.Buffer.get_internode_rdma_size_hint(
            int(os.environ["EPCOMM_MAX_TOKENS_PER_RANK"]), args.hidden, num_ranks, ranks_per_node, args.topk))
    buffer = epcomm.Buffer(dist.group.WORLD, num_nvl_bytes=nvl, num_rdma_bytes=rdma, explicitly_destroy=True)
    try:
        report = check_against_single_gpu(buffer, dist.group.WORLD, seed=args.seed, tokens=args.tokens,
                                          hidden=args.hidden, ffn=args.ffn, num_topk=args.topk,
                                          experts_per_rank=args.experts_per_rank)
        print(" ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()),
              flush=True)
        if not report["ok"]:
            raise SystemExit(f"rank {rank}: the MoE layer differs from the single-GPU layer")
    finally:
        buffer.destroy()
        dist.destroy_process_group()


def _torchrun_rank(args):
    """One rank that torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE in the
    environment, MASTER_ADDR / MASTER_PORT for the process group): a node is its LOCAL_WORLD_SIZE GPUs."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", init_method="env://", rank=rank, world_size=world)
    _run_rank(rank, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)), args)


def _worker(rank, num_ranks, port, args):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=num_ranks)
    _run_rank(rank, num_ranks, num_ranks, args)


# ---------------------------------------------------------------------------- fake nodes
def _find_plugin(given):
    """The loopback net plugin: --net-plugin, $EPCOMM_TEST_NET_PLUGIN, or where the build puts it."""
    root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    built = [os.path.join(root, d, "tests", "gin_loopback", "libnccl-net-epcomm-loopback.so")
             for d in ("build-gpu", "build")]
    candidates = [given] if given else [os.environ["EPCOMM_TEST_NET_PLUGIN"]] if os.environ.get(
        "EPCOMM_TEST_NET_PLUGIN") else built
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise SystemExit(f"--fake-nodes needs the loopback net plugin (built with the C++ tests); not found: {candidates}")


def _fake_node_child(args):
    """One rank of --fake-nodes, in the environment _run_fake_nodes gave it."""
    rank, num_ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["EPCOMM_FAKE_GPU"]))
    # gloo: ranks may share a GPU; epcomm makes its own NCCL communicator (through the plugin).
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank,
                            world_size=num_ranks)
    _run_rank(rank, num_ranks, int(os.environ["EPCOMM_FAKE_RANKS_PER_NODE"]), args)


def _run_fake_nodes(args, port):
    """Starts one process per rank over args.fake_nodes fake nodes and waits for them (at most
    args.timeout seconds, 60 s after the first that fails); True if every rank passed."""
    gpus, nodes = torch.cuda.device_count(), args.fake_nodes
    ranks = args.ranks or nodes
    if nodes < 2 or ranks % nodes:
        raise SystemExit(f"--fake-nodes {nodes} --ranks {ranks}: at least 2 nodes, and ranks a multiple of them")
    per_node = ranks // nodes
    if per_node > gpus:
        raise SystemExit(f"--fake-nodes: a node's {per_node} ranks need {per_node} GPUs; {gpus} visible")
    plugin = _find_plugin(args.net_plugin)
    argv = [sys.executable, os.path.abspath(__file__), "--fake-node-child", "--tokens", str(args.tokens),
            "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--topk", str(args.topk),
            "--experts-per-rank", str(args.experts_per_rank), "--seed", str(args.seed)]
    procs = []
    for r in range(ranks):
        node, gpu = r // per_node, (r if gpus >= ranks else r % per_node)
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(ranks), MASTER_PORT=str(port), EPCOMM_FAKE_GPU=str(gpu),
                   EPCOMM_FAKE_RANKS_PER_NODE=str(per_node), NCCL_HOSTID=f"epcomm-moe-example-node{node}",
                   NCCL_NET_PLUGIN=plugin, NCCL_NET="EpcommLoopback", NCCL_GIN_TYPE="2", NCCL_NVLS_ENABLE="0",
                   TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
                   EPCOMM_RANKS_PER_NODE="0",  # the node is what NCCL says: this fake node's ranks
                   # Every kernel loaded when the context starts (warm_up's docstring says why; the
                   # warm-up alone left a deadlock in BENCHMARKS.md run 74; not yet run with this).
                   CUDA_MODULE_LOADING="EAGER",
                   PYTHONUNBUFFERED="1")
        # The normal-mode buffer's network memory is sized for this many tokens per rank (epcomm's
        # default, 65536, would need far more); a live peer on a shared GPU can be seconds late.
        env.setdefault("EPCOMM_MAX_TOKENS_PER_RANK", str(args.tokens))
        env.setdefault("EPCOMM_TIMEOUT_MS", "30000")
        print(f"rank {r}: fake node {node}, GPU {gpu}", flush=True)
        procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
    deadline = time.monotonic() + args.timeout
    status = [None] * ranks
    while any(s is None for s in status) and time.monotonic() < deadline:
        for r, p in enumerate(procs):
            if status[r] is None and p.poll() is not None:
                status[r] = p.returncode
                if p.returncode != 0:  # its peers may wait for it until their own timeouts
                    deadline = min(deadline, time.monotonic() + 60)
        time.sleep(0.1)
    for r, p in enumerate(procs):
        if status[r] is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            print(f"rank {r}: still running after the time limit, killed", flush=True)
        elif status[r] != 0:
            print(f"rank {r}: exit status {status[r]}", flush=True)
    return all(s == 0 for s in status)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=0,
                        help="processes, one per GPU (default: every GPU; with --fake-nodes: one per node)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--experts-per-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fake-nodes", type=int, default=0,
                        help="run over this many fake nodes through the loopback net plugin (one process per rank)")
    parser.add_argument("--net-plugin", default=None,
                        help="the loopback plugin for --fake-nodes (default: $EPCOMM_TEST_NET_PLUGIN, else "
                             "build-gpu/ then build/ tests/gin_loopback/libnccl-net-epcomm-loopback.so)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="--fake-nodes: seconds before ranks still running are killed (default 600)")
    parser.add_argument("--fake-node-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_node_child:
        _fake_node_child(args)
        return
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) and not args.fake_nodes:
        _torchrun_rank(args)  # started by torchrun: this process is one rank
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.fake_nodes:
        if not _run_fake_nodes(args, port):
            raise SystemExit(f"MoE layer over {args.fake_nodes} fake nodes: FAILED")
        print(f"MoE layer over {args.fake_nodes} fake nodes ({args.ranks or args.fake_nodes} ranks): forward and "
              f"gradients match the single-GPU layer")
        return
    ranks = args.ranks or torch.cuda.device_count()
    if ranks < 1:
        raise SystemExit("moe_layer.py needs at least one CUDA GPU")
    torch.multiprocessing.spawn(_worker, args=(ranks, port, args), nprocs=ranks)
    print(f"MoE layer on {ranks} GPU(s): forward and gradients match the single-GPU layer")


if __name__ == "__main__":
    main()
