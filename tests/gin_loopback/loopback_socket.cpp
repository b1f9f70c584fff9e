// Logging, the timeout and the TCP helpers of the loopback plugin (loopback_socket.h).
#include "loopback_socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace epcomm::loopback {
namespace {

std::atomic<abi::DebugLogger> g_logger{nullptr};

ncclResult_t set_socket_options(int fd) {
  const int one = 1;
  // Small control messages (acknowledgements, headers) must not wait for Nagle's timer.
  LB_SYSCHECK(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)), "setsockopt(TCP_NODELAY)");
  const int flags = fcntl(fd, F_GETFL, 0);
  LB_SYSCHECK(flags, "fcntl(F_GETFL)");
  LB_SYSCHECK(fcntl(fd, F_SETFL, flags | O_NONBLOCK), "fcntl(O_NONBLOCK)");
  return ncclSuccess;
}

// Waits until fd is ready for `events`, at most until the deadline.
ncclResult_t wait_ready(int fd, short events, const Deadline& deadline, const char* what) {
  for (;;) {
    if (deadline.expired()) {
      LB_WARN("loopback: %s timed out after %d ms (EPCOMM_LOOPBACK_TIMEOUT_MS)", what, timeout_ms());
      return ncclSystemError;
    }
    pollfd p{fd, events, 0};
    const int n = poll(&p, 1, std::min(deadline.remaining_ms(), 100));
    if (n < 0 && errno == EINTR) continue;
    LB_SYSCHECK(n, "poll");
    if (n > 0) return ncclSuccess;
  }
}

}  // namespace

void set_logger(abi::DebugLogger logger) {
  if (logger) g_logger.store(logger);
}

void log_message(abi::LogLevel level, const char* file, int line, const char* fmt, ...) {
  char text[1024];
  va_list args;
  va_start(args, fmt);
  vsnprintf(text, sizeof(text), fmt, args);
  va_end(args);
  abi::DebugLogger logger = g_logger.load();
  if (logger) logger(level, abi::kLogSubsysNet | abi::kLogSubsysInit, file, line, "%s", text);
  if (level == abi::kLogWarn && (!logger || !getenv("NCCL_DEBUG"))) fprintf(stderr, "%s\n", text);
}

int timeout_ms() {
  static const int value = [] {
    const char* s = getenv("EPCOMM_LOOPBACK_TIMEOUT_MS");
    const int v = s ? atoi(s) : 0;
    return v > 0 ? v : 120000;
  }();
  return value;
}

int Deadline::remaining_ms() const {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end_ - std::chrono::steady_clock::now());
  return left.count() > 0 ? static_cast<int>(left.count()) : 0;
}

ncclResult_t listen_socket(int* fd, Endpoint* endpoint) {
  *fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  LB_SYSCHECK(*fd, "socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  LB_SYSCHECK(bind(*fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), "bind(127.0.0.1:0)");
  // A large backlog: every rank of a GIN mesh connects before its peer accepts (gin connect).
  LB_SYSCHECK(listen(*fd, 4096), "listen");
  LB_SYSCHECK(getsockname(*fd, reinterpret_cast<sockaddr*>(&addr), &len), "getsockname");
  const int flags = fcntl(*fd, F_GETFL, 0);
  LB_SYSCHECK(flags, "fcntl(F_GETFL)");
  LB_SYSCHECK(fcntl(*fd, F_SETFL, flags | O_NONBLOCK), "fcntl(O_NONBLOCK)");
  endpoint->magic = kEndpointMagic;
  endpoint->port = ntohs(addr.sin_port);
  endpoint->pad = 0;
  endpoint->nonce = random_nonce();
  return ncclSuccess;
}

ncclResult_t connect_start(const Endpoint& endpoint, int* fd) {
  if (endpoint.magic != kEndpointMagic) {
    LB_WARN("loopback: connect to a handle that is not a loopback handle (magic %#x)", endpoint.magic);
    return ncclInternalError;
  }
  *fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  LB_SYSCHECK(*fd, "socket");
  LB_CHECK(set_socket_options(*fd));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(endpoint.port);
  if (connect(*fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0 && errno != EINPROGRESS) {
    LB_WARN("loopback: connect to 127.0.0.1:%u failed: %s", endpoint.port, strerror(errno));
    return ncclSystemError;
  }
  return ncclSuccess;
}

ncclResult_t connect_poll(int fd, bool* connected) {
  *connected = false;
  pollfd p{fd, POLLOUT, 0};
  const int n = poll(&p, 1, 0);
  if (n < 0 && errno == EINTR) return ncclSuccess;
  LB_SYSCHECK(n, "poll(connect)");
  if (n == 0) return ncclSuccess;
  int err = 0;
  socklen_t len = sizeof(err);
  LB_SYSCHECK(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len), "getsockopt(SO_ERROR)");
  if (err != 0) {
    LB_WARN("loopback: connection to a peer failed: %s", strerror(err));
    return ncclSystemError;
  }
  *connected = true;
  return ncclSuccess;
}

ncclResult_t accept_poll(int listen_fd, int* fd) {
  *fd = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
  if (*fd < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return ncclSuccess;
    LB_WARN("loopback: accept failed: %s", strerror(errno));
    return ncclSystemError;
  }
  return set_socket_options(*fd);
}

ncclResult_t connect_blocking(const Endpoint& endpoint, int* fd, const Deadline& deadline) {
  LB_CHECK(connect_start(endpoint, fd));
  for (;;) {
    bool connected = false;
    LB_CHECK(connect_poll(*fd, &connected));
    if (connected) return ncclSuccess;
    LB_CHECK(wait_ready(*fd, POLLOUT, deadline, "connect to a peer"));
  }
}

ncclResult_t accept_blocking(int listen_fd, int* fd, const Deadline& deadline) {
  for (;;) {
    LB_CHECK(accept_poll(listen_fd, fd));
    if (*fd >= 0) return ncclSuccess;
    LB_CHECK(wait_ready(listen_fd, POLLIN, deadline, "accept a peer's connection"));
  }
}

ncclResult_t send_some(int fd, const void* data, size_t bytes, size_t* moved, bool* closed) {
  *moved = 0;
  *closed = false;
  if (bytes == 0) return ncclSuccess;
  const ssize_t n = send(fd, data, bytes, MSG_NOSIGNAL);
  if (n >= 0) {
    *moved = static_cast<size_t>(n);
    return ncclSuccess;
  }
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return ncclSuccess;
  if (errno == EPIPE || errno == ECONNRESET) {
    *closed = true;
    return ncclSuccess;
  }
  LB_WARN("loopback: send failed: %s", strerror(errno));
  return ncclSystemError;
}

ncclResult_t recv_some(int fd, void* data, size_t bytes, size_t* moved, bool* closed) {
  *moved = 0;
  *closed = false;
  if (bytes == 0) return ncclSuccess;
  const ssize_t n = recv(fd, data, bytes, 0);
  if (n > 0) {
    *moved = static_cast<size_t>(n);
    return ncclSuccess;
  }
  if (n == 0) {
    *closed = true;
    return ncclSuccess;
  }
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return ncclSuccess;
  if (errno == ECONNRESET) {
    *closed = true;
    return ncclSuccess;
  }
  LB_WARN("loopback: recv failed: %s", strerror(errno));
  return ncclSystemError;
}

ncclResult_t send_all(int fd, const void* data, size_t bytes, const Deadline& deadline, const char* what) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    size_t moved = 0;
    bool closed = false;
    LB_CHECK(send_some(fd, p, bytes, &moved, &closed));
    if (closed) {
      LB_WARN("loopback: %s: the peer closed the connection", what);
      return ncclSystemError;
    }
    p += moved;
    bytes -= moved;
    if (bytes > 0 && moved == 0) LB_CHECK(wait_ready(fd, POLLOUT, deadline, what));
  }
  return ncclSuccess;
}

ncclResult_t recv_all(int fd, void* data, size_t bytes, const Deadline& deadline, const char* what) {
  char* p = static_cast<char*>(data);
  while (bytes > 0) {
    size_t moved = 0;
    bool closed = false;
    LB_CHECK(recv_some(fd, p, bytes, &moved, &closed));
    if (closed) {
      LB_WARN("loopback: %s: the peer closed the connection", what);
      return ncclSystemError;
    }
    p += moved;
    bytes -= moved;
    if (bytes > 0 && moved == 0) LB_CHECK(wait_ready(fd, POLLIN, deadline, what));
  }
  return ncclSuccess;
}

void close_fd(int* fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

uint64_t random_nonce() {
  static std::atomic<uint64_t> counter{0};
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) ^ device() ^ (counter.fetch_add(1) << 48) ^ getpid();
}

}  // namespace epcomm::loopback
