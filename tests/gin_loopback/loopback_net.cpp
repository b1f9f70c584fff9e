// The net half of the loopback plugin (loopback_net.h). Wire format: each message is an 8-byte
// length followed by its bytes, on the connection's own TCP socket.
#include "loopback_net.h"

#include <chrono>
#include <cstdlib>
#include <deque>

#include "loopback_socket.h"

namespace epcomm::loopback::net {
namespace {

// The first bytes a connector sends: the listener's nonce proves the connection is meant for it.
struct Hello {
  uint64_t magic;
  uint64_t nonce;
};
constexpr uint64_t kHelloMagic = 0x31544e424c504545ull;  // "EEPLBNT1"

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// NCCL calls connect() again with the same handle until it returns a comm, so the handle carries
// the connect stage (after the endpoint the listener filled). The listener zeroes it: kStart.
enum class Stage : int32_t { kStart = 0, kConnecting = 1, kHello = 2, kDone = 3 };
struct ConnectStage {
  Stage state;
  int32_t fd;
  uint32_t hello_sent;
  uint32_t pad;
  int64_t started_ms;
};
struct NetHandle {
  Endpoint endpoint;
  ConnectStage stage;
};
static_assert(sizeof(NetHandle) <= abi::kNetHandleMaxSize, "a net handle must fit NCCL_NET_HANDLE_MAXSIZE");

struct ListenComm {
  int fd = -1;
  Endpoint endpoint{};
  int pending_fd = -1;  // accepted, hello not yet read
  Hello hello{};
  size_t hello_got = 0;
  int64_t waiting_since_ms = 0;  // first accept() call without a connection; 0 = not waiting
};

struct Comm;
struct Request {
  Comm* comm = nullptr;
  bool in_use = false;
  bool done = false;
  char* data = nullptr;
  size_t size = 0;         // send: the message size; receive: the posted capacity
  uint64_t wire_size = 0;  // the length on the wire (send: = size; receive: read from the header)
  size_t header_done = 0;
  size_t data_done = 0;
};

struct Comm {
  int fd = -1;
  bool is_send = false;
  Request requests[abi::kNetMaxRequests];
  std::deque<Request*> pending;  // posted and not finished, in posting order
};

int dummy_context;
int dummy_mhandle;

Request* take_request(Comm* comm) {
  for (Request& r : comm->requests) {
    if (!r.in_use) {
      r = Request{};
      r.comm = comm;
      r.in_use = true;
      return &r;
    }
  }
  return nullptr;  // NCCL_NET_MAX_REQUESTS in flight: NCCL retries later
}

// Moves the front request as far as the socket allows; *blocked when the socket would block.
ncclResult_t advance(Comm* comm, Request* r, bool* blocked) {
  *blocked = false;
  size_t moved = 0;
  bool closed = false;
  char* header = reinterpret_cast<char*>(&r->wire_size);
  if (r->header_done < sizeof(r->wire_size)) {
    if (comm->is_send) {
      LB_CHECK(send_some(comm->fd, header + r->header_done, sizeof(r->wire_size) - r->header_done, &moved, &closed));
    } else {
      LB_CHECK(recv_some(comm->fd, header + r->header_done, sizeof(r->wire_size) - r->header_done, &moved, &closed));
    }
    r->header_done += moved;
    if (r->header_done == sizeof(r->wire_size) && !comm->is_send && r->wire_size > r->size) {
      LB_WARN("loopback net: a message of %llu bytes arrived for a receive of %zu bytes",
              static_cast<unsigned long long>(r->wire_size), r->size);
      return ncclInternalError;
    }
  } else {
    const size_t left = r->wire_size - r->data_done;
    if (comm->is_send) {
      LB_CHECK(send_some(comm->fd, r->data + r->data_done, left, &moved, &closed));
    } else {
      LB_CHECK(recv_some(comm->fd, r->data + r->data_done, left, &moved, &closed));
    }
    r->data_done += moved;
  }
  if (closed) {
    LB_WARN("loopback net: the peer closed the connection with a %s of %llu bytes in flight",
            comm->is_send ? "send" : "receive", static_cast<unsigned long long>(r->wire_size));
    return ncclSystemError;
  }
  if (r->header_done == sizeof(r->wire_size) && r->data_done == r->wire_size) {
    r->done = true;
  } else if (moved == 0) {
    *blocked = true;
  }
  return ncclSuccess;
}

// Advances the comm's requests in posting order until the socket would block.
ncclResult_t progress(Comm* comm) {
  while (!comm->pending.empty()) {
    Request* r = comm->pending.front();
    bool blocked = false;
    LB_CHECK(advance(comm, r, &blocked));
    if (r->done) {
      comm->pending.pop_front();
    } else if (blocked) {
      break;
    }
  }
  return ncclSuccess;
}

ncclResult_t check_waiting(int64_t since_ms, const char* what) {
  if (since_ms != 0 && now_ms() - since_ms > timeout_ms()) {
    LB_WARN("loopback net: %s did not complete within %d ms (EPCOMM_LOOPBACK_TIMEOUT_MS)", what, timeout_ms());
    return ncclSystemError;
  }
  return ncclSuccess;
}

}  // namespace

void fill_properties(int dev, abi::NetProperties* props) {
  *props = abi::NetProperties{};
  props->name = const_cast<char*>("epcomm-loopback");
  props->pciPath = nullptr;  // no PCI device: NCCL attaches the NIC to the first CPU (src/graph/xml.cc)
  props->guid = 0x45504c42;
  props->ptrSupport = abi::kPtrHost;  // host memory only: NCCL stages GPU data through host buffers
  props->regIsGlobal = 0;
  props->forceFlush = 0;
  props->speed = 100000;  // nominal; tuning through a loopback socket means nothing
  props->port = 0;
  props->latency = 0;
  props->maxComms = 1 << 20;
  props->maxRecvs = 1;  // irecv takes one buffer
  props->netDeviceType = abi::kNetDeviceHost;
  props->netDeviceVersion = abi::kNetDeviceInvalidVersion;
  props->vProps.ndevs = 1;
  props->vProps.devs[0] = dev;
  props->maxP2pBytes = abi::kMaxNetSizeBytes;
  props->maxCollBytes = abi::kMaxNetSizeBytes;
  props->maxMultiRequestSize = 1;
}

ncclResult_t init(void** ctx, uint64_t, abi::NetCommConfig*, abi::DebugLogger logger, abi::ProfilerCallback) {
  set_logger(logger);
  *ctx = &dummy_context;
  return ncclSuccess;
}

ncclResult_t devices(int* ndev) {
  *ndev = 1;
  return ncclSuccess;
}

ncclResult_t get_properties(int dev, abi::NetProperties* props) {
  if (dev != 0) {
    LB_WARN("loopback net: getProperties for device %d; there is one device (0)", dev);
    return ncclInvalidArgument;
  }
  fill_properties(dev, props);
  return ncclSuccess;
}

ncclResult_t listen(void*, int, void* handle, void** listen_comm) {
  auto* l = new ListenComm;
  const ncclResult_t res = listen_socket(&l->fd, &l->endpoint);
  if (res != ncclSuccess) {
    close_fd(&l->fd);
    delete l;
    return res;
  }
  auto* h = static_cast<NetHandle*>(handle);
  memset(handle, 0, abi::kNetHandleMaxSize);
  h->endpoint = l->endpoint;
  *listen_comm = l;
  return ncclSuccess;
}

ncclResult_t connect(void*, int, void* handle, void** send_comm, abi::NetDeviceHandle**) {
  *send_comm = nullptr;
  auto* h = static_cast<NetHandle*>(handle);
  ConnectStage& st = h->stage;
  if (st.state == Stage::kStart) {
    st.fd = -1;
    int fd = -1;
    LB_CHECK(connect_start(h->endpoint, &fd));
    st.fd = fd;
    st.hello_sent = 0;
    st.started_ms = now_ms();
    st.state = Stage::kConnecting;
  }
  if (st.state == Stage::kDone) {
    LB_WARN("loopback net: connect called again on a handle that is already connected");
    return ncclInternalError;
  }
  if (st.state == Stage::kConnecting) {
    bool connected = false;
    LB_CHECK(connect_poll(st.fd, &connected));
    if (!connected) return check_waiting(st.started_ms, "connect");
    st.state = Stage::kHello;
  }
  const Hello hello{kHelloMagic, h->endpoint.nonce};
  size_t moved = 0;
  bool closed = false;
  LB_CHECK(send_some(st.fd, reinterpret_cast<const char*>(&hello) + st.hello_sent, sizeof(hello) - st.hello_sent,
                     &moved, &closed));
  if (closed) {
    LB_WARN("loopback net: the listener closed the connection during the handshake");
    return ncclSystemError;
  }
  st.hello_sent += static_cast<uint32_t>(moved);
  if (st.hello_sent < sizeof(hello)) return check_waiting(st.started_ms, "connect handshake");
  auto* comm = new Comm;
  comm->fd = st.fd;
  comm->is_send = true;
  st.fd = -1;
  st.state = Stage::kDone;
  *send_comm = comm;
  return ncclSuccess;
}

ncclResult_t accept(void* listen_comm, void** recv_comm, abi::NetDeviceHandle**) {
  *recv_comm = nullptr;
  auto* l = static_cast<ListenComm*>(listen_comm);
  if (l->waiting_since_ms == 0) l->waiting_since_ms = now_ms();
  if (l->pending_fd < 0) {
    LB_CHECK(accept_poll(l->fd, &l->pending_fd));
    if (l->pending_fd < 0) return check_waiting(l->waiting_since_ms, "accept");
    l->hello_got = 0;
  }
  size_t moved = 0;
  bool closed = false;
  LB_CHECK(recv_some(l->pending_fd, reinterpret_cast<char*>(&l->hello) + l->hello_got, sizeof(l->hello) - l->hello_got,
                     &moved, &closed));
  l->hello_got += moved;
  if (closed ||
      (l->hello_got == sizeof(l->hello) && (l->hello.magic != kHelloMagic || l->hello.nonce != l->endpoint.nonce))) {
    LB_WARN("loopback net: refused a connection on port %u (%s)", l->endpoint.port,
            closed ? "closed during the handshake" : "not for this listener: wrong magic or nonce");
    close_fd(&l->pending_fd);
    return ncclSystemError;
  }
  if (l->hello_got < sizeof(l->hello)) return check_waiting(l->waiting_since_ms, "accept handshake");
  auto* comm = new Comm;
  comm->fd = l->pending_fd;
  comm->is_send = false;
  l->pending_fd = -1;
  l->waiting_since_ms = 0;
  *recv_comm = comm;
  return ncclSuccess;
}

ncclResult_t reg_mr(void*, void*, size_t, int type, void** mhandle) {
  if (type != abi::kPtrHost) {
    LB_WARN("loopback net: regMr of memory type %d; only host memory (NCCL_PTR_HOST) is supported", type);
    return ncclInternalError;
  }
  *mhandle = &dummy_mhandle;  // sockets need no registration; NCCL wants a non-null handle
  return ncclSuccess;
}

ncclResult_t reg_mr_dma_buf(void*, void*, size_t, int type, uint64_t, int, void**) {
  LB_WARN("loopback net: regMrDmaBuf (type %d) is not supported: the device reports host memory only", type);
  return ncclInternalError;
}

ncclResult_t dereg_mr(void*, void*) { return ncclSuccess; }

ncclResult_t isend(void* send_comm, void* data, size_t size, int, void*, void*, void** request) {
  auto* comm = static_cast<Comm*>(send_comm);
  Request* r = take_request(comm);
  *request = r;
  if (!r) return ncclSuccess;
  r->data = static_cast<char*>(data);
  r->size = size;
  r->wire_size = size;
  comm->pending.push_back(r);
  return progress(comm);
}

ncclResult_t irecv(void* recv_comm, int n, void** data, size_t* sizes, int*, void**, void**, void** request) {
  auto* comm = static_cast<Comm*>(recv_comm);
  if (n != 1) {
    LB_WARN("loopback net: irecv of %d buffers; the device reports maxRecvs = 1", n);
    return ncclInternalError;
  }
  // NCCL may preset *request to NCCL_NET_OPTIONAL_RECV_COMPLETION as a hint; it still tests the
  // request it gets back, so a real request is always returned.
  Request* r = take_request(comm);
  *request = r;
  if (!r) return ncclSuccess;
  r->data = static_cast<char*>(data[0]);
  r->size = sizes[0];
  comm->pending.push_back(r);
  return progress(comm);
}

ncclResult_t iflush(void*, int, void**, int*, void**, void** request) {
  *request = nullptr;  // host memory: nothing to flush (NCCL treats a null request as done)
  return ncclSuccess;
}

ncclResult_t test(void* request, int* done, int* sizes) {
  auto* r = static_cast<Request*>(request);
  *done = 0;
  if (!r->done) LB_CHECK(progress(r->comm));
  if (!r->done) return ncclSuccess;
  *done = 1;
  if (sizes) sizes[0] = static_cast<int>(r->wire_size);
  r->in_use = false;
  return ncclSuccess;
}

ncclResult_t close_send(void* send_comm) {
  auto* comm = static_cast<Comm*>(send_comm);
  close_fd(&comm->fd);
  delete comm;
  return ncclSuccess;
}

ncclResult_t close_recv(void* recv_comm) { return close_send(recv_comm); }

ncclResult_t close_listen(void* listen_comm) {
  auto* l = static_cast<ListenComm*>(listen_comm);
  close_fd(&l->pending_fd);
  close_fd(&l->fd);
  delete l;
  return ncclSuccess;
}

ncclResult_t finalize(void*) { return ncclSuccess; }

}  // namespace epcomm::loopback::net
