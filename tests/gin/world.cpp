// See world.hpp.
#include "gin/world.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

#include "harness.hpp"

namespace epcomm::gin_test {

GinWorld& world() {
  static GinWorld w;
  return w;
}

void run_world(const std::function<void(int, std::shared_ptr<Group>)>& fn) {
  test::run_group_threads(world().ranks, world().groups, fn);
}

std::vector<std::vector<uint8_t>> all_gather_bytes(Group& group, const std::vector<uint8_t>& mine) {
  const int R = group.size();
  const uint64_t size = mine.size();
  std::vector<uint64_t> sizes(R);
  group.all_gather(&size, sizes.data(), sizeof(uint64_t));
  uint64_t most = 0;
  for (uint64_t s : sizes) most = std::max(most, s);
  std::vector<std::vector<uint8_t>> out(R);
  if (most == 0) return out;
  std::vector<uint8_t> padded(most, 0), all(most * R);
  std::memcpy(padded.data(), mine.data(), mine.size());
  group.all_gather(padded.data(), all.data(), most);
  for (int r = 0; r < R; ++r) out[r].assign(all.begin() + r * most, all.begin() + r * most + sizes[r]);
  return out;
}

std::vector<std::vector<uint8_t>> run_and_exchange(Group& group, const std::function<std::vector<uint8_t>()>& body) {
  std::vector<uint8_t> payload;
  std::exception_ptr error;
  try {
    payload = body();
    payload.insert(payload.begin(), 1);  // ok
  } catch (...) {
    error = std::current_exception();
    payload.assign(1, 0);
  }
  std::vector<std::vector<uint8_t>> all = all_gather_bytes(group, payload);
  if (error) std::rethrow_exception(error);
  for (int r = 0; r < static_cast<int>(all.size()); ++r)
    if (all[r].empty() || all[r][0] != 1) {
      ADD_FAILURE() << "rank " << r << " failed its part (its own log says how); nothing compared";
      return {};
    }
  for (auto& a : all) a.erase(a.begin());
  return all;
}

namespace {

class Writer {
 public:
  template <class T>
  void pod(const T& v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof(T));
  }
  template <class T>
  void vec(const std::vector<T>& v) {
    pod<uint64_t>(v.size());
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    bytes.insert(bytes.end(), p, p + v.size() * sizeof(T));
  }
  void outputs(const std::vector<test::RoundOutput>& got) {
    pod<uint64_t>(got.size());
    for (const test::RoundOutput& o : got) {
      vec(o.recv_count);
      vec(o.src_info);
      vec(o.layout_range);
      vec(o.recv_x);
      vec(o.scales);
      vec(o.packed);
      vec(o.out);
    }
  }
  std::vector<uint8_t> bytes;
};

class Reader {
 public:
  explicit Reader(const std::vector<uint8_t>& b) : bytes_(b) {}
  template <class T>
  T pod() {
    T v;
    need(sizeof(T));
    std::memcpy(&v, bytes_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  template <class T>
  std::vector<T> vec() {
    const uint64_t n = pod<uint64_t>();
    need(n * sizeof(T));
    std::vector<T> v(n);
    std::memcpy(v.data(), bytes_.data() + at_, n * sizeof(T));
    at_ += n * sizeof(T);
    return v;
  }
  std::vector<test::RoundOutput> outputs() {
    std::vector<test::RoundOutput> got(pod<uint64_t>());
    for (test::RoundOutput& o : got) {
      o.recv_count = vec<int32_t>();
      o.src_info = vec<int32_t>();
      o.layout_range = vec<int64_t>();
      o.recv_x = vec<uint8_t>();
      o.scales = vec<float>();
      o.packed = vec<int32_t>();
      o.out = vec<uint16_t>();
    }
    return got;
  }

 private:
  void need(size_t n) const {
    if (at_ + n > bytes_.size()) throw std::runtime_error("truncated result from another rank");
  }
  const std::vector<uint8_t>& bytes_;
  size_t at_ = 0;
};

}  // namespace

std::vector<uint8_t> pack(const test::LLRankResult& r) {
  Writer w;
  w.outputs(r.got);
  w.vec(r.cum);
  w.vec(r.dwait);
  w.vec(r.cwait);
  w.pod(r.net_used);
  w.pod(r.net_puts);
  w.pod(r.net_bytes);
  w.pod(r.lsa_remote_words);
  return w.bytes;
}

test::LLRankResult unpack_ll(const std::vector<uint8_t>& bytes) {
  Reader rd(bytes);
  test::LLRankResult r;
  r.got = rd.outputs();
  r.cum = rd.vec<int32_t>();
  r.dwait = rd.vec<int64_t>();
  r.cwait = rd.vec<int64_t>();
  r.net_used = rd.pod<int>();
  r.net_puts = rd.pod<uint64_t>();
  r.net_bytes = rd.pod<uint64_t>();
  r.lsa_remote_words = rd.pod<uint64_t>();
  return r;
}

std::vector<uint8_t> pack(const test::DeadRankResult& r) {
  Writer w;
  w.outputs(r.got);
  w.vec(r.secs);
  w.pod<uint64_t>(r.masks.size());
  for (const auto& m : r.masks) w.vec(m);
  return w.bytes;
}

test::DeadRankResult unpack_dead_rank(const std::vector<uint8_t>& bytes) {
  Reader rd(bytes);
  test::DeadRankResult r;
  r.got = rd.outputs();
  r.secs = rd.vec<double>();
  r.masks.resize(rd.pod<uint64_t>());
  for (auto& m : r.masks) m = rd.vec<int32_t>();
  return r;
}

}  // namespace epcomm::gin_test
