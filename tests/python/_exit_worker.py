"""One rank of test_exit.py, run as a fresh interpreter (as a framework's spawned worker is): the
calls a framework makes in normal and low-latency mode, each checked against the torch reference,
then a teardown, then an ordinary interpreter exit. The parent checks the exit status and that
nothing from CUDA was printed.

    python3 _exit_worker.py TEARDOWN     (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)

TEARDOWN (test_exit.TEARDOWNS):
    exit           explicitly_destroy=False and no destroy(); the buffers go when main() returns,
                   before the tensors of async calls (held in main's later locals and in a module
                   global freed at interpreter shutdown); the process group is not destroyed.
    destroy        explicitly_destroy=True: tensors freed, destroy(), destroy_process_group().
    destroy-first  explicitly_destroy=True: destroy() while tensors of async calls are still held,
                   then those tensors freed.
"""

import os
import sys

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import _gpu_cases as cases  # noqa: E402
import epcomm  # noqa: E402
from _cluster import Context  # noqa: E402

_HELD_UNTIL_SHUTDOWN = []  # outputs of async calls that live until the interpreter's own teardown


def main(teardown: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    seed = int(os.environ.get("EPCOMM_TEST_SEED", "1"))
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl", rank=rank, world_size=world)
    group = dist.group.WORLD
    explicit = teardown != "exit"
    hidden = 2048
    nvl = max(epcomm.Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(hidden * 2, world),
              epcomm.Buffer.get_combine_config(world).get_nvl_buffer_size_hint(hidden * 2, world))
    buffer = epcomm.Buffer(group, num_nvl_bytes=nvl, explicitly_destroy=explicit)
    rdma = max(epcomm.Buffer.get_low_latency_rdma_size_hint(t, h, world, e)
               for t, h, e in cases.ll_shapes(world).values())
    ll_buffer = epcomm.Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True, explicitly_destroy=explicit)
    ctx = Context(rank, world, buffer, group, torch.device("cuda", torch.cuda.current_device()))
    ctx.ll_buffer = ll_buffer  # the low-latency cases take it from here (_gpu_cases.ll_buffer)

    # Normal mode, checked: sync and async, allocate_on_comm_stream on and off, previous_event,
    # FP8 with column-major scales, cached dispatch (inside every case), num_worst_tokens.
    cases.normal_case(ctx, seed, "sync")
    cases.normal_case(ctx, seed + 1, "async, previous_event", prev=True, async_finish=True, alignment=4)
    cases.normal_case(ctx, seed + 2, "async on the comm stream, FP8", fp8=True, async_finish=True, on_comm=True)
    cases.normal_case(ctx, seed + 3, "num_worst_tokens", num_worst=2048, async_finish=True)
    # Low-latency mode, checked: hooks, async, zero-copy, out=, then CUDA graphs with and without hooks.
    cases.low_latency_modes(ctx, seed + 4)
    cases.low_latency_graph(ctx, seed + 5, hook=False, replays=2)
    cases.low_latency_graph(ctx, seed + 6, hook=True, replays=2)

    # Outputs of async calls (record_stream-ed on the comm stream), held past the buffers' end.
    held = []
    for i, (prev, on_comm, fp8) in enumerate(((False, False, False), (True, True, False), (True, False, True))):
        inp = cases.Inputs(ctx, seed + 10 + i, 300, hidden, 8, 16 * world)
        out = cases.run_normal(ctx, inp, fp8=fp8, prev=prev, async_finish=True, on_comm=on_comm)
        cases.verify_normal(ctx, inp, out, f"held async call {i}", fp8=fp8)
        held.append(out)
    tmax, ll_hidden, E = cases.ll_shapes(world)["basic"]
    ll_inp = cases.LLInputs(ctx, seed + 20, tmax, ll_hidden, 8, E)
    ll_buffer.clean_low_latency_buffer(tmax, ll_hidden, E)  # the graph cases left their own shape
    ll_out = cases.ll_run(ctx, ll_buffer, ll_inp, async_finish=True)
    cases.ll_verify(ctx, ll_inp, ll_out, cases.ll_gather(ctx, ll_inp), "held async low-latency call")
    held.append(ll_out)
    torch.cuda.synchronize()
    print(f"exit-worker rank {rank}: every call matched the reference ({teardown})", flush=True)

    if teardown == "exit":
        _HELD_UNTIL_SHUTDOWN.append(held.pop())
        del ctx  # buffer and ll_buffer are main's first locals: freed before `held` on return
        return
    if teardown == "destroy":
        del held
        torch.cuda.synchronize()
        buffer.destroy()
        ll_buffer.destroy()
        dist.destroy_process_group()
        return
    assert teardown == "destroy-first", teardown
    buffer.destroy()
    ll_buffer.destroy()
    del held
    torch.cuda.synchronize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
