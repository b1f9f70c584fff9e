// The net half of the loopback plugin (ncclNet_v11 entry points): NCCL's own traffic between the
// fake nodes of one host, host memory only, one TCP connection per NCCL connection.
//
// Semantics NCCL expects (src/include/plugin/net/net_v11.h, src/transport/net.cc at v2.28.9-1):
// connect/accept must not block (they return a null comm until the connection is up; NCCL calls
// them again with the same handle, which therefore carries the connect stage); messages on a
// connection are matched in order; a receive may be larger than the message and reports the size
// received; isend/irecv may return a null request when they cannot take more (NCCL retries).
// Progress happens inside test(): the requests of a connection advance in posting order.
#pragma once

#include "nccl_plugin_abi.h"

namespace epcomm::loopback::net {

ncclResult_t init(void** ctx, uint64_t comm_id, abi::NetCommConfig* config, abi::DebugLogger logger,
                  abi::ProfilerCallback profiler);
ncclResult_t devices(int* ndev);
ncclResult_t get_properties(int dev, abi::NetProperties* props);
ncclResult_t listen(void* ctx, int dev, void* handle, void** listen_comm);
ncclResult_t connect(void* ctx, int dev, void* handle, void** send_comm, abi::NetDeviceHandle** send_dev_comm);
ncclResult_t accept(void* listen_comm, void** recv_comm, abi::NetDeviceHandle** recv_dev_comm);
ncclResult_t reg_mr(void* comm, void* data, size_t size, int type, void** mhandle);
ncclResult_t reg_mr_dma_buf(void* comm, void* data, size_t size, int type, uint64_t offset, int fd, void** mhandle);
ncclResult_t dereg_mr(void* comm, void* mhandle);
ncclResult_t isend(void* send_comm, void* data, size_t size, int tag, void* mhandle, void* phandle, void** request);
ncclResult_t irecv(void* recv_comm, int n, void** data, size_t* sizes, int* tags, void** mhandles, void** phandles,
                   void** request);
ncclResult_t iflush(void* recv_comm, int n, void** data, int* sizes, void** mhandles, void** request);
ncclResult_t test(void* request, int* done, int* sizes);
ncclResult_t close_send(void* send_comm);
ncclResult_t close_recv(void* recv_comm);
ncclResult_t close_listen(void* listen_comm);
ncclResult_t finalize(void* ctx);

// The name NCCL matches against NCCL_NET, and the one device's properties (shared with the GIN
// half, which reports the same device with another netDeviceType).
constexpr const char* kNetName = "EpcommLoopback";
void fill_properties(int dev, abi::NetProperties* props);

}  // namespace epcomm::loopback::net
