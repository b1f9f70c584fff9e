// A rank that stops answering: the others fail within the timeout with a message naming the peer,
// and after Buffer::reset() every rank carries on with correct results. Also a buffer running out
// of call numbers.
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <thread>
#include <random>
#include <string>

#include "epcomm/error.hpp"
#include "harness.hpp"
#include "kernels/common/control.hpp"

namespace epcomm::test {
namespace {

constexpr int kT = 200, kH = 512, kK = 4, kE = 16;

struct Round {
  DeviceTensor x, topk, per_rank, per_expert, in_rank, prefix, chunk_off;
  std::vector<uint16_t> x_host;
  DispatchInputs in;
  DispatchHandle handle;
};

// Inputs of one rank: small integers, so combine(dispatch(x)) == x * destinations exactly.
Round make_round(Buffer& buf, int rank, int dev, uint64_t seed) {
  Round r;
  const int R = buf.num_ranks();
  std::mt19937_64 rng(seed + rank);
  r.x_host.resize(static_cast<size_t>(kT) * kH);
  for (auto& v : r.x_host) v = ref::float_to_bf16(static_cast<float>(static_cast<int>(rng() % 9) - 4));
  r.x = DeviceTensor(DType::kBF16, {kT, kH}, dev);
  r.x.upload(r.x_host);
  r.topk = DeviceTensor(DType::kI64, {kT, kK}, dev);
  r.topk.upload(random_topk(rng, kT, RoutingSpec{kE, kK, false, 0.0}));
  r.per_rank = DeviceTensor(DType::kI32, {R}, dev);
  r.per_expert = DeviceTensor(DType::kI32, {kE}, dev);
  r.in_rank = DeviceTensor(DType::kBool, {kT, R}, dev);
  const Config cfg = Config::dispatch_default(R);
  r.prefix = DeviceTensor(DType::kI32, {R, R}, dev);
  r.chunk_off = DeviceTensor(DType::kI32, {R, buf.chunk_offset_stride(cfg)}, dev);
  r.in.x = r.x.view();
  r.in.topk_idx = r.topk.view();
  r.in.num_tokens_per_rank = r.per_rank.view();
  r.in.is_token_in_rank = r.in_rank.view();
  r.in.num_tokens_per_expert = r.per_expert.view();
  r.in.config = cfg;
  r.in.config.num_sms = test_num_sms(R, 4);
  r.handle.rank_prefix_matrix = r.prefix.view();
  r.handle.chunk_offset = r.chunk_off.view();
  return r;
}

void run_layout(Buffer& buf, Round& r, const StreamOrder& order) {
  buf.get_dispatch_layout(r.topk.view(), kE, {r.per_rank.view(), std::nullopt, r.per_expert.view(), r.in_rank.view()},
                          order);
}

// The options of these tests' buffers: room for the rounds, a short timeout, a borrowed comm stream
// where given.
BufferOptions test_options(int64_t timeout_ms, cudaStream_t comm = nullptr) {
  BufferOptions bo;
  bo.num_nvl_bytes = 64 << 20;
  bo.timeout_ms = timeout_ms;
  bo.comm_stream = comm;
  return bo;
}

// A buffer with a short timeout and a stream of this rank's own, for fn.
void with_buffer(const std::shared_ptr<Group>& group, int64_t timeout_ms,
                 const std::function<void(Buffer&, cudaStream_t)>& fn, uint32_t first_call_number = 0) {
  BufferOptions bo = test_options(timeout_ms);
  bo.first_call_number = first_call_number;
  Buffer buf(group, bo);
  cudaStream_t stream;
  cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  fn(buf, stream);
  cudaStreamDestroy(stream);
}

// A full dispatch + identity combine, checked exactly.
void good_round(Buffer& buf, int rank, int dev, cudaStream_t stream, uint64_t seed) {
  Round r = make_round(buf, rank, dev, seed);
  const StreamOrder order{stream, nullptr, false};
  run_layout(buf, r, order);
  const DispatchPlan plan = buf.dispatch_prepare(r.in, r.handle, std::nullopt, order);
  DeviceTensor recv(DType::kBF16, {plan.num_rows, kH}, dev), ridx(DType::kI64, {plan.num_rows, kK}, dev);
  DeviceTensor src(DType::kI32, {plan.num_rows}, dev), out(DType::kBF16, {kT, kH}, dev);
  r.handle.recv_src_idx = src.view();
  DispatchOutputs dout;
  dout.recv_x = recv.view();
  dout.recv_topk_idx = ridx.view();
  buf.dispatch_run(r.in, plan, r.handle, dout, order);
  CombineInputs ci;
  ci.x = recv.view();
  ci.config = Config::combine_default(buf.num_ranks());
  ci.config.num_sms = r.in.config.num_sms;
  buf.combine(ci, r.handle, {out.view(), std::nullopt}, order);
  cuda_ok(cudaStreamSynchronize(stream), "sync");
  const auto got = out.download<uint16_t>();
  const auto dests = r.in_rank.download<uint8_t>();
  const int R = buf.num_ranks();
  for (int t = 0; t < kT; ++t) {
    int n = 0;
    for (int j = 0; j < R; ++j) n += dests[static_cast<size_t>(t) * R + j];
    for (int h = 0; h < kH; ++h) {
      const size_t i = static_cast<size_t>(t) * kH + h;
      ASSERT_EQ(ref::bf16_to_float(got[i]), ref::bf16_to_float(r.x_host[i]) * n) << "rank " << rank << " token " << t;
    }
  }
}

TEST(ReliabilityGpu, StalledPeerInCountExchangeThenReset) {
  const uint64_t seed = std::random_device{}();
  run_ranks(2, [&](int rank, std::shared_ptr<Group> group) {
    with_buffer(group, 1000, [&](Buffer& buf, cudaStream_t stream) {
      good_round(buf, rank, group->device(), stream, seed);
      if (rank != 0) {  // rank 0 never makes this call
        Round r = make_round(buf, rank, group->device(), seed + 1);
        const StreamOrder order{stream, nullptr, false};
        run_layout(buf, r, order);
        expect_error<TimeoutError>([&] { buf.dispatch_prepare(r.in, r.handle, std::nullopt, order); },
                                   {"peer 0", "notify_dispatch"});
      }
      buf.reset();
      good_round(buf, rank, group->device(), stream, seed + 2);
    });
  });
}

// A rank that comes to reset() while another is at a different collective step (here the group's
// own barrier, as a harness that lost count would make) is refused on both with the same error
// naming both steps, instead of pairing them; a reset on every rank then recovers, exactly.
TEST(ReliabilityGpu, ResetMeetingAnotherStepIsRefusedThenResetRecovers) {
  const uint64_t seed = std::random_device{}();
  run_ranks(2, [&](int rank, std::shared_ptr<Group> group) {
    with_buffer(group, 1000, [&](Buffer& buf, cudaStream_t stream) {
      good_round(buf, rank, group->device(), stream, seed);
      expect_error<RuntimeFailure>(
          [&] {
            if (rank == 0) buf.reset();
            else group->barrier("the caller's own step");
          },
          {"rank 0 at 'Buffer::reset (before clearing)'", "rank 1 at 'the caller's own step'"},
          "rank " + std::to_string(rank) + " (the steps must not pair)");
      buf.reset();
      good_round(buf, rank, group->device(), stream, seed + 1);
    });
  });
}

// Holds `stream` for `seconds` (a host function that sleeps): a comm stream that does not finish,
// as one with a kernel stuck where epcomm cannot bound its wait (NCCL GIN's put on queue credits).
void hold_stream(cudaStream_t stream, double seconds) {
  static double held;
  held = seconds;
  cuda_ok(cudaLaunchHostFunc(
              stream, [](void*) { std::this_thread::sleep_for(std::chrono::duration<double>(held)); }, nullptr),
          "cudaLaunchHostFunc");
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A comm stream that does not finish is a RuntimeFailure naming it after 4 x the timeout + 1 s
// (1.8 s here), not a hang: in reset(), and in a Buffer's destruction, which then returns and
// leaves the memory allocated. Once the stream finishes, reset() recovers, exactly.
TEST(ReliabilityGpu, StuckCommStreamIsAnErrorNotAHang) {
  const uint64_t seed = std::random_device{}();
  run_ranks(1, [&](int rank, std::shared_ptr<Group> group) {
    cudaStream_t comm, caller;
    cuda_ok(cudaStreamCreateWithFlags(&comm, cudaStreamNonBlocking), "stream");
    cuda_ok(cudaStreamCreateWithFlags(&caller, cudaStreamNonBlocking), "stream");
    const BufferOptions bo = test_options(200, comm);
    auto t0 = std::chrono::steady_clock::now();
    {
      Buffer buf(group, bo);
      good_round(buf, rank, group->device(), caller, seed);
      hold_stream(comm, 4.0);
      t0 = std::chrono::steady_clock::now();
      expect_error<RuntimeFailure>([&] { buf.reset(); }, {"communication stream still runs after 1800 ms"},
                                   "reset while the comm stream is held");
      const double waited = seconds_since(t0);
      EXPECT_GE(waited, 1.7);
      EXPECT_LT(waited, 3.5);
      cuda_ok(cudaStreamSynchronize(comm), "the held stream");
      buf.reset();
      good_round(buf, rank, group->device(), caller, seed + 1);
      hold_stream(comm, 4.0);
      t0 = std::chrono::steady_clock::now();
    }  // the destructor gives up on the held stream after the bound
    const double destroyed = seconds_since(t0);
    EXPECT_GE(destroyed, 1.7);
    EXPECT_LT(destroyed, 3.5);
    cuda_ok(cudaStreamSynchronize(comm), "the held stream");
    cudaStreamDestroy(comm);
    cudaStreamDestroy(caller);
  });
}

// The last call numbers of a buffer give exact results; past them the count exchange does not run
// and dispatch raises a RuntimeFailure saying why (flags left by calls with high numbers must never
// pass for a number that came round again); Buffer::reset starts the numbers again.
TEST(ReliabilityGpu, CallNumbersRunOutThenReset) {
  const uint64_t seed = std::random_device{}();
  run_ranks(2, [&](int rank, std::shared_ptr<Group> group) {
    // A round takes three numbers (count exchange, dispatch, combine): the first one ends at the last.
    with_buffer(
        group, 5000,
        [&](Buffer& buf, cudaStream_t stream) {
          good_round(buf, rank, group->device(), stream, seed);
          Round r = make_round(buf, rank, group->device(), seed + 1);
          const StreamOrder order{stream, nullptr, false};
          run_layout(buf, r, order);
          expect_error<RuntimeFailure>([&] { buf.dispatch_prepare(r.in, r.handle, std::nullopt, order); },
                                       {"notify_dispatch on rank " + std::to_string(rank) + " did not run",
                                        "call numbers"},
                                       "rank " + std::to_string(rank) + ": a count exchange past the last call number");
          buf.reset();
          good_round(buf, rank, group->device(), stream, seed + 2);
        },
        kLastCallNumber - 3);
  });
}

TEST(ReliabilityGpu, StalledPeerInDataPhaseThenReset) {
  const uint64_t seed = std::random_device{}();
  run_ranks(2, [&](int rank, std::shared_ptr<Group> group) {
    with_buffer(group, 1000, [&](Buffer& buf, cudaStream_t stream) {
      const StreamOrder order{stream, nullptr, false};
      Round r = make_round(buf, rank, group->device(), seed);
      run_layout(buf, r, order);
      const DispatchPlan plan = buf.dispatch_prepare(r.in, r.handle, std::nullopt, order);
      if (rank != 0) {  // rank 0 exchanged counts but never moves its data
        DeviceTensor recv(DType::kBF16, {plan.num_rows, kH}, group->device());
        DeviceTensor ridx(DType::kI64, {plan.num_rows, kK}, group->device());
        DeviceTensor src(DType::kI32, {plan.num_rows}, group->device());
        r.handle.recv_src_idx = src.view();
        DispatchOutputs dout;
        dout.recv_x = recv.view();
        dout.recv_topk_idx = ridx.view();
        buf.dispatch_run(r.in, plan, r.handle, dout, order);
        cuda_ok(cudaStreamSynchronize(stream), "sync");  // the kernel leaves after its timeout
        expect_error<TimeoutError>([&] { buf.check_device_errors(); }, {"peer 0", "dispatch"});
      }
      buf.reset();
      good_round(buf, rank, group->device(), stream, seed + 3);
    });
  });
}

}  // namespace
}  // namespace epcomm::test

namespace epcomm::test {
namespace {

// num_worst_tokens smaller than what arrives: the device drops the extra rows, every rank finishes,
// and the host raises an ArgumentError naming num_worst_tokens; the next call works.
TEST(ReliabilityGpu, TooSmallWorstTokensIsReportedNotOverrun) {
  const uint64_t seed = std::random_device{}();
  run_ranks(2, [&](int rank, std::shared_ptr<Group> group) {
    with_buffer(group, 5000, [&](Buffer& buf, cudaStream_t stream) {
      const StreamOrder order{stream, nullptr, false};
      Round r = make_round(buf, rank, group->device(), seed);
      run_layout(buf, r, order);
      r.in.num_worst_tokens = 8;  // far fewer than the ~kT * 2 rows that arrive
      const DispatchPlan plan = buf.dispatch_prepare(r.in, r.handle, std::nullopt, order);
      ASSERT_EQ(plan.num_rows, 8);
      // Guard rows after the 8 the kernel may write: they must keep their poison.
      DeviceTensor recv(DType::kBF16, {plan.num_rows + 4, kH}, group->device());
      TensorView recv_view = recv.view();
      recv_view.shape[0] = plan.num_rows;
      DeviceTensor ridx(DType::kI64, {plan.num_rows, kK}, group->device()),
          src(DType::kI32, {plan.num_rows}, group->device());
      r.handle.recv_src_idx = src.view();
      DispatchOutputs dout;
      dout.recv_x = recv_view;
      dout.recv_topk_idx = ridx.view();
      buf.dispatch_run(r.in, plan, r.handle, dout, order);
      cuda_ok(cudaStreamSynchronize(stream), "sync");
      expect_error<ArgumentError>([&] { buf.check_device_errors(); }, {"num_worst_tokens"});
      const auto bytes = recv.download<uint8_t>();
      for (size_t i = static_cast<size_t>(plan.num_rows) * kH * 2; i < bytes.size(); ++i)
        ASSERT_EQ(bytes[i], 0xA5) << "byte " << i << " past the rows the caller allocated was written";
      good_round(buf, rank, group->device(), stream, seed + 5);
    });
  });
}

}  // namespace
}  // namespace epcomm::test

namespace epcomm::test {
namespace {

// BufferOptions::comm_stream: the buffer runs on the caller's stream (the Python layer passes one of
// PyTorch's pool) and leaves it alive when it goes, so work recorded on that stream after the
// buffer's end still runs (PyTorch's allocator records events there when it frees tensors of async
// calls). A stream of another device is refused by name.
TEST(ReliabilityGpu, BorrowedCommStreamOutlivesTheBuffer) {
  const uint64_t seed = std::random_device{}();
  run_ranks(2, [&](int rank, std::shared_ptr<Group> group) {
    cudaStream_t comm, stream;
    cuda_ok(cudaSetDevice(group->device()), "device");
    cuda_ok(cudaStreamCreateWithFlags(&comm, cudaStreamNonBlocking), "comm stream");
    cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    {
      Buffer buf(group, test_options(5000, comm));
      EXPECT_EQ(buf.comm_stream(), comm);
      good_round(buf, rank, group->device(), stream, seed);
    }
    cudaEvent_t event;
    cuda_ok(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "event");
    EXPECT_EQ(cudaEventRecord(event, comm), cudaSuccess) << "the buffer destroyed a stream it did not own";
    EXPECT_EQ(cudaStreamSynchronize(comm), cudaSuccess);
    cudaEventDestroy(event);
    cudaStreamDestroy(comm);
    cudaStreamDestroy(stream);
  });
  int devices = 0;
  cuda_ok(cudaGetDeviceCount(&devices), "device count");
  if (devices < 2) return;
  run_ranks(2, [&](int rank, std::shared_ptr<Group> group) {
    const int other = (group->device() + 1) % devices;
    cudaStream_t foreign;
    cuda_ok(cudaSetDevice(other), "device");
    cuda_ok(cudaStreamCreateWithFlags(&foreign, cudaStreamNonBlocking), "stream");
    BufferOptions bo;
    bo.num_nvl_bytes = 1 << 20;
    bo.comm_stream = foreign;
    expect_error<ArgumentError>([&] { Buffer buf(group, bo); }, {"comm_stream"},
                                "rank " + std::to_string(rank) + ": a comm stream of another device");
    cudaStreamDestroy(foreign);
  });
}

}  // namespace
}  // namespace epcomm::test
