// The record a timed-out GPU wait leaves for the host: plain data, shared by kernels and host code.
// It lives in host-mapped pinned memory so the host can read it while a kernel is still running.
#pragma once

#include <cstdint>
#include <string>

namespace epcomm {

enum class KernelId : int32_t {
  kNone = 0,
  kLayout,
  kNotifyDispatch,
  kDispatch,
  kCombine,
  kLowLatencyDispatch,
  kLowLatencyCombine,
  kBarrier,
  kLowLatencyClean,
};

enum class WaitPhase : int32_t {
  kNone = 0,
  kNotifyMeta,        // waiting for a peer's counts and masks
  kDispatchReady,     // receiver waiting for a sender's staged chunk
  kDispatchSlotFree,  // sender waiting for a receiver to release a ring slot
  kCombineReady,      // origin waiting for an expert rank's rows
  kCombineSlotFree,   // expert rank waiting for an origin to release a ring slot
  kLowLatencyRecv,    // LL receiver waiting for a sender's count
  kBarrier,
  kLowLatencyDispatchCount,    // LL dispatch receive: a source's row count for a local expert
  kLowLatencyDispatchMessage,  // LL dispatch receive: one message (token row) from a source
  kLowLatencyCombineRow,       // LL combine receive: an expert rank's output row for (token, k)
  kLowLatencyCombineDone,      // LL combine receive: an expert rank finishing its send half
  kLowLatencyCombineWeights,   // LL per-rank combine send: an origin's topk_weights
  kLowLatencyClean,            // clean_low_latency_buffer: a peer arriving at its barrier
  kNetworkFlush,               // the network transport consuming this rank's puts to the peer (GIN flush)
};

// What a kernel reports in a DeviceErrorRecord (dev::report in wait.cuh writes it; describe() and
// Buffer::check_device_errors turn it into a message and an exception type).
enum class DeviceError : int32_t {
  kNone = 0,
  kTimeout = 1,            // a bounded wait gave up (the kernel stops: the local abort flag)
  kMismatch = 2,           // ranks disagree on a call's parameters (the kernel stops too)
  kBadArgument = 3,        // an argument only the device could check (the kernel goes on, so peers are
                           // not stranded); the host raises ArgumentError
  kCallNumbersUsedUp = 4,  // the call's number is past kLastCallNumber: the kernel did not run
};

struct DeviceErrorRecord {
  // A DeviceError, kept as its number: tests/cpu/test_call_numbers.cpp fills a record with `code = 4`.
  int32_t code;
  KernelId kernel;
  WaitPhase phase;
  int32_t rank;
  int32_t peer;
  int32_t block;
  uint64_t expected;
  uint64_t observed;

  DeviceError error() const { return static_cast<DeviceError>(code); }
};

// What every waiting kernel carries: where to report, when to give up, who it is.
struct WaitContext {
  DeviceErrorRecord* record;  // host-mapped
  int* abort_flag;            // device memory of this rank
  int* record_claimed;        // device: set by whoever writes the record
  uint64_t timeout_ns;
  KernelId kernel;
  int rank;
};

const char* kernel_name(KernelId k);
const char* phase_name(WaitPhase p);
std::string describe(const DeviceErrorRecord& r);

}  // namespace epcomm
