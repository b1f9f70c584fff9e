// What both halves of the loopback plugin share: logging through the logger NCCL hands to init(),
// the one timeout every blocking step obeys, and TCP sockets on 127.0.0.1 (the fake nodes are
// processes of one host, so the loopback interface is the whole network).
#pragma once

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "nccl_plugin_abi.h"

namespace epcomm::loopback {

// NCCL passes its logger to each init(); WARNs also go to stderr when NCCL_DEBUG is unset, so a
// failure is never silent.
void set_logger(abi::DebugLogger logger);
void log_message(abi::LogLevel level, const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define LB_WARN(...) ::epcomm::loopback::log_message(::epcomm::loopback::abi::kLogWarn, __FILE__, __LINE__, __VA_ARGS__)
#define LB_INFO(...) ::epcomm::loopback::log_message(::epcomm::loopback::abi::kLogInfo, __FILE__, __LINE__, __VA_ARGS__)

// A failed system call becomes a WARN naming the call and errno, and ncclSystemError.
#define LB_SYSCHECK(expr, what)                                              \
  do {                                                                       \
    if ((expr) < 0) {                                                        \
      LB_WARN("loopback: %s failed: %s (%s)", what, strerror(errno), #expr); \
      return ncclSystemError;                                                \
    }                                                                        \
  } while (0)

#define LB_CHECK(expr)                          \
  do {                                          \
    ncclResult_t lb_res_ = (expr);              \
    if (lb_res_ != ncclSuccess) return lb_res_; \
  } while (0)

// EPCOMM_LOOPBACK_TIMEOUT_MS (default 120000): the bound on every wait of the plugin (a
// handshake, a CUDA copy). The only environment variable the plugin reads.
int timeout_ms();

class Deadline {
 public:
  explicit Deadline(int ms) : end_(std::chrono::steady_clock::now() + std::chrono::milliseconds(ms)) {}
  bool expired() const { return std::chrono::steady_clock::now() >= end_; }
  int remaining_ms() const;

 private:
  std::chrono::steady_clock::time_point end_;
};

// Where a listening socket can be reached; the start of every handle the plugin hands to NCCL.
struct Endpoint {
  uint32_t magic;
  uint16_t port;  // network byte order is not needed: one host
  uint16_t pad;
  uint64_t nonce;  // random per listen: a connection to a port reused by another listener is refused
};
constexpr uint32_t kEndpointMagic = 0x45504c42;  // "EPLB"

// A listening socket on 127.0.0.1, any free port, nonblocking.
ncclResult_t listen_socket(int* fd, Endpoint* endpoint);
// Starts a nonblocking connect; connect_poll says when it is established.
ncclResult_t connect_start(const Endpoint& endpoint, int* fd);
ncclResult_t connect_poll(int fd, bool* connected);
// A pending connection, or *fd = -1 when none is waiting.
ncclResult_t accept_poll(int listen_fd, int* fd);
// The same two, waiting until done or the deadline passes (the GIN mesh is built in one call).
ncclResult_t connect_blocking(const Endpoint& endpoint, int* fd, const Deadline& deadline);
ncclResult_t accept_blocking(int listen_fd, int* fd, const Deadline& deadline);

// Nonblocking partial transfers: *moved may be 0 (the socket would block). *closed is set when the
// peer has closed its end (recv) or reset it (send).
ncclResult_t send_some(int fd, const void* data, size_t bytes, size_t* moved, bool* closed);
ncclResult_t recv_some(int fd, void* data, size_t bytes, size_t* moved, bool* closed);

// Whole transfers bounded by a deadline, for handshakes; `what` names the step in the error.
ncclResult_t send_all(int fd, const void* data, size_t bytes, const Deadline& deadline, const char* what);
ncclResult_t recv_all(int fd, void* data, size_t bytes, const Deadline& deadline, const char* what);

void close_fd(int* fd);
uint64_t random_nonce();

}  // namespace epcomm::loopback
