// libnccl-net-epcomm-loopback.so: a test-only network for NCCL 2.28.9 that lets processes of one
// host, started as different "nodes" (distinct NCCL_HOSTID), run NCCL's real GIN code path on a
// machine with no NIC. Never linked into libepcomm.
//
// It exports the two tables NCCL looks up in a net plugin (src/plugin/net.cc, net/net_v11.cc):
//   ncclNetPlugin_v11  "EpcommLoopback": NCCL's own traffic over 127.0.0.1 TCP, host memory only
//                      (loopback_net.h);
//   ncclGinPlugin_v11  "EpcommLoopbackGin": GIN of proxy type, puts and signals between the
//                      processes (loopback_gin.h).
//
// Environment that selects it (set by epcomm-gin-probe and scripts/gin-probe.sh):
//   NCCL_NET_PLUGIN=<path to this .so>  NCCL dlopens the value as given, else libnccl-net-<value>.so
//   NCCL_NET=EpcommLoopback             optional: refuse NCCL's built-in IB/socket nets, so a
//                                       failure to load this plugin is an error, not a fallback
//   NCCL_GIN_TYPE=2                     optional: NCCL checks the GIN type it gets against it
//   NCCL_HOSTID=<distinct per process>  makes each process its own node (nNodes > 1)
//   EPCOMM_LOOPBACK_TIMEOUT_MS          the bound on every wait in the plugin (default 120000)
//   EPCOMM_LOOPBACK_DEAD_PEERS=1        a peer that closes with work in flight has died: its puts are
//                                       dropped and the others go on (process-death tests); default:
//                                       an error of the whole GIN communicator
// NCCL's GIN is used only when its net plugin carries a GIN table: the external plugin comes
// first in NCCL's list, and the GIN table is taken from the same library as the net.
#include "loopback_gin.h"
#include "loopback_net.h"
#include "nccl_plugin_abi.h"

namespace lb = epcomm::loopback;

#define LB_EXPORT extern "C" __attribute__((visibility("default")))

LB_EXPORT const lb::abi::Net ncclNetPlugin_v11 = {
    lb::net::kNetName,
    lb::net::init,
    lb::net::devices,
    lb::net::get_properties,
    lb::net::listen,
    lb::net::connect,
    lb::net::accept,
    lb::net::reg_mr,
    lb::net::reg_mr_dma_buf,
    lb::net::dereg_mr,
    lb::net::isend,
    lb::net::irecv,
    lb::net::iflush,
    lb::net::test,
    lb::net::close_send,
    lb::net::close_recv,
    lb::net::close_listen,
    nullptr,  // getDeviceMr: no device offload
    nullptr,  // irecvConsumed: no device offload
    nullptr,  // makeVDevice: NCCL then uses the physical device (src/graph/topo.cc)
    lb::net::finalize,
    nullptr,  // setNetAttr: optional (src/transport/net.cc checks for null)
};

LB_EXPORT const lb::abi::Gin ncclGinPlugin_v11 = {
    lb::gin::kGinName,
    lb::gin::init,
    lb::gin::devices,
    lb::gin::get_properties,
    lb::gin::listen,
    lb::gin::connect,
    lb::gin::create_context,
    lb::gin::reg_mr_sym,
    lb::gin::reg_mr_sym_dma_buf,
    lb::gin::dereg_mr_sym,
    lb::gin::destroy_context,
    lb::gin::close_coll,
    lb::gin::close_listen,
    lb::gin::iput,
    lb::gin::iput_signal,
    lb::gin::test,
    lb::gin::progress,
    lb::gin::query_last_error,
    lb::gin::finalize,
};
