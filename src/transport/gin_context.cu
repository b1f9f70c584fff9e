// GinContext (gin_context.hpp): the GIN device communicator of a symmetric allocation across nodes,
// the agreement that makes every rank fail alike, and the two small kernels NCCL's device-only
// signal API needs (reset, read).
#include <nccl.h>
#include <nccl_device.h>
#include <nccl_device/gin/proxy/gin_proxy_device_host_common.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/call_check.hpp"
#include "epcomm/error.hpp"
#include "kernels/common/launch.hpp"
#include "kernels/common/ptx.cuh"
#include "transport/gin_context.hpp"
#include "transport/nccl_lsa.hpp"

namespace epcomm {
namespace {

__global__ void gin_reset_signals_kernel(const __grid_constant__ ncclDevComm comm, uint32_t first, uint32_t count) {
  // Every context: signals are per context; epcomm uses kGinContext only, the others are zeroed
  // too so that nothing stale survives whichever context a later version uses.
  for (int c = 0; c < comm.ginContextCount; ++c) {
    ncclGin gin(comm, c);
    for (uint32_t i = threadIdx.x; i < count; i += blockDim.x) gin.resetSignal(first + i);
  }
}

__global__ void gin_read_signals_kernel(const __grid_constant__ ncclDevComm comm, uint32_t first, uint32_t count,
                                        uint64_t* out) {
  ncclGin gin(comm, kGinContext);
  for (uint32_t i = threadIdx.x; i < count; i += blockDim.x) out[i] = gin.readSignal(first + i);
}

// Waits until the transport took every put and signal this rank posted (what a flush waits for, on
// every context), at most timeout_ns per peer; counts the peers still pending in *pending. The
// proxy backend's producer/consumer indices are read directly so that the wait is bounded (NCCL's
// flush is not); other backends use NCCL's flush.
__global__ void gin_drain_kernel(const __grid_constant__ ncclDevComm comm, uint64_t timeout_ns, int* pending) {
  for (int c = 0; c < comm.ginContextCount; ++c) {
    if (comm.ginTypes[c] != static_cast<uint8_t>(NCCL_NET_DEVICE_GIN_PROXY)) {
      ncclGin(comm, c).flush(ncclCoopCta{});
      continue;
    }
    const auto* q = static_cast<const ncclGinProxyGpuCtx_t*>(comm.ginHandles[c]);
    for (int pe = static_cast<int>(threadIdx.x); pe < comm.nRanks; pe += static_cast<int>(blockDim.x)) {
      const uint32_t posted = dev::ld_volatile(q->pis + pe);
      const uint64_t start = dev::global_timer_ns();
      while (static_cast<int32_t>(dev::ld_acquire_sys(q->cis + pe) - posted) < 0) {
        if (dev::global_timer_ns() - start > timeout_ns) {
          atomicAdd(pending, 1);
          break;
        }
      }
    }
  }
}

const KernelRegistration kKernels({reinterpret_cast<const void*>(gin_reset_signals_kernel),
                                   reinterpret_cast<const void*>(gin_read_signals_kernel),
                                   reinterpret_cast<const void*>(gin_drain_kernel)},
                                  KernelSet::kGin);

// Every rank's `bytes` bytes, in rank order (a small NCCL all-gather through device memory).
std::vector<char> all_gather(ncclComm_t comm, int rank, int size, const void* mine, size_t bytes, cudaStream_t stream) {
  char* dev = nullptr;
  EPCOMM_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&dev), bytes * size, stream));
  std::vector<char> all(bytes * size);
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(dev + rank * bytes, mine, bytes, cudaMemcpyHostToDevice, stream));
  const ncclResult_t r = ncclAllGather(dev + rank * bytes, dev, bytes, ncclUint8, comm, stream);
  if (r == ncclSuccess)
    EPCOMM_CUDA_CHECK(cudaMemcpyAsync(all.data(), dev, bytes * size, cudaMemcpyDeviceToHost, stream));
  EPCOMM_CUDA_CHECK(cudaFreeAsync(dev, stream));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
  EPCOMM_NCCL_CHECK(r);
  return all;
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

constexpr size_t kErrorText = 384;  // bytes of each rank's NCCL error text in the agreement

}  // namespace

std::string gin_settings_line() {
  // NCCL reads these (src/gin/gin_host.cc, src/plugin/net.cc): a GIN table comes from the net
  // plugin, which NCCL_NET_PLUGIN / NCCL_NET choose; NCCL_GIN_ENABLE=0 switches GIN off and
  // NCCL_GIN_TYPE asks for one backend. The plugin's path may differ between nodes, so only
  // whether one is named counts.
  const auto value = [](const char* name) {
    const char* v = std::getenv(name);
    return std::string(name) + "=" + (v ? v : "(unset)");
  };
  const char* plugin = std::getenv("NCCL_NET_PLUGIN");
  return std::string("NCCL_NET_PLUGIN ") + (plugin && *plugin ? "set" : "unset") + ", " + value("NCCL_NET") + ", " +
         value("NCCL_GIN_ENABLE") + ", " + value("NCCL_GIN_TYPE");
}

uint64_t settings_hash(const std::string& line) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char ch : line) h = (h ^ ch) * 1099511628211ull;
  return h;
}

std::vector<int> ranks_disagreeing(const std::vector<uint64_t>& hashes) {
  std::vector<int> out;
  for (size_t r = 1; r < hashes.size(); ++r)
    if (hashes[r] != hashes[0]) out.push_back(static_cast<int>(r));
  return out;
}

std::unique_ptr<GinContext> GinContext::create(ncclComm_t comm, int rank, int size, int num_signals,
                                               cudaStream_t stream) {
  const int lsa = nccl_lsa_size(comm);
  const std::string why = "the group spans nodes (NCCL's load/store team has " + std::to_string(lsa) + " of its " +
                          std::to_string(size) + " ranks), so epcomm reaches the ranks of other nodes through NCCL GIN";

  // 1. The same GIN settings everywhere, before any rank enters NCCL's GIN connection (a rank
  // that has GIN would wait there for one that has none).
  const std::string line = gin_settings_line();
  const uint64_t hash = settings_hash(line);
  const std::vector<char> hashes_raw = all_gather(comm, rank, size, &hash, sizeof(hash), stream);
  std::vector<uint64_t> hashes(size);
  std::memcpy(hashes.data(), hashes_raw.data(), sizeof(uint64_t) * size);
  if (const std::vector<int> bad = ranks_disagreeing(hashes); !bad.empty())
    throw RuntimeFailure("epcomm rank " + std::to_string(rank) + ": " + why +
                         ", and the ranks disagree on NCCL's GIN "
                         "settings: rank(s) " +
                         rank_list(bad) + " differ from rank 0 (this rank: " + line +
                         "); set them alike on every rank");

  // 2. The device communicator: GIN signals only (no barriers, counters or multimem).
  ncclDevCommRequirements reqs;
  std::memset(&reqs, 0, sizeof(reqs));
  reqs.ginSignalCount = num_signals;
  reqs.ginForceEnable = true;
  reqs.ginContextCount = 1;  // a hint (unread by 2.28.9); epcomm uses context kGinContext only
  ncclDevComm dev;
  std::memset(&dev, 0, sizeof(dev));
  const ncclResult_t res = ncclDevCommCreate(comm, &reqs, &dev);
  char error[kErrorText] = {};
  if (res != ncclSuccess) {
    const char* last = ncclGetLastError(comm);
    std::snprintf(error, sizeof(error), "%s%s%s", ncclGetErrorString(res), last && *last ? ": " : "", last ? last : "");
  } else if (dev.ginContextCount < 1 || dev.ginSignalCount < num_signals) {
    std::snprintf(error, sizeof(error), "ncclDevCommCreate gave %d GIN contexts and %d signals (asked for %d signals)",
                  static_cast<int>(dev.ginContextCount), dev.ginSignalCount, num_signals);
  } else {
    // NCCL hands out signal ranges from a pool and does not clear a range a destroyed device
    // communicator gave back (ncclGinAllocSignalsCounters): an earlier Buffer's totals may be there.
    // No peer signals before the Buffer's closing barrier, so this cannot race.
    gin_reset_signals_kernel<<<1, 256, 0, stream>>>(dev, 0, static_cast<uint32_t>(num_signals));
    cudaError_t e = cudaPeekAtLastError();
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
    if (e != cudaSuccess) {
      cudaGetLastError();
      std::snprintf(error, sizeof(error), "resetting the new GIN signals: %s", cudaGetErrorString(e));
    }
  }

  // 3. Every rank learns every rank's outcome, so all throw here or none does.
  const std::vector<char> errors = all_gather(comm, rank, size, error, sizeof(error), stream);
  std::vector<int> failed;
  std::string texts;
  for (int r = 0; r < size; ++r) {
    const char* e = errors.data() + static_cast<size_t>(r) * kErrorText;
    if (e[0] == '\0') continue;
    failed.push_back(r);
    if (failed.size() <= 4)
      texts += " [rank " + std::to_string(r) + ": " + std::string(e, strnlen(e, kErrorText)) + "]";
  }
  if (!failed.empty()) {
    if (res == ncclSuccess) ncclDevCommDestroy(comm, &dev);
    throw RuntimeFailure("epcomm rank " + std::to_string(rank) + ": " + why +
                         ", and NCCL could not create the GIN "
                         "device communicator (ncclDevCommCreate with " +
                         std::to_string(num_signals) + " GIN signals) on rank(s) " + rank_list(failed) + ":" + texts +
                         ". GIN needs a network plugin with a GIN implementation (NCCL 2.28: the built-in IB plugin "
                         "on a GPUDirect RDMA NIC, or one NCCL_NET_PLUGIN names) and NCCL_GIN_ENABLE unset or 1");
  }
  return std::unique_ptr<GinContext>(new GinContext(comm, dev, num_signals));
}

GinContext::~GinContext() { ncclDevCommDestroy(comm_, &dev_); }

GinNetParams GinContext::params(size_t region, uint32_t signal_base, char* local, uint64_t* stats,
                                int ranks_per_node) const {
  GinNetParams g;
  g.comm = dev_;
  g.window = window_;
  g.region = region;
  g.signal_base = signal_base;
  g.local = local;
  g.stats = stats;
  g.ranks_per_node = ranks_per_node;
  return g;
}

void GinContext::reset_signals(uint32_t first, uint32_t count, cudaStream_t stream) const {
  if (count == 0) return;
  gin_reset_signals_kernel<<<1, 256, 0, stream>>>(dev_, first, count);
  EPCOMM_LAUNCH_CHECK("gin_reset_signals_kernel");
}

int GinContext::drain(cudaStream_t stream, uint64_t timeout_ns) const {
  int* pending = nullptr;
  EPCOMM_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&pending), sizeof(int), stream));
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(pending, 0, sizeof(int), stream));
  gin_drain_kernel<<<1, 256, 0, stream>>>(dev_, timeout_ns, pending);
  EPCOMM_LAUNCH_CHECK("gin_drain_kernel");
  int host = 0;
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(&host, pending, sizeof(int), cudaMemcpyDeviceToHost, stream));
  EPCOMM_CUDA_CHECK(cudaFreeAsync(pending, stream));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

std::vector<uint64_t> GinContext::read_signals(uint32_t first, uint32_t count, cudaStream_t stream) const {
  std::vector<uint64_t> out(count);
  if (count == 0) return out;
  uint64_t* dev = nullptr;
  EPCOMM_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&dev), sizeof(uint64_t) * count, stream));
  gin_read_signals_kernel<<<1, 256, 0, stream>>>(dev_, first, count, dev);
  EPCOMM_LAUNCH_CHECK("gin_read_signals_kernel");
  EPCOMM_CUDA_CHECK(cudaMemcpyAsync(out.data(), dev, sizeof(uint64_t) * count, cudaMemcpyDeviceToHost, stream));
  EPCOMM_CUDA_CHECK(cudaFreeAsync(dev, stream));
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
  return out;
}

}  // namespace epcomm
