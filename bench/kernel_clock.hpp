// Kernel durations as a profiler records them (CUPTI activity records: a kernel's start and end on
// the GPU, no launch or queue time), the way DeepEP's test_low_latency.py times its kernels with
// kineto. epcomm-bench prints them beside its CUDA-event figures (which include the launch).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace epcomm::bench {

class KernelClock {
 public:
  // Starts recording every kernel of the process; false where the build or the machine has no CUPTI
  // (the bench then prints no kernel times). Call from one thread while no other thread launches.
  static bool start();
  // Delivers the records so far (call after the streams are synchronized) and stops recording.
  static void stop();
  // The GPU timestamp the records use, in ns (0 without CUPTI).
  static uint64_t now();
  // Durations in us, in order of start, of the kernels on `device` whose (mangled) name contains
  // `name` and that started within [t0, t1].
  static std::vector<double> durations(int device, const std::string& name, uint64_t t0, uint64_t t1);
};

}  // namespace epcomm::bench
