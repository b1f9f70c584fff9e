// epcomm from C++ without Python or PyTorch: one thread per GPU, a communicator epcomm creates
// from an ncclUniqueId, then layout -> dispatch -> (identity experts) -> combine, and a check that
// combine(dispatch(x)) == x * (number of ranks each token went to).
//
//   ./epcomm_example [tokens] [hidden]
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <random>
#include <vector>

#include "epcomm/buffer.hpp"
#include "example_util.hpp"

using example::check;
using example::device_alloc;

int main(int argc, char** argv) {
  const int T = argc > 1 ? std::atoi(argv[1]) : 512;
  const int H = argc > 2 ? std::atoi(argv[2]) : 2048;
  const int K = 4, E = 64;
  return example::run_on_every_gpu(
      "epcomm_example: no CUDA device; this example needs GPUs (the CPU reference backend is epcomm::ref::HostCluster)",
      [&](int rank, int R, std::shared_ptr<epcomm::Group> group) {
        using namespace epcomm;
        const Config dcfg = Config::dispatch_default(R), ccfg = Config::combine_default(R);
        BufferOptions opts;
        opts.num_nvl_bytes = std::max(dcfg.get_nvl_buffer_size_hint(H * 2, R), ccfg.get_nvl_buffer_size_hint(H * 2, R));
        Buffer buffer(group, opts);
        cudaStream_t stream;
        check(cudaStreamCreate(&stream), "stream");
        const StreamOrder order{stream, nullptr, false};

        // Inputs: small integers (exact sums), random distinct experts per token.
        std::mt19937 rng(1234 + rank);
        std::vector<__nv_bfloat16> x_host(static_cast<size_t>(T) * H);
        for (auto& v : x_host) v = __float2bfloat16(static_cast<float>(rng() % 7) - 3.f);
        std::vector<int64_t> topk_host(static_cast<size_t>(T) * K);
        for (int t = 0; t < T; ++t)
          for (int k = 0; k < K; ++k) topk_host[t * K + k] = (t * 7 + k * 13 + rank) % E;
        auto* x = example::device_copy(x_host);
        auto* topk = example::device_copy(topk_host);

        // Layout.
        auto* per_rank = device_alloc<int32_t>(R);
        auto* per_expert = device_alloc<int32_t>(E);
        auto* in_rank = device_alloc<bool>(static_cast<size_t>(T) * R);
        LayoutOutputs layout{TensorView::contiguous(per_rank, DType::kI32, {R}, rank), std::nullopt,
                             TensorView::contiguous(per_expert, DType::kI32, {E}, rank),
                             TensorView::contiguous(in_rank, DType::kBool, {T, R}, rank)};
        const TensorView topk_view = TensorView::contiguous(topk, DType::kI64, {T, K}, rank);
        buffer.get_dispatch_layout(topk_view, E, layout, order);

        // Dispatch: counts first (host learns the row count), then the data.
        DispatchInputs in;
        in.x = TensorView::contiguous(x, DType::kBF16, {T, H}, rank);
        in.topk_idx = topk_view;
        in.num_tokens_per_rank = layout.num_tokens_per_rank;
        in.is_token_in_rank = layout.is_token_in_rank;
        in.num_tokens_per_expert = layout.num_tokens_per_expert;
        in.config = dcfg;
        const int stride = buffer.chunk_offset_stride(dcfg);
        DispatchHandle handle;
        handle.rank_prefix_matrix = TensorView::contiguous(device_alloc<int32_t>(R * R), DType::kI32, {R, R}, rank);
        handle.chunk_offset = TensorView::contiguous(device_alloc<int32_t>(R * stride), DType::kI32, {R, stride}, rank);
        const DispatchPlan plan = buffer.dispatch_prepare(in, handle, std::nullopt, order);
        const int rows = plan.num_rows;
        auto* recv_x = device_alloc<__nv_bfloat16>(static_cast<size_t>(rows) * H);
        auto* recv_idx = device_alloc<int64_t>(static_cast<size_t>(rows) * K);
        handle.recv_src_idx = TensorView::contiguous(device_alloc<int32_t>(rows), DType::kI32, {rows}, rank);
        DispatchOutputs out;
        out.recv_x = TensorView::contiguous(recv_x, DType::kBF16, {rows, H}, rank);
        out.recv_topk_idx = TensorView::contiguous(recv_idx, DType::kI64, {rows, K}, rank);
        buffer.dispatch_run(in, plan, handle, out, order);

        // Identity experts, then combine back.
        auto* combined = device_alloc<__nv_bfloat16>(static_cast<size_t>(T) * H);
        CombineInputs cin;
        cin.x = out.recv_x;
        cin.config = ccfg;
        CombineOutputs cout{TensorView::contiguous(combined, DType::kBF16, {T, H}, rank), std::nullopt};
        buffer.combine(cin, handle, cout, order);
        check(cudaStreamSynchronize(stream), "sync");

        std::vector<__nv_bfloat16> got(static_cast<size_t>(T) * H);
        std::vector<uint8_t> dests(static_cast<size_t>(T) * R);
        check(cudaMemcpy(got.data(), combined, sizeof(__nv_bfloat16) * got.size(), cudaMemcpyDeviceToHost), "copy");
        check(cudaMemcpy(dests.data(), in_rank, dests.size(), cudaMemcpyDeviceToHost), "copy");
        int bad = 0;
        for (int t = 0; t < T; ++t) {
          int n = 0;
          for (int r = 0; r < R; ++r) n += dests[static_cast<size_t>(t) * R + r];
          for (int h = 0; h < H; ++h)
            bad += __bfloat162float(got[static_cast<size_t>(t) * H + h]) !=
                   __bfloat162float(x_host[static_cast<size_t>(t) * H + h]) * n;
        }
        std::printf("rank %d: received %d rows, combine(dispatch(x)) %s\n", rank, rows,
                    bad ? "MISMATCHES" : "== x * destinations");
        return bad == 0;
      });
}
