// What a kernel needs to reach other nodes through NCCL GIN (transport/net_gin.cuh), as plain data
// the host fills (GinContext::params). Host files may include it: NCCL's device headers declare
// their device functions only under __CUDACC__ (CUDA 13 keeps cuda/std under include/cccl, which
// the library's include path carries).
#pragma once

#include <nccl.h>
#include <nccl_device.h>

#include <cstddef>
#include <cstdint>

namespace epcomm {

// The one GIN context every put, signal, signal read and flush uses. In NCCL 2.28.9 a context owns
// its signals (proxy and GDAKI keep one signal array per context: nccl_device/gin/proxy/gin_proxy.h,
// gdaki/gin_gdaki.h), a signal orders only the puts issued before it on its context to the same
// peer (nccl_device/gin.h), and a flush covers one context: so a sender's puts, its signal and the
// receiver's read of that signal must all use the same context.
constexpr int kGinContext = 0;

struct GinNetParams {
  ncclDevComm comm{};             // from ncclDevCommCreate (GinContext)
  ncclWindow_t window = nullptr;  // the symmetric window of the Buffer's region (ncclCommWindowRegister)
  size_t region = 0;              // offset of the region the kernel's put offsets are relative to
  uint32_t signal_base = 0;       // first of this region's GIN signals (ids relative to the devcomm's)
  char* local = nullptr;          // this rank's region (local pointer)
  uint64_t* stats = nullptr;      // local: [0] puts, [1] bytes put to ranks of other nodes
  int ranks_per_node = 1;         // which puts the statistics count (those to other nodes)
};

}  // namespace epcomm
