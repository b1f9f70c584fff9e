// Call numbers (kernels/common/control.hpp): which numbers a kernel may run with, and what the host
// says when a buffer has used them all (the GPU side: ReliabilityGpu.CallNumbersRunOutThenReset and
// LowLatencyGpu.CallNumbersRunOutThenCleanRecovers).
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "kernels/common/control.hpp"
#include "kernels/common/diagnostics.hpp"

namespace epcomm {
namespace {

TEST(CallNumbers, OnlyOneToTheLastMayRun) {
  EXPECT_FALSE(call_number_usable(0));  // the counter came round
  EXPECT_TRUE(call_number_usable(1));   // a fresh buffer's first call
  EXPECT_TRUE(call_number_usable(0x80000000u));
  EXPECT_TRUE(call_number_usable(kLastCallNumber));
  EXPECT_FALSE(call_number_usable(kLastCallNumber + 1));
  EXPECT_FALSE(call_number_usable(0xffffffffu));
}

TEST(CallNumbers, TheRecordSaysWhatToDo) {
  DeviceErrorRecord r{};
  r.code = 4;
  r.kernel = KernelId::kLowLatencyCombine;
  r.rank = 3;
  r.peer = -1;
  r.expected = kLastCallNumber;
  r.observed = kLastCallNumber + 1;
  const std::string msg = describe(r);
  EXPECT_NE(msg.find("low_latency_combine on rank 3 did not run"), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::to_string(kLastCallNumber) + " call numbers"), std::string::npos) << msg;
  EXPECT_NE(msg.find("reset()"), std::string::npos) << msg;
  EXPECT_NE(msg.find("clean_low_latency_buffer"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("timed out"), std::string::npos) << msg;
}

}  // namespace
}  // namespace epcomm
