// The GIN half of the loopback plugin (loopback_gin.h describes the protocol).
#include "loopback_gin.h"

#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "loopback_cuda.h"
#include "loopback_net.h"
#include "loopback_socket.h"

namespace epcomm::loopback::gin {
namespace {

constexpr uint32_t kNone = 0xffffffffu;
constexpr uint32_t kKindPut = 0x50555431;  // "PUT1"
constexpr uint32_t kKindAck = 0x41434b31;  // "ACK1"

// One message header on a rank-to-rank connection; a put's bytes follow it.
struct Wire {
  uint32_t kind;
  uint32_t dst_index;  // the target's registration, kNone when no bytes move
  uint64_t dst_offset;
  uint64_t bytes;
  uint32_t signal_index;  // kNone: no signal
  uint32_t signal_op;
  uint64_t signal_offset;
  uint64_t signal_value;
  uint64_t seq;  // a put's number on this connection, from 1; an ack carries the put's number
};

struct Hello {
  uint64_t magic;
  uint64_t nonce;  // the listener's: the connection is meant for this mesh
  int32_t rank;
  int32_t nranks;
};
constexpr uint64_t kHelloMagic = 0x314e4947424c5045ull;  // "EPLBGIN1"

struct Registration {
  uint32_t index;
  char* base;
  size_t size;
  int type;  // NCCL_PTR_HOST or NCCL_PTR_CUDA
  bool live;
};

struct Peer {
  int fd = -1;
  bool closed = false;
  bool dead = false;  // closed with work in flight, under EPCOMM_LOOPBACK_DEAD_PEERS=1 (puts to it dropped)
  std::deque<std::vector<char>> out;  // whole messages, the front one partly written
  size_t out_done = 0;
  Wire in{};
  size_t in_header_got = 0;
  std::vector<char> in_bytes;
  size_t in_bytes_got = 0;
  uint64_t next_seq = 1;  // the next put to this peer
  uint64_t acked = 0;     // the last put acknowledged by this peer
  uint64_t received = 0;  // the last put received from this peer
};

struct Request {
  uint32_t peer;
  uint64_t seq;  // 0: done at posting (a put to this rank itself)
};

struct CollComm {
  int rank = 0;
  int nranks = 0;
  std::vector<Peer> peers;
  std::vector<std::unique_ptr<Registration>> regs;
  CudaChannel cuda;
  // NCCL calls regMrSym from its caller's thread while its GIN progress thread runs test/iput.
  std::mutex mutex;
  // The first failure, returned by every later call. NCCL's proxy ignores what test() and
  // ginProgress() return (src/gin/gin_host_proxy.cc) and checks only iput/iputSignal, so a failure
  // must stay visible until a put reports it (NCCL then sets the communicator's async error).
  ncclResult_t error = ncclSuccess;
};

// EPCOMM_LOOPBACK_DEAD_PEERS=1: a peer that closes its connection with work in flight has died (a
// process killed with SIGKILL); its puts are dropped and count as done, and the other peers go on, as
// a network's queue pairs to other nodes do. Default: that is an error of the whole communicator
// (which catches a rank tearing down before its peers had its puts).
bool dead_peers_allowed() {
  static const bool allowed = [] {
    const char* v = getenv("EPCOMM_LOOPBACK_DEAD_PEERS");
    return v != nullptr && v[0] == '1';
  }();
  return allowed;
}

// Marks `peer` dead: nothing more goes to it, every put to it counts as done.
void bury(CollComm* c, int peer, const char* when) {
  Peer& p = c->peers[peer];
  if (!p.dead)
    LB_WARN(
        "loopback gin: rank %d: rank %d closed its connection %s; it is dead (EPCOMM_LOOPBACK_DEAD_PEERS=1): "
        "puts to it are dropped",
        c->rank, peer, when);
  p.dead = p.closed = true;
  p.out.clear();
  p.out_done = 0;
  p.acked = p.next_seq - 1;
}

ncclResult_t sticky(CollComm* c, ncclResult_t res) {
  if (res != ncclSuccess && c->error == ncclSuccess) {
    c->error = res;
    LB_WARN("loopback gin: rank %d: this GIN communicator has failed (error %d); every later call reports it", c->rank,
            int(res));
  }
  return res;
}

struct ListenComm {
  int fd = -1;
  Endpoint endpoint{};
};

int dummy_context;

Registration* lookup(CollComm* c, uint32_t index, uint64_t offset, uint64_t bytes, const char* what, int from) {
  Registration* r = index < c->regs.size() ? c->regs[index].get() : nullptr;
  if (!r || !r->live || offset > r->size || bytes > r->size - offset) {
    LB_WARN("loopback gin: rank %d: %s from rank %d names registration %u [%llu, +%llu), which is %s", c->rank, what,
            from, index, static_cast<unsigned long long>(offset), static_cast<unsigned long long>(bytes),
            !r         ? "unknown"
            : !r->live ? "deregistered"
                       : "out of range");
    return nullptr;
  }
  return r;
}

ncclResult_t copy_out(CollComm* c, const Registration* src, uint64_t offset, size_t bytes, char* dst) {
  if (src->type == abi::kPtrHost) {
    memcpy(dst, src->base + offset, bytes);
    return ncclSuccess;
  }
  return c->cuda.copy_to_host(dst, src->base + offset, bytes, "copying a put's source out");
}

// Lands a put on this rank: bytes, then the signal (see loopback_gin.h for the order).
ncclResult_t apply_put(CollComm* c, const Wire& w, const char* bytes, int from) {
  if (w.bytes > 0) {
    Registration* dst = lookup(c, w.dst_index, w.dst_offset, w.bytes, "a put", from);
    if (!dst) return ncclInternalError;
    if (dst->type == abi::kPtrHost) {
      memcpy(dst->base + w.dst_offset, bytes, w.bytes);
    } else {
      LB_CHECK(c->cuda.copy_to_device(dst->base + w.dst_offset, bytes, w.bytes, "landing a put"));
    }
  }
  if (w.signal_index == kNone) return ncclSuccess;
  if (w.signal_offset % sizeof(uint64_t) != 0 ||
      (w.signal_op != abi::kSignalOpInc && w.signal_op != abi::kSignalOpAdd)) {
    LB_WARN("loopback gin: rank %d: a signal from rank %d with offset %llu and op %u (want 8-byte aligned, INC or ADD)",
            c->rank, from, static_cast<unsigned long long>(w.signal_offset), w.signal_op);
    return ncclInternalError;
  }
  Registration* sig = lookup(c, w.signal_index, w.signal_offset, sizeof(uint64_t), "a signal", from);
  if (!sig) return ncclInternalError;
  auto* word = reinterpret_cast<uint64_t*>(sig->base + w.signal_offset);
  if (sig->type == abi::kPtrHost) {
    __atomic_fetch_add(word, w.signal_op == abi::kSignalOpInc ? 1 : w.signal_value, __ATOMIC_SEQ_CST);
    return ncclSuccess;
  }
  return c->cuda.update_signal(word, w.signal_op, w.signal_value);
}

void enqueue(Peer& p, const Wire& w, std::vector<char> message = {}) {
  if (message.empty()) message.resize(sizeof(Wire));
  memcpy(message.data(), &w, sizeof(Wire));
  p.out.push_back(std::move(message));
}

ncclResult_t flush_out(CollComm* c, int peer) {
  Peer& p = c->peers[peer];
  while (!p.out.empty() && !p.closed) {
    std::vector<char>& m = p.out.front();
    size_t moved = 0;
    bool closed = false;
    LB_CHECK(send_some(p.fd, m.data() + p.out_done, m.size() - p.out_done, &moved, &closed));
    if (closed) {
      // A peer that has closed needs no more acknowledgements; a put it will never see is an error.
      for (const auto& queued : p.out) {
        if (reinterpret_cast<const Wire*>(queued.data())->kind == kKindPut) {
          if (dead_peers_allowed()) {
            bury(c, peer, "with puts still to send");
            return ncclSuccess;
          }
          LB_WARN("loopback gin: rank %d: rank %d closed its connection with puts still to send", c->rank, peer);
          return ncclSystemError;
        }
      }
      p.closed = true;
      p.out.clear();
      break;
    }
    p.out_done += moved;
    if (p.out_done < m.size()) break;  // the socket is full
    p.out.pop_front();
    p.out_done = 0;
  }
  return ncclSuccess;
}

ncclResult_t handle_message(CollComm* c, int peer) {
  Peer& p = c->peers[peer];
  const Wire& w = p.in;
  if (w.kind == kKindAck) {
    if (w.seq <= p.acked || w.seq >= p.next_seq) {
      LB_WARN("loopback gin: rank %d: rank %d acknowledged put %llu; expected %llu", c->rank, peer,
              static_cast<unsigned long long>(w.seq), static_cast<unsigned long long>(p.acked + 1));
      return ncclInternalError;
    }
    p.acked = w.seq;
    return ncclSuccess;
  }
  if (w.seq != p.received + 1) {
    LB_WARN("loopback gin: rank %d: put %llu from rank %d arrived after put %llu", c->rank,
            static_cast<unsigned long long>(w.seq), peer, static_cast<unsigned long long>(p.received));
    return ncclInternalError;
  }
  LB_CHECK(apply_put(c, w, p.in_bytes.data(), peer));
  p.received = w.seq;
  Wire ack{};
  ack.kind = kKindAck;
  ack.seq = w.seq;
  enqueue(p, ack);
  return ncclSuccess;
}

// Reads what has arrived from one peer and handles each whole message.
ncclResult_t read_in(CollComm* c, int peer) {
  Peer& p = c->peers[peer];
  for (;;) {
    size_t moved = 0;
    bool closed = false;
    const bool in_header = p.in_header_got < sizeof(Wire);
    if (in_header) {
      LB_CHECK(recv_some(p.fd, reinterpret_cast<char*>(&p.in) + p.in_header_got, sizeof(Wire) - p.in_header_got, &moved,
                         &closed));
      p.in_header_got += moved;
      if (p.in_header_got == sizeof(Wire)) {
        if (p.in.kind != kKindPut && p.in.kind != kKindAck) {
          LB_WARN("loopback gin: rank %d: a message of unknown kind %#x from rank %d", c->rank, p.in.kind, peer);
          return ncclInternalError;
        }
        p.in_bytes.resize(p.in.kind == kKindPut ? p.in.bytes : 0);
        p.in_bytes_got = 0;
      }
    } else {
      LB_CHECK(
          recv_some(p.fd, p.in_bytes.data() + p.in_bytes_got, p.in_bytes.size() - p.in_bytes_got, &moved, &closed));
      p.in_bytes_got += moved;
    }
    if (closed) {
      const bool waiting = p.in_header_got > 0 || p.acked + 1 < p.next_seq;
      if (waiting && dead_peers_allowed()) {
        bury(c, peer, "with puts unacknowledged");
        return ncclSuccess;
      }
      if (waiting) {
        LB_WARN("loopback gin: rank %d: rank %d closed its connection with %llu puts unacknowledged%s", c->rank, peer,
                static_cast<unsigned long long>(p.next_seq - 1 - p.acked),
                p.in_header_got > 0 ? " and a message half received" : "");
        return ncclSystemError;
      }
      p.closed = true;
      return ncclSuccess;
    }
    if (p.in_header_got == sizeof(Wire) && p.in_bytes_got == p.in_bytes.size()) {
      LB_CHECK(handle_message(c, peer));
      p.in_header_got = 0;
      continue;
    }
    if (moved == 0) return ncclSuccess;  // nothing more has arrived
  }
}

ncclResult_t progress_locked(CollComm* c) {
  for (int peer = 0; peer < c->nranks; ++peer) {
    if (peer == c->rank || c->peers[peer].closed) continue;
    LB_CHECK(flush_out(c, peer));
    if (c->peers[peer].closed) continue;
    LB_CHECK(read_in(c, peer));
    LB_CHECK(flush_out(c, peer));  // the acknowledgements just queued
  }
  return ncclSuccess;
}

// `handle` if it is one of this context's registrations (any state), else nullptr.
Registration* own_registration(CollComm* c, const void* handle) {
  for (const auto& r : c->regs)
    if (r.get() == handle) return r.get();
  return nullptr;
}

ncclResult_t post_locked(CollComm* c, uint64_t src_off, void* src_mhandle, size_t size, uint64_t dst_off,
                         void* dst_mhandle, uint32_t rank, uint64_t signal_off, void* signal_mhandle,
                         uint64_t signal_value, uint32_t signal_op, void** request) {
  *request = nullptr;
  if (rank >= static_cast<uint32_t>(c->nranks)) {
    LB_WARN("loopback gin: rank %d: a put to rank %u of %d", c->rank, rank, c->nranks);
    return ncclInvalidArgument;
  }
  Wire w{};
  w.kind = kKindPut;
  w.dst_index = kNone;
  w.signal_index = kNone;
  w.bytes = size;
  w.dst_offset = dst_off;
  std::vector<char> message(sizeof(Wire) + size);
  if (size > 0) {
    // Only handles this context handed out are dereferenced (NCCL passes them back as 63-bit words).
    Registration* src = own_registration(c, src_mhandle);
    Registration* dst = own_registration(c, dst_mhandle);
    if (!src || !dst || !src->live || !dst->live || src_off > src->size || size > src->size - src_off) {
      LB_WARN(
          "loopback gin: rank %d: a put of %zu bytes to rank %u with a missing, deregistered or too small source "
          "or destination registration: src %p (%s, offset %llu, %zu bytes registered), dst %p (%s, offset %llu); "
          "this context holds %zu registrations",
          c->rank, size, rank, src_mhandle,
          !src        ? "not this context's"
          : src->live ? "live"
                      : "deregistered",
          static_cast<unsigned long long>(src_off), src ? src->size : 0, dst_mhandle,
          !dst        ? "not this context's"
          : dst->live ? "live"
                      : "deregistered",
          static_cast<unsigned long long>(dst_off), c->regs.size());
      return ncclInvalidArgument;
    }
    w.dst_index = dst->index;
    LB_CHECK(copy_out(c, src, src_off, size, message.data() + sizeof(Wire)));
  }
  if (signal_mhandle) {
    const Registration* signals = own_registration(c, signal_mhandle);
    if (!signals) {
      LB_WARN("loopback gin: rank %d: a signal to rank %u through %p, not one of this context's %zu registrations",
              c->rank, rank, signal_mhandle, c->regs.size());
      return ncclInvalidArgument;
    }
    w.signal_index = signals->index;
    w.signal_offset = signal_off;
    w.signal_value = signal_value;
    w.signal_op = signal_op;
  }
  if (rank == static_cast<uint32_t>(c->rank)) {
    // A put to this rank itself lands at once: no connection, nothing to acknowledge.
    LB_CHECK(apply_put(c, w, message.data() + sizeof(Wire), c->rank));
    *request = new Request{rank, 0};
    return ncclSuccess;
  }
  Peer& p = c->peers[rank];
  if (p.dead || (p.closed && dead_peers_allowed())) {  // dropped: done at once
    bury(c, static_cast<int>(rank), "before this put");
    *request = new Request{rank, 0};
    return ncclSuccess;
  }
  if (p.closed) {
    LB_WARN("loopback gin: rank %d: a put to rank %u, which has closed its connection", c->rank, rank);
    return ncclSystemError;
  }
  w.seq = p.next_seq++;
  enqueue(p, w, std::move(message));
  *request = new Request{rank, w.seq};
  return progress_locked(c);
}

ncclResult_t post(CollComm* c, uint64_t src_off, void* src_mhandle, size_t size, uint64_t dst_off, void* dst_mhandle,
                  uint32_t rank, uint64_t signal_off, void* signal_mhandle, uint64_t signal_value, uint32_t signal_op,
                  void** request) {
  std::lock_guard<std::mutex> lock(c->mutex);
  *request = nullptr;
  if (c->error != ncclSuccess) return c->error;
  return sticky(c, post_locked(c, src_off, src_mhandle, size, dst_off, dst_mhandle, rank, signal_off, signal_mhandle,
                               signal_value, signal_op, request));
}

}  // namespace

ncclResult_t init(void** ctx, uint64_t, abi::DebugLogger logger) {
  set_logger(logger);
  *ctx = &dummy_context;
  return ncclSuccess;
}

ncclResult_t devices(int* ndev) { return net::devices(ndev); }  // the same one device as the net

ncclResult_t get_properties(int dev, abi::NetProperties* props) {
  if (dev != 0) {
    LB_WARN("loopback gin: getProperties for device %d; there is one device (0)", dev);
    return ncclInvalidArgument;
  }
  net::fill_properties(dev, props);
  props->ptrSupport = abi::kPtrHost | abi::kPtrCuda;  // no DMA-BUF: NCCL then calls regMrSym
  props->netDeviceType = abi::kNetDeviceGinProxy;     // NCCL's host proxy drives the puts
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
  memset(handle, 0, abi::kNetHandleMaxSize);
  memcpy(handle, &l->endpoint, sizeof(Endpoint));
  *listen_comm = l;
  return ncclSuccess;
}

// Builds the full mesh: this rank connects to every lower rank (their backlog holds the
// connection until they accept) and then accepts every higher rank, so no order of arrival can
// deadlock. Bounded by EPCOMM_LOOPBACK_TIMEOUT_MS.
ncclResult_t connect(void*, void* handles[], int nranks, int rank, void* listen_comm, void** coll_comm) {
  *coll_comm = nullptr;
  auto* l = static_cast<ListenComm*>(listen_comm);
  auto c = std::make_unique<CollComm>();
  c->rank = rank;
  c->nranks = nranks;
  c->peers.resize(nranks);
  const Deadline deadline(timeout_ms());
  auto fail = [&](ncclResult_t res) {
    for (Peer& p : c->peers) close_fd(&p.fd);
    return res;
  };
  for (int peer = 0; peer < rank; ++peer) {
    Endpoint endpoint;
    memcpy(&endpoint, handles[peer], sizeof(endpoint));
    ncclResult_t res = connect_blocking(endpoint, &c->peers[peer].fd, deadline);
    const Hello hello{kHelloMagic, endpoint.nonce, rank, nranks};
    if (res == ncclSuccess) res = send_all(c->peers[peer].fd, &hello, sizeof(hello), deadline, "GIN mesh hello");
    if (res != ncclSuccess) {
      LB_WARN("loopback gin: rank %d could not connect to rank %d (port %u)", rank, peer, endpoint.port);
      return fail(res);
    }
  }
  for (int accepted = 0; accepted < nranks - 1 - rank; ++accepted) {
    int fd = -1;
    Hello hello{};
    ncclResult_t res = accept_blocking(l->fd, &fd, deadline);
    if (res == ncclSuccess) res = recv_all(fd, &hello, sizeof(hello), deadline, "GIN mesh hello");
    const bool valid = res == ncclSuccess && hello.magic == kHelloMagic && hello.nonce == l->endpoint.nonce &&
                       hello.nranks == nranks && hello.rank > rank && hello.rank < nranks &&
                       c->peers[hello.rank].fd < 0;
    if (!valid) {
      LB_WARN("loopback gin: rank %d: %d of %d higher ranks connected, then %s", rank, accepted, nranks - 1 - rank,
              res != ncclSuccess ? "the next did not" : "a connection with a wrong hello (rank, size or nonce)");
      close_fd(&fd);
      return fail(res != ncclSuccess ? res : ncclInternalError);
    }
    c->peers[hello.rank].fd = fd;
  }
  LB_INFO("loopback gin: rank %d connected to %d peers", rank, nranks - 1);
  *coll_comm = c.release();
  return ncclSuccess;
}

ncclResult_t create_context(void*, int, int, void**, abi::NetDeviceHandle**) {
  LB_WARN("loopback gin: createContext is a GDAKI entry point; this plugin is proxy type (NCCL_GIN_TYPE=2)");
  return ncclInternalError;
}

ncclResult_t reg_mr_sym(void* coll_comm, void* data, size_t size, int type, uint64_t, void** mhandle,
                        void** gin_handle) {
  auto* c = static_cast<CollComm*>(coll_comm);
  std::lock_guard<std::mutex> lock(c->mutex);
  if (type != abi::kPtrHost && type != abi::kPtrCuda) {
    LB_WARN("loopback gin: regMrSym of memory type %d (want NCCL_PTR_HOST or NCCL_PTR_CUDA)", type);
    return ncclInvalidArgument;
  }
  if (type == abi::kPtrCuda) LB_CHECK(c->cuda.open());
  const auto index = static_cast<uint32_t>(c->regs.size());
  c->regs.push_back(std::make_unique<Registration>(Registration{index, static_cast<char*>(data), size, type, true}));
  *mhandle = c->regs.back().get();
  *gin_handle = *mhandle;  // one handle for both uses (see loopback_gin.h)
  return ncclSuccess;
}

ncclResult_t reg_mr_sym_dma_buf(void*, void*, size_t, int, uint64_t, int, uint64_t, void**, void**) {
  LB_WARN("loopback gin: regMrSymDmaBuf is not supported (the device does not report NCCL_PTR_DMABUF)");
  return ncclInternalError;
}

ncclResult_t dereg_mr_sym(void* coll_comm, void* mhandle) {
  auto* c = static_cast<CollComm*>(coll_comm);
  std::lock_guard<std::mutex> lock(c->mutex);
  static_cast<Registration*>(mhandle)->live = false;  // kept until closeColl: indexes are never reused
  return ncclSuccess;
}

ncclResult_t destroy_context(void*) { return ncclSuccess; }

ncclResult_t close_coll(void* coll_comm) {
  auto* c = static_cast<CollComm*>(coll_comm);
  {
    std::lock_guard<std::mutex> lock(c->mutex);
    // Acknowledgements still queued are sent if the socket takes them soon: a peer may be waiting.
    const Deadline deadline(1000);
    for (bool pending = true; pending && !deadline.expired();) {
      pending = false;
      for (int peer = 0; peer < c->nranks; ++peer) {
        if (peer == c->rank || c->peers[peer].closed) continue;
        if (flush_out(c, peer) != ncclSuccess) c->peers[peer].closed = true;
        pending = pending || !c->peers[peer].out.empty();
      }
    }
    for (Peer& p : c->peers) close_fd(&p.fd);
    c->cuda.close();
  }
  delete c;
  return ncclSuccess;
}

ncclResult_t close_listen(void* listen_comm) {
  auto* l = static_cast<ListenComm*>(listen_comm);
  close_fd(&l->fd);
  delete l;
  return ncclSuccess;
}

ncclResult_t iput(void* coll_comm, uint64_t src_off, void* src_mhandle, size_t size, uint64_t dst_off,
                  void* dst_mhandle, uint32_t rank, void** request) {
  return post(static_cast<CollComm*>(coll_comm), src_off, src_mhandle, size, dst_off, dst_mhandle, rank, 0, nullptr, 0,
              0, request);
}

ncclResult_t iput_signal(void* coll_comm, uint64_t src_off, void* src_mhandle, size_t size, uint64_t dst_off,
                         void* dst_mhandle, uint32_t rank, uint64_t signal_off, void* signal_mhandle,
                         uint64_t signal_value, uint32_t signal_op, void** request) {
  if (!signal_mhandle) {
    LB_WARN("loopback gin: iputSignal without a signal registration");
    return ncclInvalidArgument;
  }
  return post(static_cast<CollComm*>(coll_comm), src_off, src_mhandle, size, dst_off, dst_mhandle, rank, signal_off,
              signal_mhandle, signal_value, signal_op, request);
}

ncclResult_t test(void* coll_comm, void* request, int* done) {
  auto* c = static_cast<CollComm*>(coll_comm);
  auto* r = static_cast<Request*>(request);
  *done = 0;
  std::lock_guard<std::mutex> lock(c->mutex);
  if (c->error != ncclSuccess) return c->error;
  if (r->seq != 0 && c->peers[r->peer].acked < r->seq) LB_CHECK(sticky(c, progress_locked(c)));
  if (r->seq != 0 && c->peers[r->peer].acked < r->seq) return ncclSuccess;
  *done = 1;
  delete r;
  return ncclSuccess;
}

ncclResult_t progress(void* coll_comm) {
  auto* c = static_cast<CollComm*>(coll_comm);
  std::lock_guard<std::mutex> lock(c->mutex);
  if (c->error != ncclSuccess) return c->error;
  return sticky(c, progress_locked(c));
}

ncclResult_t query_last_error(void*, bool* has_error) {
  *has_error = false;  // proxy mode: NCCL reads errors from the proxy's own state
  return ncclSuccess;
}

ncclResult_t finalize(void*) { return ncclSuccess; }

}  // namespace epcomm::loopback::gin
