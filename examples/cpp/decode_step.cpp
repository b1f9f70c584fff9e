// A decode step from C++ (what an inference engine runs per MoE layer): low-latency dispatch ->
// (identity experts) -> low-latency combine, first eagerly, then captured once in a CUDA graph and
// replayed. One thread per GPU, a communicator epcomm creates from an ncclUniqueId. Checks that
// combine(dispatch(x)) == sum over the token's valid top-k slots of weight * x, exactly (small
// integers and weights of 1/4, 1/2 and 1 keep every sum exact in BF16), after the eager step and
// after the replays, and prints the replayed step's time.
//
//   ./epcomm_decode_example [tokens] [hidden] [experts] [replays]
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "epcomm/buffer.hpp"
#include "example_util.hpp"

namespace {

using example::check;
using example::device_alloc;
using example::device_copy;

// Rows of `combined` that differ from sum_k w[t,k] * x[t] over the slots with an expert.
int count_mismatches(const __nv_bfloat16* combined, const std::vector<__nv_bfloat16>& x,
                     const std::vector<int64_t>& topk, const std::vector<float>& w, int T, int H, int K) {
  std::vector<__nv_bfloat16> got(static_cast<size_t>(T) * H);
  check(cudaMemcpy(got.data(), combined, sizeof(__nv_bfloat16) * got.size(), cudaMemcpyDeviceToHost), "copy");
  int bad = 0;
  for (int t = 0; t < T; ++t) {
    float weight = 0.f;
    for (int k = 0; k < K; ++k)
      weight += topk[static_cast<size_t>(t) * K + k] >= 0 ? w[static_cast<size_t>(t) * K + k] : 0.f;
    bool row_bad = false;
    for (int h = 0; h < H; ++h) {
      const size_t i = static_cast<size_t>(t) * H + h;
      row_bad |= __bfloat162float(got[i]) != weight * __bfloat162float(x[i]);
    }
    bad += row_bad;
  }
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  const int T = argc > 1 ? std::atoi(argv[1]) : 128;   // tokens this step (<= Tmax)
  const int H = argc > 2 ? std::atoi(argv[2]) : 2048;  // a multiple of 128
  const int E = argc > 3 ? std::atoi(argv[3]) : 64;    // divisible by the number of GPUs
  const int replays = argc > 4 ? std::atoi(argv[4]) : 50;
  const int K = 4, tmax = 128;
  return example::run_on_every_gpu(
      "epcomm_decode_example: no CUDA device; this example needs GPUs",
      [&](int rank, int R, std::shared_ptr<epcomm::Group> group) {
        using namespace epcomm;
        BufferOptions opts;
        opts.low_latency_mode = true;
        opts.num_rdma_bytes = Buffer::low_latency_size_hint(tmax, H, R, E);  // DeepEP's hint, same arguments
        Buffer buffer(group, opts);
        cudaStream_t stream;
        check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
        const StreamOrder order{stream, nullptr, false};  // no async_finish: the calls run on `stream`

        // Inputs: small integers, weights of 1/4, 1/2 or 1, distinct experts per token, and one
        // dropped slot (-1) in every fifth token.
        std::mt19937 rng(4321 + rank);
        std::vector<__nv_bfloat16> x_host(static_cast<size_t>(T) * H);
        for (auto& v : x_host) v = __float2bfloat16(static_cast<float>(rng() % 7) - 3.f);
        std::vector<int64_t> topk_host(static_cast<size_t>(T) * K);
        std::vector<float> w_host(topk_host.size());
        for (int t = 0; t < T; ++t)
          for (int k = 0; k < K; ++k) {
            topk_host[t * K + k] = (t == 0 || t % 5 != 0 || k != K - 1) ? (t * 7 + k * 13 + rank) % E : -1;
            w_host[t * K + k] = 0.25f * static_cast<float>(1 << (rng() % 3));
          }
        auto* x = device_copy(x_host);
        auto* topk = device_copy(topk_host);
        auto* w = device_copy(w_host);

        // The dispatch's outputs, allocated once (fixed shapes: every size follows from Tmax).
        const int EL = E / R, RT = R * tmax;
        LowLatencyDispatchInputs in;
        in.x = TensorView::contiguous(x, DType::kBF16, {T, H}, rank);
        in.topk_idx = TensorView::contiguous(topk, DType::kI64, {T, K}, rank);
        in.num_max_dispatch_tokens_per_rank = tmax;
        in.num_experts = E;
        in.use_fp8 = false;  // BF16 rows (exact); true sends FP8 with per-128-channel scales
        LowLatencyDispatchOutputs out;
        out.recv_x = TensorView::contiguous(device_alloc<__nv_bfloat16>(static_cast<size_t>(EL) * RT * H), DType::kBF16,
                                            {EL, RT, H}, rank);
        out.recv_count = TensorView::contiguous(device_alloc<int32_t>(EL), DType::kI32, {EL}, rank);
        out.src_info =
            TensorView::contiguous(device_alloc<int32_t>(static_cast<size_t>(EL) * RT), DType::kI32, {EL, RT}, rank);
        out.layout_range =
            TensorView::contiguous(device_alloc<int64_t>(static_cast<size_t>(EL) * R), DType::kI64, {EL, R}, rank);
        LowLatencyCombineInputs cin;
        cin.x = out.recv_x;  // identity experts: their outputs are the received rows
        cin.topk_idx = in.topk_idx;
        cin.topk_weights = TensorView::contiguous(w, DType::kF32, {T, K}, rank);
        auto* combined = device_alloc<__nv_bfloat16>(static_cast<size_t>(T) * H);
        const TensorView combined_view = TensorView::contiguous(combined, DType::kBF16, {T, H}, rank);
        LowLatencyHandle handle;
        const auto step = [&] {
          buffer.low_latency_dispatch(in, out, handle, /*return_recv_hook=*/false, order);
          buffer.low_latency_combine(cin, handle, combined_view, /*return_recv_hook=*/false, order);
        };

        // One eager step.
        step();
        check(cudaStreamSynchronize(stream), "sync");
        int bad = count_mismatches(combined, x_host, topk_host, w_host, T, H, K);

        // The same step in a CUDA graph (one dispatch + its combine per replay), replayed.
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
        step();
        check(cudaStreamEndCapture(stream, &graph), "end capture");
        check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
        check(cudaMemsetAsync(combined, 0, sizeof(__nv_bfloat16) * T * H, stream), "memset");
        cudaEvent_t start, stop;
        check(cudaEventCreate(&start), "event");
        check(cudaEventCreate(&stop), "event");
        check(cudaEventRecord(start, stream), "record");
        for (int i = 0; i < replays; ++i) check(cudaGraphLaunch(exec, stream), "replay");
        check(cudaEventRecord(stop, stream), "record");
        check(cudaStreamSynchronize(stream), "sync");
        float ms = 0.f;
        check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
        bad += count_mismatches(combined, x_host, topk_host, w_host, T, H, K);
        std::printf("rank %d: %d tokens, dispatch + combine %s; graph replay %.1f us per step (%d replays)\n", rank, T,
                    bad ? "MISMATCHES" : "== sum of weight * x", 1e3 * ms / (replays > 0 ? replays : 1), replays);
        cudaEventDestroy(start);
        cudaEventDestroy(stop);
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        return bad == 0;
      });
}
