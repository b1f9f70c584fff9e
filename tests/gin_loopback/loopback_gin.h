// The GIN half of the loopback plugin (ncclGin_v11 entry points), proxy type
// (NCCL_NET_DEVICE_GIN_PROXY): NCCL's host proxy (src/gin/gin_host_proxy.cc at v2.28.9-1) reads
// the GPU's put descriptors and calls iput / iputSignal / test from its GIN progress thread; this
// plugin moves the bytes between the fake nodes' processes.
//
// A put, as the plugin carries it:
//   sender  copies the source bytes out (cudaMemcpy from its registered window on a private
//           stream, or from host memory for NCCL's inline values) and sends {target's
//           registration index, offset, bytes, signal registration/offset/op/value, sequence
//           number} and the bytes on the TCP connection to the target rank;
//   target  (its own progress: ginProgress / test, called by its NCCL progress thread) copies the
//           bytes into its own registration on its private stream, waits for the copy, then
//           applies the signal as a read-modify-write of the 64-bit word at the signal offset
//           (read on the same stream, one cuStreamWriteValue64 of the new value), and
//           acknowledges with the sequence number;
//   test()  reports a put done when its acknowledgement has arrived.
// So a put's data is visible before its signal, and the puts from one rank to another complete
// in order (one connection, one progress thread on each side).
//
// Registration indexes mean the same memory on every rank because regMrSym is collective and every
// rank registers in the same order (NCCL's signals buffer and inline buffer per context, then each
// symmetric window); an index is never reused. The mhandle a registration returns is also its
// ginHandle: NCCL's proxy passes the device's window handle (the ginHandle) as iput's source and
// destination, and the inline buffer's mhandle as a source.
//
// Known limit: the read-modify-write of a signal is not atomic against the GPU. NCCL's
// resetSignal() (a plain store by the device) racing with an incoming signal can be lost, which
// NCCL's contract already forbids ("may not race with concurrent modifications").
#pragma once

#include "nccl_plugin_abi.h"

namespace epcomm::loopback::gin {

ncclResult_t init(void** ctx, uint64_t comm_id, abi::DebugLogger logger);
ncclResult_t devices(int* ndev);
ncclResult_t get_properties(int dev, abi::NetProperties* props);
ncclResult_t listen(void* ctx, int dev, void* handle, void** listen_comm);
ncclResult_t connect(void* ctx, void* handles[], int nranks, int rank, void* listen_comm, void** coll_comm);
ncclResult_t create_context(void* coll_comm, int n_signals, int n_counters, void** gin_ctx,
                            abi::NetDeviceHandle** dev_handle);
ncclResult_t reg_mr_sym(void* coll_comm, void* data, size_t size, int type, uint64_t mr_flags, void** mhandle,
                        void** gin_handle);
ncclResult_t reg_mr_sym_dma_buf(void* coll_comm, void* data, size_t size, int type, uint64_t offset, int fd,
                                uint64_t mr_flags, void** mhandle, void** gin_handle);
ncclResult_t dereg_mr_sym(void* coll_comm, void* mhandle);
ncclResult_t destroy_context(void* gin_ctx);
ncclResult_t close_coll(void* coll_comm);
ncclResult_t close_listen(void* listen_comm);
ncclResult_t iput(void* coll_comm, uint64_t src_off, void* src_mhandle, size_t size, uint64_t dst_off,
                  void* dst_mhandle, uint32_t rank, void** request);
ncclResult_t iput_signal(void* coll_comm, uint64_t src_off, void* src_mhandle, size_t size, uint64_t dst_off,
                         void* dst_mhandle, uint32_t rank, uint64_t signal_off, void* signal_mhandle,
                         uint64_t signal_value, uint32_t signal_op, void** request);
ncclResult_t test(void* coll_comm, void* request, int* done);
ncclResult_t progress(void* coll_comm);
ncclResult_t query_last_error(void* gin_ctx, bool* has_error);
ncclResult_t finalize(void* ctx);

constexpr const char* kGinName = "EpcommLoopbackGin";

}  // namespace epcomm::loopback::gin
