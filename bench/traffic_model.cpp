// epcomm-traffic-model: what one dispatch or combine moves per rank over NVLink and over the network
// across nodes, and a MODEL of its time on 400 Gb/s NICs, as markdown (issue 21, "figures that
// predict a cluster"; docs/design-scale.md section 6). No GPU: tokens are routed with a fixed seed
// and counted as the kernels move them (bench/traffic_count.hpp); DeepEP's figures beside them are
// the ones its README publishes (H800, CX7 400 Gb/s), restated below.
//
//   build/bench/epcomm-traffic-model                 # every table (docs/design-scale.md)
//   build/bench/epcomm-traffic-model --nic-gbs 45 --msg-us 0.5 --seed 7
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "traffic_count.hpp"

namespace {

using namespace epcomm::traffic;

// ---- the model (assumptions; every one can be changed from the command line) ----
struct Model {
  double nic_gbs = 50;   // per direction per GPU: one 400 Gb/s NIC
  double nvl_gbs = 300;  // per direction per GPU: plain SM stores, measured (TARGETS.md; datasheet 478)
  double msg_us = 0.01;  // per network message (put or signal) a rank issues: 100 M per second per NIC
  double hop_us = 3;     // per network phase: put, signal, the peer's poll sees it
  int ll_blocks = 132;   // LL grid: every SM of an H100 / H200
  int sms = 24;          // normal mode: Config::num_sms
  uint64_t seed = 1;
};

struct Summary {
  double net_tx_max = 0, net_tx_mean = 0, net_rx_max = 0, nvl_tx_max = 0, nvl_tx_mean = 0, nvl_rx_max = 0;
  double msgs_max = 0, rows_max = 0, rows_mean = 0;
};
Summary summarize(const Count& c) {
  Summary s;
  for (const RankCount& r : c) {
    s.net_tx_max = std::max(s.net_tx_max, double(r.net_tx)), s.net_tx_mean += double(r.net_tx) / c.size();
    s.net_rx_max = std::max(s.net_rx_max, double(r.net_rx));
    s.nvl_tx_max = std::max(s.nvl_tx_max, double(r.nvl_tx)), s.nvl_tx_mean += double(r.nvl_tx) / c.size();
    s.nvl_rx_max = std::max(s.nvl_rx_max, double(r.nvl_rx));
    s.msgs_max = std::max(s.msgs_max, double(r.puts + r.signals));
    s.rows_max = std::max(s.rows_max, double(r.rows)), s.rows_mean += double(r.rows) / c.size();
  }
  return s;
}
double max_of(const std::vector<uint64_t>& v) { return double(*std::max_element(v.begin(), v.end())); }

// Microseconds of the slowest rank's link in the busier direction, of its messages, of a phase.
double net_us(const Model& m, const Summary& s) { return std::max(s.net_tx_max, s.net_rx_max) / (m.nic_gbs * 1e3); }
double nvl_us(const Model& m, const Summary& s) { return std::max(s.nvl_tx_max, s.nvl_rx_max) / (m.nvl_gbs * 1e3); }
double msg_us(const Model& m, const Summary& s) { return s.msgs_max * m.msg_us; }
// One network phase whose NVLink stores run at the same time (LL; an overlapped normal-mode phase).
double overlapped(const Model& m, const Summary& s) {
  return m.hop_us + std::max(net_us(m, s) + msg_us(m, s), nvl_us(m, s));
}

std::string mb(double bytes) {
  char t[32];
  std::snprintf(t, sizeof(t), "%.2f", bytes / 1e6);
  return t;
}
std::string num(double v, const char* fmt = "%.0f") {
  char t[32];
  std::snprintf(t, sizeof(t), fmt, v);
  return t;
}

// ---- DeepEP's published figures (README / docs/legacy.md, H800 + CX7 400 Gb/s, pure RDMA for LL) ----
struct DeepEpLowLatency {
  int ranks;
  double dispatch_us, dispatch_gbs, combine_us, combine_gbs;
};
constexpr DeepEpLowLatency kDeepEpLowLatency[] = {{8, 77, 98, 114, 127},   {16, 118, 63, 195, 74},
                                                  {32, 155, 48, 273, 53},  {64, 173, 43, 314, 46},
                                                  {128, 192, 39, 369, 39}, {256, 194, 39, 360, 40}};
struct DeepEpNormal {
  int ranks;
  double dispatch_gbs, combine_gbs;  // FP8 dispatch, BF16 combine: "bottleneck bandwidth (RDMA)"
};
constexpr DeepEpNormal kDeepEpNormal[] = {{16, 43, 43}, {32, 58, 57}, {64, 51, 50}};

const DeepEpLowLatency* deepep_ll(int R) {
  for (const auto& d : kDeepEpLowLatency)
    if (d.ranks == R) return &d;
  return nullptr;
}
const DeepEpNormal* deepep_normal(int R) {
  for (const auto& d : kDeepEpNormal)
    if (d.ranks == R) return &d;
  return nullptr;
}

int ll_experts(int R) { return (288 + R - 1) / R * R; }  // 288, or the next multiple of R

void low_latency_tables(const Model& m) {
  const int ranks[] = {64, 128, 144, 256, 320};
  const Routing routings[] = {Routing::kUniform, Routing::kSkewed};
  std::printf(
      "### Low-latency mode: bytes per rank per call (MB = 1e6 bytes), 128 tokens, hidden 7168, top-8, P = 8\n\n");
  std::printf(
      "| EP | nodes | experts | routing | op | network send max / mean | network recv max | NVLink send max / mean "
      "| NVLink recv max | network messages max (puts + signals) | DeepEP's count (its test: every selection) |\n");
  std::printf("| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  std::string model_rows;
  for (int R : ranks)
    for (Routing routing : routings) {
      const Shape s{R, 8, 128, 7168, 8, ll_experts(R)};
      const TopK topk = route(s, routing, m.seed);
      const LowLatencyTraffic fp8 = count_low_latency(s, topk, true, m.ll_blocks);
      const LowLatencyTraffic bf16 = count_low_latency(s, topk, false, m.ll_blocks);
      const struct {
        const char* op;
        const Count& c;
        bool dispatch;
      } ops[] = {{"dispatch FP8", fp8.dispatch, true},
                 {"dispatch BF16", bf16.dispatch, true},
                 {"combine BF16", fp8.combine, false}};
      for (const auto& o : ops) {
        const Summary x = summarize(o.c);
        std::printf("| %d | %d | %d | %s | %s | %s / %s | %s | %s / %s | %s | %s | %s |\n", R, s.nodes(), s.experts,
                    name_of(routing), o.op, mb(x.net_tx_max).c_str(), mb(x.net_tx_mean).c_str(),
                    mb(x.net_rx_max).c_str(), mb(x.nvl_tx_max).c_str(), mb(x.nvl_tx_mean).c_str(),
                    mb(x.nvl_rx_max).c_str(), num(x.msgs_max).c_str(),
                    std::strcmp(o.op, "dispatch BF16")
                        ? mb(max_of(deepep_low_latency_bytes(s, topk, o.dispatch))).c_str()
                        : "-");
        if (!std::strcmp(o.op, "dispatch BF16")) continue;
        const DeepEpLowLatency* d = deepep_ll(R);
        char row[512];
        std::snprintf(row, sizeof(row), "| %d | %s | %s | %.0f | %.0f | %.0f | %.0f | **%.0f** | %.0f | %s |\n", R,
                      name_of(routing), o.op, net_us(m, x), msg_us(m, x), nvl_us(m, x), m.hop_us, overlapped(m, x),
                      overlapped(m, x) + 9 * msg_us(m, x),
                      d ? num(o.dispatch ? d->dispatch_us : d->combine_us).c_str() : "-");
        model_rows += row;
      }
    }
  std::printf("\n### Low-latency mode: MODEL of the time per call (us), not a measurement\n\n");
  std::printf(
      "| EP | routing | op | network (bytes / NIC) | messages | NVLink (bytes / NVLink) | phase latency | model "
      "total | the same, 10 x the message cost | DeepEP published (H800, pure RDMA) |\n");
  std::printf("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n%s\n", model_rows.c_str());
}

void normal_tables(const Model& m) {
  const int ranks[] = {16, 32, 64, 128};
  const Routing routings[] = {Routing::kUniform, Routing::kSkewed, Routing::kGrouped};
  std::printf(
      "### Normal mode across nodes: bytes per rank per call (MB), 4096 tokens, hidden 7168, top-8, 256 experts, "
      "P = 8\n\n");
  std::printf(
      "| EP | nodes | routing | op | network send max / mean | network recv max | NVLink send max / mean | NVLink "
      "recv max | network messages max | rows received max / mean | DeepEP's RDMA count (its test) |\n");
  std::printf("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  std::string model_rows;
  for (int R : ranks)
    for (Routing routing : routings) {
      const Shape s{R, 8, 4096, 7168, 8, 256};
      const TopK topk = route(s, routing, m.seed);
      const NormalTraffic fp8 = count_normal(s, topk, true, m.sms, 32, 1024);
      const NormalTraffic bf16 = count_normal(s, topk, false, m.sms, 32, 1024);
      const NormalTraffic bfp = count_normal(s, topk, true, m.sms, 32, 1024, /*bf16_partials=*/true);
      const double deepep_fp8 = max_of(deepep_normal_rdma_bytes(s, topk, true));
      const double deepep_bf16 = max_of(deepep_normal_rdma_bytes(s, topk, false));
      const struct {
        const char* op;
        const Count& c;
        double deepep;
      } ops[] = {{"notify (count exchange)", fp8.notify, 0},
                 {"dispatch FP8", fp8.dispatch, deepep_fp8},
                 {"dispatch BF16", bf16.dispatch, deepep_bf16},
                 {"combine (float32 partials)", fp8.combine, deepep_bf16},
                 {"combine (BF16 partials, opt-in)", bfp.combine, deepep_bf16}};
      for (const auto& o : ops) {
        const Summary x = summarize(o.c);
        std::printf("| %d | %d | %s | %s | %s / %s | %s | %s / %s | %s | %s | %s / %s | %s |\n", R, s.nodes(),
                    name_of(routing), o.op, mb(x.net_tx_max).c_str(), mb(x.net_tx_mean).c_str(),
                    mb(x.net_rx_max).c_str(), mb(x.nvl_tx_max).c_str(), mb(x.nvl_tx_mean).c_str(),
                    mb(x.nvl_rx_max).c_str(), num(x.msgs_max).c_str(), num(x.rows_max).c_str(),
                    num(x.rows_mean).c_str(), o.deepep > 0 ? mb(o.deepep).c_str() : "-");
      }
      // The model: phases in sequence as the kernels run them today; "overlapped": the same bytes
      // if the network and NVLink phases ran at the same time (the ring of section 4, or DeepEP).
      const Summary n = summarize(fp8.notify), d = summarize(fp8.dispatch), c = summarize(fp8.combine),
                    cb = summarize(bfp.combine);
      const double notify = m.hop_us + net_us(m, n) + msg_us(m, n);
      const double d_seq = notify + m.hop_us + net_us(m, d) + msg_us(m, d) + nvl_us(m, d);
      const double d_ovl = notify + overlapped(m, d);
      const double c_seq = nvl_us(m, c) + m.hop_us + net_us(m, c) + msg_us(m, c);
      const double c_ovl = overlapped(m, c);
      const double cb_seq = nvl_us(m, cb) + m.hop_us + net_us(m, cb) + msg_us(m, cb);
      const double cb_ovl = overlapped(m, cb);
      const DeepEpNormal* dp = deepep_normal(R);
      const bool implied = dp && routing == Routing::kGrouped;
      char row[960];
      const std::string deepep_combine = implied ? num(deepep_bf16 / (dp->combine_gbs * 1e3)) : "-";
      std::snprintf(row, sizeof(row),
                    "| %d | %s | dispatch FP8 | %.0f | %.0f | %.0f | %.0f | %.0f | **%.0f** / %.0f | %s |\n"
                    "| %d | %s | combine | - | %.0f | %.0f | %.0f | %.0f | **%.0f** / %.0f | %s |\n"
                    "| %d | %s | combine, BF16 partials | - | %.0f | %.0f | %.0f | %.0f | **%.0f** / %.0f | %s |\n",
                    R, name_of(routing), notify, net_us(m, d), msg_us(m, d), nvl_us(m, d), m.hop_us, d_seq, d_ovl,
                    implied ? num(deepep_fp8 / (dp->dispatch_gbs * 1e3)).c_str() : "-", R, name_of(routing),
                    net_us(m, c), msg_us(m, c), nvl_us(m, c), m.hop_us, c_seq, c_ovl, deepep_combine.c_str(), R,
                    name_of(routing), net_us(m, cb), msg_us(m, cb), nvl_us(m, cb), m.hop_us, cb_seq, cb_ovl,
                    deepep_combine.c_str());
      model_rows += row;
    }
  std::printf("\n### Normal mode across nodes: MODEL of the time per call (us), not a measurement\n\n");
  std::printf(
      "| EP | routing | op | notify | network (bytes / NIC) | messages | NVLink (bytes / NVLink) | phase latency | "
      "model total: phases in sequence (today) / overlapped | DeepEP implied (its count / its published GB/s) |\n");
  std::printf("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n%s\n", model_rows.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  Model m;
  for (int i = 1; i + 1 < argc; i += 2) {
    const char* a = argv[i];
    const double v = std::atof(argv[i + 1]);
    if (!std::strcmp(a, "--nic-gbs")) m.nic_gbs = v;
    else if (!std::strcmp(a, "--nvl-gbs")) m.nvl_gbs = v;
    else if (!std::strcmp(a, "--msg-us")) m.msg_us = v;
    else if (!std::strcmp(a, "--hop-us")) m.hop_us = v;
    else if (!std::strcmp(a, "--ll-blocks")) m.ll_blocks = static_cast<int>(v);
    else if (!std::strcmp(a, "--sms")) m.sms = static_cast<int>(v);
    else if (!std::strcmp(a, "--seed")) m.seed = std::strtoull(argv[i + 1], nullptr, 10);
    else
      return std::fprintf(stderr,
                          "usage: %s [--nic-gbs 50] [--nvl-gbs 300] [--msg-us 0.01] [--hop-us 3] [--ll-blocks 132] "
                          "[--sms 24] [--seed 1]\n",
                          argv[0]),
             2;
  }
  std::printf(
      "Model: NIC %.0f GB/s and NVLink %.0f GB/s per direction per GPU, %.2f us per network message a rank "
      "issues, %.1f us per network phase; LL grid %d blocks, normal mode %d SMs; routing seed %llu.\n\n",
      m.nic_gbs, m.nvl_gbs, m.msg_us, m.hop_us, m.ll_blocks, m.sms, static_cast<unsigned long long>(m.seed));
  low_latency_tables(m);
  normal_tables(m);
  return 0;
}
