// NCCL 2.28.9's network-plugin ABI, version 11: the tables NCCL looks up by name in a plugin
// library (ncclNetPlugin_v11, ncclGinPlugin_v11), their property struct and constants. NCCL's
// installed headers do not carry them, so they are declared here, field for field, from NCCL's
// source at tag v2.28.9-1:
//   src/include/plugin/net/net_v11.h   ncclNetProperties_v11_t, ncclNet_v11_t, ncclGin_v11_t,
//                                      ncclNetVDeviceProps_v11_t, ncclNetCommConfig_v11_t,
//                                      ncclNetAttr_v11_t
//   src/include/plugin/nccl_net.h      NCCL_NET_HANDLE_MAXSIZE, NCCL_PTR_*, NCCL_NET_SIGNAL_OP_*,
//                                      NCCL_NET_MAX_REQUESTS, NCCL_NET_MAX_DEVS_PER_NIC,
//                                      NCCL_MAX_NET_SIZE_BYTES, NCCL_NET_OPTIONAL_RECV_COMPLETION
//   src/include/nccl_device/net_device.h  ncclNetDeviceType, ncclNetDeviceHandle_v11_t
//   src/include/nccl_common.h          ncclDebugLogger_t, ncclProfilerCallback_t, log levels and
//                                      subsystem flags
// The static_asserts below pin the layout (x86-64 / aarch64 LP64); a field added or moved in a
// later NCCL changes these offsets, and a plugin built against the wrong layout would be called
// through the wrong slots, so check them again before moving to another NCCL version.
#pragma once

#include <nccl.h>  // ncclResult_t: its values are part of NCCL's public header

#include <cstddef>
#include <cstdint>

namespace epcomm::loopback::abi {

// src/include/plugin/nccl_net.h
constexpr int kNetHandleMaxSize = 128;              // NCCL_NET_HANDLE_MAXSIZE
constexpr int kPtrHost = 0x1;                       // NCCL_PTR_HOST
constexpr int kPtrCuda = 0x2;                       // NCCL_PTR_CUDA
constexpr int kPtrDmaBuf = 0x4;                     // NCCL_PTR_DMABUF
constexpr uint32_t kSignalOpInc = 0x1;              // NCCL_NET_SIGNAL_OP_INC
constexpr uint32_t kSignalOpAdd = 0x2;              // NCCL_NET_SIGNAL_OP_ADD
constexpr int kNetMaxRequests = 32;                 // NCCL_NET_MAX_REQUESTS (per comm object)
constexpr int kNetMaxDevsPerNic = 4;                // NCCL_NET_MAX_DEVS_PER_NIC
constexpr size_t kMaxNetSizeBytes = 1ull << 40;     // NCCL_MAX_NET_SIZE_BYTES
constexpr uintptr_t kOptionalRecvCompletion = 0x1;  // NCCL_NET_OPTIONAL_RECV_COMPLETION

// src/include/nccl_device/net_device.h (a C enum: int-sized)
enum NetDeviceType : int {
  kNetDeviceHost = 0,      // NCCL_NET_DEVICE_HOST
  kNetDeviceUnpack = 1,    // NCCL_NET_DEVICE_UNPACK
  kNetDeviceGinProxy = 2,  // NCCL_NET_DEVICE_GIN_PROXY
  kNetDeviceGinGdaki = 3,  // NCCL_NET_DEVICE_GIN_GDAKI
};
constexpr int kNetDeviceInvalidVersion = 0;  // NCCL_NET_DEVICE_INVALID_VERSION

struct NetDeviceHandle {  // ncclNetDeviceHandle_v11_t (= _v7_t)
  NetDeviceType netDeviceType;
  int netDeviceVersion;
  void* handle;
  size_t size;
  int needsProxyProgress;
};

// src/include/nccl_common.h
enum LogLevel : int { kLogNone = 0, kLogVersion = 1, kLogWarn = 2, kLogInfo = 3, kLogAbort = 4, kLogTrace = 5 };
constexpr unsigned long kLogSubsysInit = 0x1;  // NCCL_INIT
constexpr unsigned long kLogSubsysNet = 0x10;  // NCCL_NET
using DebugLogger = void (*)(LogLevel level, unsigned long flags, const char* file, int line, const char* fmt, ...);
using ProfilerCallback = ncclResult_t (*)(void** eHandle, int type, void* pHandle, int64_t pluginId, void* extData);

// src/include/plugin/net/net_v11.h
struct NetVDeviceProps {  // ncclNetVDeviceProps_v11_t
  int ndevs;
  int devs[kNetMaxDevsPerNic];
};

struct NetCommConfig {  // ncclNetCommConfig_v11_t
  int trafficClass;
};

struct NetProperties {  // ncclNetProperties_v11_t
  char* name;
  char* pciPath;
  uint64_t guid;
  int ptrSupport;
  int regIsGlobal;
  int forceFlush;
  int speed;  // Mbps
  int port;
  float latency;
  int maxComms;
  int maxRecvs;
  NetDeviceType netDeviceType;
  int netDeviceVersion;
  NetVDeviceProps vProps;
  size_t maxP2pBytes;
  size_t maxCollBytes;
  int maxMultiRequestSize;
};

struct NetCommAttr {  // ncclNetCommAttr_v11_t
  int32_t maxConcurrentPeers;
  int32_t minConcurrentPeers;
  int32_t maxFlowsPerPeer;
  int32_t minFlowsPerPeer;
};

struct NetAttr {  // ncclNetAttr_v11_t
  NetCommAttr sendCommAttr;
  NetCommAttr recvCommAttr;
  uint32_t op;
  uint32_t algo;
  uint32_t proto;
};

struct Net {  // ncclNet_v11_t: the slot order is the ABI
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, NetCommConfig* config, DebugLogger logFunction,
                       ProfilerCallback profFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, NetProperties* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, int dev, void* handle, void** sendComm, NetDeviceHandle** sendDevComm);
  ncclResult_t (*accept)(void* listenComm, void** recvComm, NetDeviceHandle** recvDevComm);
  ncclResult_t (*regMr)(void* comm, void* data, size_t size, int type, void** mhandle);
  ncclResult_t (*regMrDmaBuf)(void* comm, void* data, size_t size, int type, uint64_t offset, int fd, void** mhandle);
  ncclResult_t (*deregMr)(void* comm, void* mhandle);
  ncclResult_t (*isend)(void* sendComm, void* data, size_t size, int tag, void* mhandle, void* phandle, void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, size_t* sizes, int* tags, void** mhandles, void** phandles,
                        void** request);
  ncclResult_t (*iflush)(void* recvComm, int n, void** data, int* sizes, void** mhandles, void** request);
  ncclResult_t (*test)(void* request, int* done, int* sizes);
  ncclResult_t (*closeSend)(void* sendComm);
  ncclResult_t (*closeRecv)(void* recvComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*getDeviceMr)(void* comm, void* mhandle, void** dptr_mhandle);
  ncclResult_t (*irecvConsumed)(void* recvComm, int n, void* request);
  ncclResult_t (*makeVDevice)(int* d, NetVDeviceProps* props);
  ncclResult_t (*finalize)(void* ctx);
  ncclResult_t (*setNetAttr)(void* ctx, NetAttr* netAttr);
};

struct Gin {  // ncclGin_v11_t: the slot order is the ABI
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, DebugLogger logFunction);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, NetProperties* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, void* handles[], int nranks, int rank, void* listenComm, void** collComm);
  ncclResult_t (*createContext)(void* collComm, int nSignals, int nCounters, void** ginCtx,
                                NetDeviceHandle** devHandle);
  ncclResult_t (*regMrSym)(void* collComm, void* data, size_t size, int type, uint64_t mrFlags, void** mhandle,
                           void** ginHandle);
  ncclResult_t (*regMrSymDmaBuf)(void* collComm, void* data, size_t size, int type, uint64_t offset, int fd,
                                 uint64_t mrFlags, void** mhandle, void** ginHandle);
  ncclResult_t (*deregMrSym)(void* collComm, void* mhandle);
  ncclResult_t (*destroyContext)(void* ginCtx);
  ncclResult_t (*closeColl)(void* collComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*iput)(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size, uint64_t dstOff,
                       void* dstMhandle, uint32_t rank, void** request);
  ncclResult_t (*iputSignal)(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size, uint64_t dstOff,
                             void* dstMhandle, uint32_t rank, uint64_t signalOff, void* signalMhandle,
                             uint64_t signalValue, uint32_t signalOp, void** request);
  ncclResult_t (*test)(void* collComm, void* request, int* done);
  ncclResult_t (*ginProgress)(void* collComm);
  ncclResult_t (*queryLastError)(void* ginCtx, bool* hasError);
  ncclResult_t (*finalize)(void* ctx);
};

// Layout pins, computed by hand from the declarations in net_v11.h / net_device.h (LP64).
static_assert(sizeof(NetDeviceHandle) == 32 && offsetof(NetDeviceHandle, needsProxyProgress) == 24);
static_assert(offsetof(NetProperties, ptrSupport) == 24 && offsetof(NetProperties, latency) == 44);
static_assert(offsetof(NetProperties, netDeviceType) == 56 && offsetof(NetProperties, vProps) == 64);
static_assert(offsetof(NetProperties, maxP2pBytes) == 88 && offsetof(NetProperties, maxMultiRequestSize) == 104);
static_assert(sizeof(NetProperties) == 112);
static_assert(sizeof(Net) == 22 * sizeof(void*) && offsetof(Net, setNetAttr) == 21 * sizeof(void*));
static_assert(sizeof(Gin) == 19 * sizeof(void*) && offsetof(Gin, iputSignal) == 14 * sizeof(void*));
static_assert(offsetof(Gin, finalize) == 18 * sizeof(void*));

}  // namespace epcomm::loopback::abi
