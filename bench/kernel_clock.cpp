#include "kernel_clock.hpp"

#include <algorithm>
#include <cstdlib>
#include <mutex>

#ifdef EPCOMM_BENCH_HAVE_CUPTI
#include <cupti.h>
#endif

namespace epcomm::bench {

#ifdef EPCOMM_BENCH_HAVE_CUPTI
namespace {

struct Record {
  uint32_t device;
  uint64_t start, end;
  std::string name;
};

std::mutex mu;
std::vector<Record> records;
bool recording = false;

constexpr size_t kBufferBytes = 8u << 20;
constexpr size_t kAlign = 8;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(kAlign, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* a = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  while (cuptiActivityGetNextRecord(buffer, valid, &a) == CUPTI_SUCCESS) {
    if (a->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && a->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(a);
    records.push_back({k->deviceId, k->start, k->end, k->name ? k->name : ""});
  }
  std::free(buffer);
}

}  // namespace

bool KernelClock::start() {
  static const bool registered = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) == CUPTI_SUCCESS;
  if (!registered) return false;
  {
    std::lock_guard<std::mutex> lock(mu);
    records.clear();
  }
  recording = cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) == CUPTI_SUCCESS;
  return recording;
}

void KernelClock::stop() {
  if (!recording) return;
  cuptiActivityFlushAll(1);
  cuptiActivityDisable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  recording = false;
}

uint64_t KernelClock::now() {
  uint64_t t = 0;
  return cuptiGetTimestamp(&t) == CUPTI_SUCCESS ? t : 0;
}

std::vector<double> KernelClock::durations(int device, const std::string& name, uint64_t t0, uint64_t t1) {
  std::lock_guard<std::mutex> lock(mu);
  std::vector<std::pair<uint64_t, double>> got;
  for (const Record& r : records)
    if (static_cast<int>(r.device) == device && r.start >= t0 && r.start <= t1 &&
        r.name.find(name) != std::string::npos)
      got.push_back({r.start, (r.end - r.start) * 1e-3});
  std::sort(got.begin(), got.end());
  std::vector<double> us;
  for (const auto& g : got) us.push_back(g.second);
  return us;
}

#else  // built without CUPTI

bool KernelClock::start() { return false; }
void KernelClock::stop() {}
uint64_t KernelClock::now() { return 0; }
std::vector<double> KernelClock::durations(int, const std::string&, uint64_t, uint64_t) { return {}; }

#endif

}  // namespace epcomm::bench
