// One fake node of epcomm-gin-probe (gin_probe.h): its ranks, one thread each, and the watchdog
// that ends the process when a rank fails or does not finish in time.
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <nccl_device.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gin_probe.h"
#include "gin_probe_kernel.cuh"

namespace epcomm::gin_probe {
namespace {

using Clock = std::chrono::steady_clock;

// NCCL 2.28.9 makes at most NCCL_GIN_MAX_CONTEXTS = 4 contexts (src/gin/gin_host.cc).
const char* kKernelPhase[4] = {"probe kernel, GIN context 0", "probe kernel, GIN context 1",
                               "probe kernel, GIN context 2", "probe kernel, GIN context 3"};
const char* kKindNames[kKinds] = {"data put + signal ADD", "signal-only INC", "size-0 put + signal ADD",
                                  "round acknowledgement"};

struct Rank {
  int rank = 0, nranks = 0, device = 0;
  std::atomic<const char*> phase{"not started"};
  std::atomic<int> outcome{0};  // 0 running, 1 passed, -1 failed
};

struct Node {
  const Options* o = nullptr;
  ncclUniqueId id{};
  std::mutex mutex;
  std::condition_variable changed;
};

bool nccl_ok(ncclResult_t r, const Rank& rk, ncclComm_t comm) {
  if (r == ncclSuccess) return true;
  const char* last = ncclGetLastError(comm);
  say(rk.rank, "FAIL in %s: %s; NCCL's last error: \"%s\"", rk.phase.load(), ncclGetErrorString(r),
      last && *last ? last : "(none)");
  return false;
}

bool cuda_ok(cudaError_t e, const Rank& rk) {
  if (e == cudaSuccess) return true;
  say(rk.rank, "FAIL in %s: CUDA error %s", rk.phase.load(), cudaGetErrorString(e));
  return false;
}

#define TRY_NCCL(call) \
  if (!nccl_ok((call), rk, comm)) return false
#define TRY_CUDA(call) \
  if (!cuda_ok((call), rk)) return false

// Waits for the stream, at most timeout_s, and watches NCCL's asynchronous error meanwhile (set
// when the GIN progress thread, which drives the plugin, fails).
bool wait_stream(Rank& rk, cudaStream_t stream, ncclComm_t comm, int timeout_s) {
  const auto deadline = Clock::now() + std::chrono::seconds(timeout_s);
  for (;;) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady) return cuda_ok(e, rk);
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(comm, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress)
      return nccl_ok(async, rk, comm);
    if (Clock::now() >= deadline) {
      say(rk.rank, "FAIL in %s: not finished after %d s (--kernel-timeout); the GPU work is still running",
          rk.phase.load(), timeout_s);
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

// Node 0 makes the unique id and leaves it in a file (written whole, then renamed into place);
// the other nodes wait for it, bounded.
bool share_unique_id(Node& node, int k) {
  const std::string path = node.o->dir + "/nccl-unique-id";
  if (k == 0) {
    const ncclResult_t r = ncclGetUniqueId(&node.id);
    if (r != ncclSuccess) {
      say(-1, "FAIL node 0: ncclGetUniqueId: %s", ncclGetErrorString(r));
      return false;
    }
    const std::string tmp = path + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    const bool ok = f && fwrite(&node.id, sizeof(node.id), 1, f) == 1;
    if (f) fclose(f);
    if (!ok || rename(tmp.c_str(), path.c_str()) != 0) {
      say(-1, "FAIL node 0: writing %s: %s", path.c_str(), strerror(errno));
      return false;
    }
    return true;
  }
  const auto deadline = Clock::now() + std::chrono::seconds(std::max(5, node.o->timeout_s - 15));
  while (Clock::now() < deadline) {
    if (FILE* f = fopen(path.c_str(), "rb")) {
      const bool ok = fread(&node.id, sizeof(node.id), 1, f) == 1;
      fclose(f);
      if (ok) return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  say(-1, "FAIL node %d: no NCCL unique id in %s (node 0 did not start?)", k, path.c_str());
  return false;
}

ProbeParams make_params(const Options& o) {
  ProbeParams p{};
  p.rounds = o.rounds;
  p.put_value = o.put_value ? 1 : 0;
  p.slot = (o.bytes + 4095) / 4096 * 4096;
  // The full size, then sizes that end mid-word, a single byte and no bytes at all.
  const size_t cycle[] = {o.bytes, 1, 4099, 8, 65543, 0};
  for (int k = 0; k < o.rounds; ++k) p.round_bytes[k] = std::min(cycle[k % 6], o.bytes);
  p.wait_ns = static_cast<unsigned long long>(o.wait_ms) * 1000000ull;
  return p;
}

bool report_kernel(const Rank& rk, const ProbeResult& r, const ProbeParams& p, int context) {
  if (r.status == kOk && r.rounds_done == p.rounds) return true;
  const char* kind = r.kind >= 0 && r.kind < kKinds ? kKindNames[r.kind] : "?";
  if (r.status == kTimeout) {
    say(rk.rank, "FAIL context %d round %d: the %s signal from rank %d is %llu after %llu ms, want %llu", context,
        r.round, kind, r.peer, r.seen, p.wait_ns / 1000000ull, r.expected);
  } else if (r.status == kBadSignal) {
    say(rk.rank, "FAIL context %d round %d: the %s signal from rank %d is %llu, want exactly %llu", context, r.round,
        kind, r.peer, r.seen, r.expected);
  } else if (r.status == kBadValue) {
    say(rk.rank, "FAIL context %d round %d: the inline value (putValue) from rank %d is 0x%016llx, want 0x%016llx",
        context, r.round, r.peer, r.seen, r.expected);
  } else if (r.status == kBadData) {
    say(rk.rank, "FAIL context %d round %d: %llu bytes from rank %d differ; first at offset %llu: 0x%02x, want 0x%02x",
        context, r.round, r.mismatches, r.peer, r.first_bad_offset, r.first_bad_got, r.first_bad_want);
  } else {
    say(rk.rank, "FAIL context %d: the kernel ended after %d of %d rounds without a recorded failure", context,
        r.rounds_done, p.rounds);
  }
  return false;
}

bool run_rank(Node& node, Rank& rk) {
  const Options& o = *node.o;
  ncclComm_t comm = nullptr;
  rk.phase = "cudaSetDevice";
  TRY_CUDA(cudaSetDevice(rk.device));
  cudaDeviceProp prop{};
  TRY_CUDA(cudaGetDeviceProperties(&prop, rk.device));
  rk.phase = "ncclCommInitRank";
  TRY_NCCL(ncclCommInitRank(&comm, rk.nranks, node.id, rk.rank));
  const int lsa = ncclTeamLsa(comm).nRanks, rail = ncclTeamRail(comm).nRanks;
  say(rk.rank, "device %d (%s), %d ranks: %d nodes (NCCL's rail team), LSA team of %d%s", rk.device, prop.name,
      rk.nranks, rail, lsa, lsa == o.ranks_per_proc ? "" : " -- expected one node per process (NCCL_HOSTID)");
  cudaStream_t stream = nullptr;
  TRY_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int* counter = nullptr;
  TRY_CUDA(cudaMalloc(&counter, sizeof(int)));
  // NCCL's own traffic first: an allreduce crosses every fake node through the loopback net.
  rk.phase = "ncclAllReduce through the loopback net";
  const int one = 1;
  int sum = 0;
  TRY_CUDA(cudaMemcpyAsync(counter, &one, sizeof(int), cudaMemcpyHostToDevice, stream));
  TRY_NCCL(ncclAllReduce(counter, counter, 1, ncclInt, ncclSum, comm, stream));
  TRY_CUDA(cudaMemcpyAsync(&sum, counter, sizeof(int), cudaMemcpyDeviceToHost, stream));
  if (!wait_stream(rk, stream, comm, o.kernel_timeout_s)) return false;
  if (sum != rk.nranks) {
    say(rk.rank, "FAIL: the allreduce of 1 from every rank gave %d, want %d", sum, rk.nranks);
    return false;
  }

  const ProbeParams base = make_params(o);
  const size_t bytes_in_window = window_bytes(base, rk.nranks);
  void* buffer = nullptr;
  ncclWindow_t window = nullptr;
  rk.phase = "ncclMemAlloc";
  TRY_NCCL(ncclMemAlloc(&buffer, bytes_in_window));
  TRY_CUDA(cudaMemset(buffer, 0, bytes_in_window));
  rk.phase = "ncclCommWindowRegister";
  TRY_NCCL(ncclCommWindowRegister(comm, buffer, bytes_in_window, &window, NCCL_WIN_COLL_SYMMETRIC));
  rk.phase = "ncclDevCommCreate (GIN through the loopback plugin)";
  ncclDevCommRequirements reqs{};
  reqs.ginSignalCount = kKinds * rk.nranks;
  reqs.ginForceEnable = true;
  ncclDevComm dev{};
  TRY_NCCL(ncclDevCommCreate(comm, &reqs, &dev));
  say(rk.rank, "ncclDevCommCreate: %d GIN contexts (type %d), %d signals", int(dev.ginContextCount),
      dev.ginContextCount ? int(dev.ginTypes[0]) : -1, dev.ginSignalCount);
  if (dev.ginContextCount == 0) {
    say(rk.rank, "FAIL: ncclDevCommCreate gave no GIN context");
    return false;
  }

  ProbeResult* d_result = nullptr;
  TRY_CUDA(cudaMalloc(&d_result, sizeof(ProbeResult)));
  ProbeParams params = base;
  for (int c = 0; c < dev.ginContextCount; ++c) {
    params.context = c;
    rk.phase = kKernelPhase[std::min(c, 3)];
    TRY_CUDA(cudaMemsetAsync(d_result, 0, sizeof(ProbeResult), stream));
    probe_kernel<<<1, kThreads, 0, stream>>>(dev, window, params, d_result);
    TRY_CUDA(cudaGetLastError());
    if (!wait_stream(rk, stream, comm, o.kernel_timeout_s)) return false;
    ProbeResult r{};
    TRY_CUDA(cudaMemcpy(&r, d_result, sizeof(r), cudaMemcpyDeviceToHost));
    if (!report_kernel(rk, r, params, c)) return false;
  }
  // An independent look at the bytes the last round left, read back by the host.
  rk.phase = "host check of the last round";
  const int last = params.rounds - 1;
  const size_t bytes = params.round_bytes[last];
  std::vector<uint8_t> host(size_t(rk.nranks) * params.slot);
  TRY_CUDA(cudaMemcpy(host.data(), static_cast<char*>(buffer) + recv_offset(params, rk.nranks, 0), host.size(),
                      cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (int src = 0; src < rk.nranks; ++src) {
    if (src == rk.rank) continue;
    for (size_t i = 0; i < bytes; ++i)
      bad += host[src * params.slot + i] != pattern(params.context, last, src, rk.rank, i);
  }
  if (bad) {
    say(rk.rank, "FAIL: the host read %zu wrong bytes of the last round (the kernel saw them right)", bad);
    return false;
  }
  say(rk.rank, "%d GIN contexts x %d rounds: every put, signal and byte as expected (puts of %zu..%zu bytes)",
      int(dev.ginContextCount), params.rounds,
      *std::min_element(params.round_bytes, params.round_bytes + params.rounds),
      *std::max_element(params.round_bytes, params.round_bytes + params.rounds));

  rk.phase = "teardown";
  TRY_CUDA(cudaFree(d_result));
  TRY_NCCL(ncclDevCommDestroy(comm, &dev));
  TRY_NCCL(ncclCommWindowDeregister(comm, window));
  TRY_NCCL(ncclMemFree(buffer));
  TRY_CUDA(cudaFree(counter));
  TRY_CUDA(cudaStreamDestroy(stream));
  TRY_NCCL(ncclCommFinalize(comm));
  TRY_NCCL(ncclCommDestroy(comm));
  say(rk.rank, "PASS");
  return true;
}

}  // namespace

int run_node(const Options& o) {
  const int k = o.child;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    say(-1, "node %d: skipped (no GPU)", k);
    return kExitNoGpu;
  }
  Node node;
  node.o = &o;
  const int nranks = o.procs * o.ranks_per_proc;
  std::vector<std::unique_ptr<Rank>> ranks;
  for (int l = 0; l < o.ranks_per_proc; ++l) {
    auto rk = std::make_unique<Rank>();
    rk->rank = k * o.ranks_per_proc + l;
    rk->nranks = nranks;
    rk->device = o.device_of_rank.empty() ? rk->rank % devices : o.device_of_rank[rk->rank];
    if (rk->device < 0 || rk->device >= devices) {
      say(rk->rank, "FAIL: device %d does not exist (%d visible)", rk->device, devices);
      return 1;
    }
    for (const auto& other : ranks) {
      if (other->device == rk->device) {
        say(rk->rank,
            "FAIL: ranks %d and %d of one process (one node) share GPU %d; NCCL refuses a duplicate GPU "
            "within a node: give them distinct devices or use --ranks-per-proc 1",
            other->rank, rk->rank, rk->device);
        return 1;
      }
    }
    ranks.push_back(std::move(rk));
  }
  if (!share_unique_id(node, k)) return 1;

  std::vector<std::thread> threads;
  for (auto& rk : ranks) {
    Rank* r = rk.get();
    threads.emplace_back([&node, r] {
      const bool ok = run_rank(node, *r);
      std::lock_guard<std::mutex> lock(node.mutex);
      r->outcome = ok ? 1 : -1;
      node.changed.notify_all();
    });
  }
  // The watchdog: all ranks done, or one failed (the others get 3 s to say their own failure), or
  // the time is up. A rank that is still inside NCCL or a kernel cannot be unwound, so the process
  // exits from here with a line saying where each unfinished rank was.
  const auto deadline = Clock::now() + std::chrono::seconds(o.timeout_s - 5);
  auto count = [&](int outcome) {
    return int(std::count_if(ranks.begin(), ranks.end(), [&](const auto& r) { return r->outcome == outcome; }));
  };
  std::unique_lock<std::mutex> lock(node.mutex);
  node.changed.wait_until(lock, deadline, [&] { return count(0) == 0 || count(-1) > 0; });
  if (count(-1) > 0 && count(0) > 0)
    node.changed.wait_until(lock, std::min(deadline, Clock::now() + std::chrono::seconds(3)),
                            [&] { return count(0) == 0; });
  if (count(0) > 0) {
    for (const auto& r : ranks)
      if (r->outcome == 0) say(r->rank, "FAIL: still in %s when node %d gave up", r->phase.load(), k);
    fflush(stdout);
    _exit(1);
  }
  lock.unlock();
  for (auto& t : threads) t.join();
  if (count(1) == int(ranks.size())) return 0;
  // A failed rank may leave a communicator mid-way; exit without running its teardown.
  fflush(stdout);
  _exit(1);
}

}  // namespace epcomm::gin_probe
