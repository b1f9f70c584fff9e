// CPU tests of the loopback plugin (libnccl-net-epcomm-loopback.so), loaded the way NCCL loads it
// (dlopen + the v11 table symbols) and driven the way NCCL drives it, in forked processes that
// stand for the fake nodes. The net half is tested fully; the GIN half's protocol (mesh connect,
// symmetric registrations, puts, INC/ADD signals, size-0 signals, in-order completion) is tested
// on host-memory registrations, which follow the same path as GPU ones except for the copies.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "nccl_plugin_abi.h"

namespace {

namespace abi = epcomm::loopback::abi;
using Clock = std::chrono::steady_clock;
constexpr auto kChildTimeout = std::chrono::seconds(120);

void log_to_stderr(abi::LogLevel level, unsigned long, const char* file, int line, const char* fmt, ...) {
  if (level != abi::kLogWarn) return;
  va_list args;
  va_start(args, fmt);
  fprintf(stderr, "[plugin WARN %s:%d] ", file, line);
  vfprintf(stderr, fmt, args);
  fprintf(stderr, "\n");
  va_end(args);
}

struct Plugin {
  void* lib = nullptr;
  const abi::Net* net = nullptr;
  const abi::Gin* gin = nullptr;
};

Plugin load_plugin() {
  Plugin p;
  p.lib = dlopen(EPCOMM_LOOPBACK_PLUGIN, RTLD_NOW | RTLD_LOCAL);
  if (!p.lib) {
    ADD_FAILURE() << "dlopen(" << EPCOMM_LOOPBACK_PLUGIN << "): " << dlerror();
    return p;
  }
  p.net = static_cast<const abi::Net*>(dlsym(p.lib, "ncclNetPlugin_v11"));
  p.gin = static_cast<const abi::Gin*>(dlsym(p.lib, "ncclGinPlugin_v11"));
  return p;
}

// The bytes of message `index` from `sender`, so a receiver can check them without being told.
uint8_t pattern(int sender, int index, size_t i) {
  uint64_t x = (static_cast<uint64_t>(sender) << 48) ^ (static_cast<uint64_t>(index) << 32) ^ i;
  x = (x ^ (x >> 31)) * 0x7fb5d329728ea185ull;
  x = (x ^ (x >> 27)) * 0x81dadef4bc2dd44dull;
  return static_cast<uint8_t>(x ^ (x >> 33));
}

#define CHILD_CHECK(cond, ...)                                       \
  do {                                                               \
    if (!(cond)) {                                                   \
      fprintf(stderr, "[child %d] %s:%d: ", me, __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                                  \
      fprintf(stderr, "\n");                                         \
      return false;                                                  \
    }                                                                \
  } while (0)

// Runs body(index, handles) in n forked processes. Each child first publishes one 128-byte handle
// (`make_handle`); the parent hands every child all n handles, then waits (bounded) for their exit
// codes. A child still running at the timeout is killed, and the test fails saying so.
void run_processes(int n, const std::function<bool(int, void* handle, void** state)>& make_handle,
                   const std::function<bool(int, const std::vector<char>& handles, void* state)>& body) {
  std::vector<int> up(n), down(n);
  std::vector<pid_t> pids(n);
  for (int i = 0; i < n; ++i) {
    int a[2], b[2];
    ASSERT_EQ(pipe(a), 0);
    ASSERT_EQ(pipe(b), 0);
    fflush(stdout);
    fflush(stderr);
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      close(a[0]);
      close(b[1]);
      const int me = i;
      char handle[abi::kNetHandleMaxSize] = {};
      void* state = nullptr;
      bool ok = make_handle(me, handle, &state);
      ok = ok && write(a[1], handle, sizeof(handle)) == static_cast<ssize_t>(sizeof(handle));
      std::vector<char> all(static_cast<size_t>(n) * abi::kNetHandleMaxSize);
      size_t got = 0;
      while (ok && got < all.size()) {
        const ssize_t r = read(b[0], all.data() + got, all.size() - got);
        if (r <= 0) ok = false;
        got += r > 0 ? static_cast<size_t>(r) : 0;
      }
      ok = ok && body(me, all, state);
      fflush(stderr);
      _exit(ok ? 0 : 1);
    }
    close(a[1]);
    close(b[0]);
    up[i] = a[0];
    down[i] = b[1];
    pids[i] = pid;
  }
  std::vector<char> all(static_cast<size_t>(n) * abi::kNetHandleMaxSize);
  const auto deadline = Clock::now() + kChildTimeout;
  for (int i = 0; i < n; ++i) {
    size_t got = 0;
    while (got < abi::kNetHandleMaxSize && Clock::now() < deadline) {
      pollfd p{up[i], POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      const ssize_t r = read(up[i], all.data() + i * abi::kNetHandleMaxSize + got, abi::kNetHandleMaxSize - got);
      if (r <= 0) break;
      got += static_cast<size_t>(r);
    }
    EXPECT_EQ(got, static_cast<size_t>(abi::kNetHandleMaxSize)) << "child " << i << " published no handle";
  }
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(write(down[i], all.data(), all.size()), static_cast<ssize_t>(all.size()));
    close(down[i]);
    close(up[i]);
  }
  for (int i = 0; i < n; ++i) {
    int status = 0;
    pid_t r = 0;
    while ((r = waitpid(pids[i], &status, WNOHANG)) == 0 && Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (r == 0) {
      kill(pids[i], SIGKILL);
      waitpid(pids[i], &status, 0);
      ADD_FAILURE() << "child " << i << " still running after " << kChildTimeout.count() << " s: killed";
      continue;
    }
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "child " << i << (WIFSIGNALED(status) ? " killed by signal " : " exited with ")
        << (WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
  }
}

// One GIN rank of a test: its context and listening end (published as the handle), then its
// connection to all n ranks from the handles every child got.
struct GinRank {
  void* ctx = nullptr;
  void* listen_comm = nullptr;
};

std::function<bool(int, void*, void**)> gin_rank_maker(const Plugin& p, int comm_id) {
  return [&p, comm_id](int me, void* handle, void** state) {
    auto* s = new GinRank{};
    CHILD_CHECK(p.gin->init(&s->ctx, comm_id, log_to_stderr) == ncclSuccess, "gin init");
    CHILD_CHECK(p.gin->listen(s->ctx, 0, handle, &s->listen_comm) == ncclSuccess, "gin listen");
    *state = s;
    return true;
  };
}

bool gin_connect(const Plugin& p, void* state, const std::vector<char>& handles, int n, int me, void** coll) {
  auto* s = static_cast<GinRank*>(state);
  std::vector<void*> hs(n);
  for (int r = 0; r < n; ++r) hs[r] = const_cast<char*>(handles.data()) + r * abi::kNetHandleMaxSize;
  *coll = nullptr;
  CHILD_CHECK(p.gin->connect(s->ctx, hs.data(), n, me, s->listen_comm, coll) == ncclSuccess && *coll, "gin connect");
  return true;
}

TEST(LoopbackPlugin, ExportsNetAndProxyGinTablesWithOneDevice) {
  Plugin p = load_plugin();
  ASSERT_NE(p.net, nullptr) << "ncclNetPlugin_v11 not exported";
  ASSERT_NE(p.gin, nullptr) << "ncclGinPlugin_v11 not exported";
  EXPECT_STREQ(p.net->name, "EpcommLoopback");
  void* ctx = nullptr;
  abi::NetCommConfig config{-1};
  ASSERT_EQ(p.net->init(&ctx, 1, &config, log_to_stderr, nullptr), ncclSuccess);
  int ndev = 0;
  ASSERT_EQ(p.net->devices(&ndev), ncclSuccess);
  EXPECT_EQ(ndev, 1);
  abi::NetProperties props{};
  ASSERT_EQ(p.net->getProperties(0, &props), ncclSuccess);
  EXPECT_EQ(props.ptrSupport, abi::kPtrHost);
  EXPECT_EQ(props.netDeviceType, abi::kNetDeviceHost);
  EXPECT_EQ(props.maxRecvs, 1);
  ASSERT_EQ(p.gin->init(&ctx, 1, log_to_stderr), ncclSuccess);
  ASSERT_EQ(p.gin->devices(&ndev), ncclSuccess);
  EXPECT_EQ(ndev, 1);
  ASSERT_EQ(p.gin->getProperties(0, &props), ncclSuccess);
  EXPECT_EQ(props.netDeviceType, abi::kNetDeviceGinProxy);
  EXPECT_EQ(props.ptrSupport & abi::kPtrDmaBuf, 0) << "NCCL would call regMrSymDmaBuf, which is not implemented";
  EXPECT_TRUE(p.gin->ginProgress != nullptr && p.gin->iputSignal != nullptr && p.gin->createContext != nullptr);
}

// Connects send and receive comms to `handle` from one process (both are nonblocking).
bool connect_pair(const abi::Net* net, void* ctx, void* listen_comm, void* handle, void** send, void** recv, int me) {
  *send = *recv = nullptr;
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while ((!*send || !*recv) && Clock::now() < deadline) {
    if (!*send) CHILD_CHECK(net->connect(ctx, 0, handle, send, nullptr) == ncclSuccess, "connect failed");
    if (!*recv) CHILD_CHECK(net->accept(listen_comm, recv, nullptr) == ncclSuccess, "accept failed");
  }
  CHILD_CHECK(*send && *recv, "connection not established within 30 s");
  return true;
}

TEST(LoopbackPlugin, NetRefusesRequestsBeyondTheLimitUntilTestedAndRejectsOversizedMessages) {
  Plugin p = load_plugin();
  ASSERT_NE(p.net, nullptr);
  const int me = 0;
  void* ctx = nullptr;
  ASSERT_EQ(p.net->init(&ctx, 1, nullptr, log_to_stderr, nullptr), ncclSuccess);
  char handle[abi::kNetHandleMaxSize];
  void* listen_comm = nullptr;
  ASSERT_EQ(p.net->listen(ctx, 0, handle, &listen_comm), ncclSuccess);
  void *send = nullptr, *recv = nullptr;
  ASSERT_TRUE(connect_pair(p.net, ctx, listen_comm, handle, &send, &recv, me));
  char byte = 'x';
  std::vector<void*> requests;
  for (int i = 0; i < abi::kNetMaxRequests; ++i) {
    void* r = nullptr;
    ASSERT_EQ(p.net->isend(send, &byte, 1, 0, nullptr, nullptr, &r), ncclSuccess);
    ASSERT_NE(r, nullptr) << "send " << i << " refused below NCCL_NET_MAX_REQUESTS";
    requests.push_back(r);
  }
  void* refused = &byte;
  ASSERT_EQ(p.net->isend(send, &byte, 1, 0, nullptr, nullptr, &refused), ncclSuccess);
  EXPECT_EQ(refused, nullptr) << "a send beyond NCCL_NET_MAX_REQUESTS must return a null request (NCCL retries)";
  int done = 0, size = -1;
  ASSERT_EQ(p.net->test(requests[0], &done, &size), ncclSuccess);
  ASSERT_EQ(done, 1) << "a 1-byte send on an idle socket completes at once";
  EXPECT_EQ(size, 1);
  void* again = nullptr;
  ASSERT_EQ(p.net->isend(send, &byte, 1, 0, nullptr, nullptr, &again), ncclSuccess);
  EXPECT_NE(again, nullptr) << "a tested request frees its slot";
  // Receive the 33 one-byte messages into 1-byte buffers, then an oversized one into a small buffer.
  for (int i = 0; i < abi::kNetMaxRequests + 1; ++i) {
    char in = 0;
    void* data = &in;
    size_t cap = 1;
    int tag = 0;
    void* r = nullptr;
    ASSERT_EQ(p.net->irecv(recv, 1, &data, &cap, &tag, nullptr, nullptr, &r), ncclSuccess);
    ASSERT_NE(r, nullptr);
    for (done = 0; !done;) ASSERT_EQ(p.net->test(r, &done, &size), ncclSuccess);
    EXPECT_EQ(in, 'x');
  }
  requests.erase(requests.begin());
  requests.push_back(again);
  for (void* s : requests) {
    for (done = 0; !done;) ASSERT_EQ(p.net->test(s, &done, &size), ncclSuccess);
  }
  char big[100] = {};
  void* r = nullptr;
  ASSERT_EQ(p.net->isend(send, big, sizeof(big), 0, nullptr, nullptr, &r), ncclSuccess);
  ASSERT_NE(r, nullptr);
  char small[10];
  void* data = small;
  size_t cap = sizeof(small);
  int tag = 0;
  void* rr = nullptr;
  // The error may surface in irecv itself (it makes progress) or in a later test.
  ncclResult_t res = p.net->irecv(recv, 1, &data, &cap, &tag, nullptr, nullptr, &rr);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  for (done = 0; !done && res == ncclSuccess && Clock::now() < deadline;) res = p.net->test(rr, &done, &size);
  EXPECT_EQ(res, ncclInternalError) << "100 bytes into a 10-byte receive must fail, not overflow";
  EXPECT_EQ(p.net->closeSend(send), ncclSuccess);
  EXPECT_EQ(p.net->closeRecv(recv), ncclSuccess);
  EXPECT_EQ(p.net->closeListen(listen_comm), ncclSuccess);
}

// Two processes, each sending a mixed list of messages to the other (sizes 0 to 8 MiB + 5, up to
// 8 in flight per direction, receive buffers sometimes larger than the message), both directions at
// once, every byte checked.
TEST(LoopbackPlugin, NetMovesRandomMessagesBothWaysBetweenTwoProcesses) {
  Plugin p = load_plugin();
  ASSERT_NE(p.net, nullptr);
  std::vector<size_t> sizes = {0, 1, 7, 4096, 65539, 1 << 20, (8 << 20) + 5, 0, 3, 131072};
  for (int i = 0; i < 30; ++i) sizes.push_back(static_cast<size_t>(pattern(9, i, 0)) * 977 + (i % 5 == 0 ? 0 : i));
  struct State {
    void* ctx;
    void* listen_comm;
  };
  auto make_handle = [&](int me, void* handle, void** state) {
    auto* s = new State{};
    CHILD_CHECK(p.net->init(&s->ctx, 7, nullptr, log_to_stderr, nullptr) == ncclSuccess, "init");
    CHILD_CHECK(p.net->listen(s->ctx, 0, handle, &s->listen_comm) == ncclSuccess, "listen");
    *state = s;
    return true;
  };
  auto body = [&](int me, const std::vector<char>& handles, void* state) {
    auto* s = static_cast<State*>(state);
    std::vector<char> peer_handle(handles.begin() + (1 - me) * abi::kNetHandleMaxSize,
                                  handles.begin() + (2 - me) * abi::kNetHandleMaxSize);
    void *send = nullptr, *recv = nullptr;
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    while ((!send || !recv) && Clock::now() < deadline) {
      if (!send) CHILD_CHECK(p.net->connect(s->ctx, 0, peer_handle.data(), &send, nullptr) == ncclSuccess, "connect");
      if (!recv) CHILD_CHECK(p.net->accept(s->listen_comm, &recv, nullptr) == ncclSuccess, "accept");
    }
    CHILD_CHECK(send && recv, "not connected within 60 s");
    void* mh = nullptr;
    std::vector<std::vector<uint8_t>> out(sizes.size()), in(sizes.size());
    for (size_t i = 0; i < sizes.size(); ++i) {
      out[i].resize(sizes[i]);
      for (size_t b = 0; b < sizes[i]; ++b) out[i][b] = pattern(me, static_cast<int>(i), b);
      in[i].assign(sizes[i] + (i % 3 == 0 ? 100 : 0), 0xee);
    }
    CHILD_CHECK(p.net->regMr(send, out[6].data(), out[6].size(), abi::kPtrHost, &mh) == ncclSuccess && mh, "regMr");
    constexpr size_t kInFlight = 8;
    std::vector<void*> sreq(sizes.size()), rreq(sizes.size());
    size_t sent = 0, sdone = 0, posted = 0, rdone = 0;
    while ((sdone < sizes.size() || rdone < sizes.size()) && Clock::now() < deadline) {
      while (sent < sizes.size() && sent - sdone < kInFlight) {
        CHILD_CHECK(p.net->isend(send, out[sent].data(), out[sent].size(), me, mh, nullptr, &sreq[sent]) == ncclSuccess,
                    "isend %zu", sent);
        if (!sreq[sent]) break;
        ++sent;
      }
      while (posted < sizes.size() && posted - rdone < kInFlight) {
        void* data = in[posted].data();
        size_t cap = in[posted].size();
        int tag = 1 - me;
        CHILD_CHECK(p.net->irecv(recv, 1, &data, &cap, &tag, &mh, nullptr, &rreq[posted]) == ncclSuccess, "irecv");
        if (!rreq[posted]) break;
        ++posted;
      }
      int done = 0, size = -1;
      if (sdone < sent) {
        CHILD_CHECK(p.net->test(sreq[sdone], &done, &size) == ncclSuccess, "test send %zu", sdone);
        if (done) CHILD_CHECK(static_cast<size_t>(size) == sizes[sdone++], "send size");
      }
      if (rdone < posted) {
        CHILD_CHECK(p.net->test(rreq[rdone], &done, &size) == ncclSuccess, "test recv %zu", rdone);
        if (done) {
          CHILD_CHECK(static_cast<size_t>(size) == sizes[rdone], "message %zu: %d bytes, want %zu", rdone, size,
                      sizes[rdone]);
          for (size_t b = 0; b < sizes[rdone]; ++b)
            CHILD_CHECK(in[rdone][b] == pattern(1 - me, static_cast<int>(rdone), b), "message %zu byte %zu differs",
                        rdone, b);
          for (size_t b = sizes[rdone]; b < in[rdone].size(); ++b)
            CHILD_CHECK(in[rdone][b] == 0xee, "message %zu wrote past its size", rdone);
          ++rdone;
        }
      }
    }
    CHILD_CHECK(sdone == sizes.size() && rdone == sizes.size(), "sent %zu/%zu received %zu/%zu before the deadline",
                sdone, sizes.size(), rdone, sizes.size());
    CHILD_CHECK(p.net->deregMr(send, mh) == ncclSuccess, "deregMr");
    CHILD_CHECK(p.net->closeSend(send) == ncclSuccess && p.net->closeRecv(recv) == ncclSuccess, "close");
    CHILD_CHECK(p.net->closeListen(s->listen_comm) == ncclSuccess && p.net->finalize(s->ctx) == ncclSuccess, "close");
    return true;
  };
  run_processes(2, make_handle, body);
}

// Three processes, each a GIN rank on host memory: every round each rank puts a pattern to every
// rank (itself included) with a signal ADD, a size-0 signal-only INC and a size-0 ADD, preceded by
// a plain put; waits for the exact signal values from every rank, checks the bytes, and
// acknowledges with a signal before the next round may overwrite them. Signal layout, each 8 bytes:
// D[src] (data, ADD round+1), S[src] (INC), Z[src] (size 0, ADD 2), A[src] (round acknowledged).
TEST(LoopbackPlugin, GinHostPutsAndSignalsAcrossThreeProcessesInOrder) {
  Plugin p = load_plugin();
  ASSERT_NE(p.gin, nullptr);
  constexpr int kRanks = 3, kRounds = 5;
  constexpr size_t kSlot = 70000, kPlain = 16;
  const size_t round_bytes[kRounds] = {1, 4099, 0, kSlot, 8};
  auto body = [&](int me, const std::vector<char>& handles, void* state) {
    auto* s = static_cast<GinRank*>(state);
    void* coll = nullptr;
    if (!gin_connect(p, state, handles, kRanks, me, &coll)) return false;
    CHILD_CHECK(p.gin->closeListen(s->listen_comm) == ncclSuccess, "closeListen");
    std::vector<uint64_t> signals(4 * kRanks, 0);
    std::vector<uint8_t> window(2 * kRanks * kSlot + 2 * kRanks * kPlain, 0);
    const size_t recv_base = kRanks * kSlot, plain_base = 2 * kRanks * kSlot, plain_in = plain_base + kRanks * kPlain;
    void *sig_mh, *sig_gh, *win_mh, *win_gh;
    CHILD_CHECK(p.gin->regMrSym(coll, signals.data(), signals.size() * 8, abi::kPtrHost, 0, &sig_mh, &sig_gh) ==
                    ncclSuccess,
                "regMrSym signals");
    CHILD_CHECK(p.gin->regMrSym(coll, window.data(), window.size(), abi::kPtrHost, 0, &win_mh, &win_gh) == ncclSuccess,
                "regMrSym window");
    CHILD_CHECK(sig_mh == sig_gh && win_mh == win_gh, "mhandle and ginHandle differ");
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    auto signal = [&](int kind, int src) { return __atomic_load_n(&signals[kind * kRanks + src], __ATOMIC_ACQUIRE); };
    // Progress (as NCCL's GIN progress thread would) until every request is done and `ready` holds.
    auto drive = [&](std::vector<void*>& requests, const std::function<bool()>& ready) {
      while (Clock::now() < deadline) {
        CHILD_CHECK(p.gin->ginProgress(coll) == ncclSuccess, "ginProgress");
        for (auto& r : requests) {
          int done = 0;
          if (r) CHILD_CHECK(p.gin->test(coll, r, &done) == ncclSuccess, "test");
          if (done) r = nullptr;
        }
        bool all = true;
        for (void* r : requests) all = all && !r;
        if (all && ready()) return true;
      }
      fprintf(stderr, "[child %d] requests or signals not complete within 60 s\n", me);
      return false;
    };
    uint64_t data_sum = 0;
    for (int k = 0; k < kRounds; ++k) {
      std::vector<void*> requests;
      CHILD_CHECK(drive(requests,
                        [&] {
                          for (int r = 0; r < kRanks; ++r)
                            if (r != me && signal(3, r) < static_cast<uint64_t>(k)) return false;
                          return true;
                        }),
                  "round %d: peers' acknowledgements of round %d", k, k - 1);
      const size_t bytes = round_bytes[k];
      for (int dst = 0; dst < kRanks; ++dst) {
        for (size_t b = 0; b < kSlot; ++b) window[dst * kSlot + b] = pattern(me, k * 16 + dst, b);
        for (size_t b = 0; b < kPlain; ++b) window[plain_base + dst * kPlain + b] = pattern(me, 1000 + k, b);
      }
      for (int dst = 0; dst < kRanks; ++dst) {
        void* r[4] = {};
        CHILD_CHECK(p.gin->iput(coll, plain_base + dst * kPlain, win_mh, kPlain, plain_in + me * kPlain, win_mh, dst,
                                &r[0]) == ncclSuccess,
                    "iput");
        CHILD_CHECK(p.gin->iputSignal(coll, dst * kSlot, win_mh, bytes, recv_base + me * kSlot, win_mh, dst, 8 * me,
                                      sig_gh, k + 1, abi::kSignalOpAdd, &r[1]) == ncclSuccess,
                    "iputSignal data");
        CHILD_CHECK(p.gin->iputSignal(coll, 0, nullptr, 0, 0, nullptr, dst, 8 * (kRanks + me), sig_gh, 0,
                                      abi::kSignalOpInc, &r[2]) == ncclSuccess,
                    "iputSignal INC, signal only");
        CHILD_CHECK(p.gin->iputSignal(coll, 0, win_mh, 0, 0, win_mh, dst, 8 * (2 * kRanks + me), sig_gh, 2,
                                      abi::kSignalOpAdd, &r[3]) == ncclSuccess,
                    "iputSignal size 0");
        for (void* x : r) CHILD_CHECK(x, "a null request");
        requests.insert(requests.end(), r, r + 4);
      }
      data_sum += k + 1;
      CHILD_CHECK(drive(requests,
                        [&] {
                          for (int r = 0; r < kRanks; ++r)
                            if (signal(0, r) < data_sum || signal(1, r) < uint64_t(k + 1) ||
                                signal(2, r) < uint64_t(2 * (k + 1)))
                              return false;
                          return true;
                        }),
                  "round %d: puts and signals", k);
      for (int src = 0; src < kRanks; ++src) {
        CHILD_CHECK(signal(0, src) == data_sum && signal(1, src) == uint64_t(k + 1) &&
                        signal(2, src) == uint64_t(2 * (k + 1)),
                    "round %d: signals from %d are %llu %llu %llu", k, src, (unsigned long long)signal(0, src),
                    (unsigned long long)signal(1, src), (unsigned long long)signal(2, src));
        for (size_t b = 0; b < bytes; ++b)
          CHILD_CHECK(window[recv_base + src * kSlot + b] == pattern(src, k * 16 + me, b),
                      "round %d: byte %zu from rank %d differs", k, b, src);
        for (size_t b = 0; b < kPlain; ++b)
          CHILD_CHECK(window[plain_in + src * kPlain + b] == pattern(src, 1000 + k, b),
                      "round %d: plain put byte %zu from rank %d differs", k, b, src);
      }
      std::vector<void*> acks;
      for (int dst = 0; dst < kRanks; ++dst) {
        if (dst == me) continue;
        void* r = nullptr;
        CHILD_CHECK(p.gin->iputSignal(coll, 0, nullptr, 0, 0, nullptr, dst, 8 * (3 * kRanks + me), sig_gh, 1,
                                      abi::kSignalOpAdd, &r) == ncclSuccess &&
                        r,
                    "acknowledgement");
        acks.push_back(r);
      }
      CHILD_CHECK(drive(acks, [] { return true; }), "round %d: acknowledgements", k);
    }
    std::vector<void*> none;
    CHILD_CHECK(drive(none,
                      [&] {
                        for (int r = 0; r < kRanks; ++r)
                          if (r != me && signal(3, r) < static_cast<uint64_t>(kRounds)) return false;
                        return true;
                      }),
                "final acknowledgements");
    CHILD_CHECK(p.gin->deregMrSym(coll, win_mh) == ncclSuccess && p.gin->deregMrSym(coll, sig_mh) == ncclSuccess,
                "deregMrSym");
    CHILD_CHECK(p.gin->closeColl(coll) == ncclSuccess && p.gin->finalize(s->ctx) == ncclSuccess, "closeColl");
    return true;
  };
  run_processes(kRanks, gin_rank_maker(p, 11), body);
}

// A rank that goes away with a put to it in flight: the sender's test() fails (it does not wait
// forever), and so does every later call, including the next put (the only call whose result
// NCCL's proxy checks).
TEST(LoopbackPlugin, GinPeerClosingWithAPutInFlightIsAnErrorThatSticks) {
  Plugin p = load_plugin();
  ASSERT_NE(p.gin, nullptr);
  auto body = [&](int me, const std::vector<char>& handles, void* state) {
    void* coll = nullptr;
    if (!gin_connect(p, state, handles, 2, me, &coll)) return false;
    std::vector<uint8_t> window(1 << 16, 1);
    void *mh = nullptr, *gh = nullptr;
    CHILD_CHECK(p.gin->regMrSym(coll, window.data(), window.size(), abi::kPtrHost, 0, &mh, &gh) == ncclSuccess,
                "regMrSym");
    if (me == 1) return p.gin->closeColl(coll) == ncclSuccess;  // leaves at once
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    void* r = nullptr;
    ncclResult_t res = p.gin->iput(coll, 0, mh, window.size(), 0, mh, 1, &r);
    const auto deadline = Clock::now() + std::chrono::seconds(20);
    int done = 0;
    while (res == ncclSuccess && !done && Clock::now() < deadline) res = p.gin->test(coll, r, &done);
    CHILD_CHECK(res != ncclSuccess && !done, "a put to a rank that closed: test gave %d, done %d", int(res), done);
    void* again = nullptr;
    CHILD_CHECK(p.gin->iput(coll, 0, mh, 8, 0, mh, 1, &again) == res && !again, "the next put must report it too");
    CHILD_CHECK(p.gin->ginProgress(coll) == res, "progress must report it too");
    return p.gin->closeColl(coll) == ncclSuccess;
  };
  run_processes(2, gin_rank_maker(p, 13), body);
}

// EPCOMM_LOOPBACK_DEAD_PEERS=1 (the process-death tests): rank 2 goes away with a put to it in
// flight; rank 0's puts to it count as done and are dropped, and ranks 0 and 1 still put to each
// other, bytes checked. The variable is read once per process: only the forked children set it.
TEST(LoopbackPlugin, GinDeadPeerModeDropsPutsToTheDeadAndTheOthersGoOn) {
  Plugin p = load_plugin();
  ASSERT_NE(p.gin, nullptr);
  constexpr int kRanks = 3;
  const auto make_rank = gin_rank_maker(p, 13);
  auto make_handle = [&](int me, void* handle, void** state) {
    setenv("EPCOMM_LOOPBACK_DEAD_PEERS", "1", 1);
    return make_rank(me, handle, state);
  };
  auto body = [&](int me, const std::vector<char>& handles, void* state) {
    void* coll = nullptr;
    if (!gin_connect(p, state, handles, kRanks, me, &coll)) return false;
    constexpr size_t kBytes = 1 << 12;
    std::vector<uint8_t> window(2 * kBytes, 0);  // [0, kBytes): what this rank sends; [kBytes, 2 kBytes): received
    for (size_t i = 0; i < kBytes; ++i) window[i] = static_cast<uint8_t>(17 * me + i);
    void *mh = nullptr, *gh = nullptr;
    CHILD_CHECK(p.gin->regMrSym(coll, window.data(), window.size(), abi::kPtrHost, 0, &mh, &gh) == ncclSuccess,
                "regMrSym");
    if (me == 2) _exit(0);  // dies: no close, no acknowledgement
    const auto wait_done = [&](void* r, const char* what) {
      const auto deadline = Clock::now() + std::chrono::seconds(20);
      int done = 0;
      while (!done && Clock::now() < deadline) CHILD_CHECK(p.gin->test(coll, r, &done) == ncclSuccess, "%s", what);
      CHILD_CHECK(done, "%s: not done within 20 s", what);
      return true;
    };
    if (me == 0) {  // a put to the dead rank, first in flight as it dies, then after
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      for (int i = 0; i < 2; ++i) {
        void* r = nullptr;
        CHILD_CHECK(p.gin->iput(coll, 0, mh, kBytes, kBytes, mh, 2, &r) == ncclSuccess && r, "put to the dead rank");
        if (!wait_done(r, "put to the dead rank")) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
    }
    const int other = 1 - me;  // ranks 0 and 1 still reach each other
    void* r = nullptr;
    CHILD_CHECK(p.gin->iput(coll, 0, mh, kBytes, kBytes, mh, other, &r) == ncclSuccess && r, "put to the live rank");
    if (!wait_done(r, "put to the live rank")) return false;
    const auto deadline = Clock::now() + std::chrono::seconds(20);
    while (window[2 * kBytes - 1] != static_cast<uint8_t>(17 * other + kBytes - 1) && Clock::now() < deadline) {
      CHILD_CHECK(p.gin->ginProgress(coll) == ncclSuccess, "progress");
    }
    for (size_t i = 0; i < kBytes; ++i)
      CHILD_CHECK(window[kBytes + i] == static_cast<uint8_t>(17 * other + i), "byte %zu from rank %d", i, other);
    CHILD_CHECK(p.gin->deregMrSym(coll, mh) == ncclSuccess, "deregMrSym");
    return p.gin->closeColl(coll) == ncclSuccess;
  };
  run_processes(kRanks, make_handle, body);
}

}  // namespace
