// Low-latency mode's per-rank paths (EPCOMM_LL_PER_RANK / BufferOptions::low_latency_per_rank):
// which level a buffer uses, where the layout allows each path, and the combine's partial formats.
// Host and device; tested on the host (tests/cpu/test_low_latency_per_rank.cpp).
#pragma once

#include <cstdint>

#include "kernels/common/control.hpp"
#include "kernels/low_latency/region_layout.hpp"

namespace epcomm {

// The low-latency paths' level: BufferOptions::low_latency_per_rank per buffer, whose default (-1)
// is EPCOMM_LL_PER_RANK (core/env.cpp; read once per process, on the host; default 4). 0 keeps the
// per-expert dispatch, 1 asks for the per-rank dispatch (same outputs bit for bit), 2 also for the
// per-rank combine with BF16 partials, 3 with fine partials, 4 with float32 partials (none is
// bit-identical to the per-expert sum; combine_per_rank.cu gives their error bounds). A call uses them only
// where the layout and shared memory allow.
int low_latency_per_rank_level();  // the environment's level
constexpr int kLowLatencyPerRankMaxLevel = 4;
// The level a buffer uses: its option (0..4) where set, else the environment's (`from_env`).
inline int low_latency_per_rank_choice(int option, int from_env) { return option >= 0 ? option : from_env; }

// What the expert rank returns to an origin in the combine of a per-rank dispatch.
enum class LowLatencyPartials : int {
  kNone = 0,  // per-expert rows (bit-exact)
  kBf16 = 1,  // one BF16 partial per (token, destination rank)
  kFine = 2,  // per (token, destination rank): the BF16 row itself when one expert of the rank was
              // selected, else the float32 partial rounded to 16 significant bits (24-bit float)
  kF32 = 3,   // the same with the float32 partial as it is (only float32 reordering)
};
// Bytes per element of a partial's row (the single-expert rows are BF16 in every kind).
EPCOMM_HD constexpr int partial_bytes(LowLatencyPartials k) {
  return k == LowLatencyPartials::kF32 ? 4 : k == LowLatencyPartials::kFine ? 3 : 2;
}
// A fine partial's rounding: float32 bits rounded to nearest at 16 significant bits (ties away
// from zero; a carry moves into the exponent, so it stays nearest), low 8 bits zero. Inf stays Inf
// (and a finite value within half a unit of the largest rounds to it); NaN becomes the canonical
// NaN, whose payload could sit in the dropped bits.
EPCOMM_HD inline uint32_t fine_round_bits(uint32_t bits) {
  if ((bits & 0x7f800000u) != 0x7f800000u) return (bits + 0x80u) & 0xffffff00u;
  return (bits & 0x007fffffu) != 0u ? 0x7fc00000u : bits;
}

inline LowLatencyPartials low_latency_partials(const LowLatencyLayout& l, int level) {
  if (level < 2 || !l.per_rank_combine_fits()) return LowLatencyPartials::kNone;
  if (level == 2) return LowLatencyPartials::kBf16;
  const LowLatencyPartials k = level == 3 ? LowLatencyPartials::kFine : LowLatencyPartials::kF32;
  return l.pr_wide_fits(partial_bytes(k)) ? k : LowLatencyPartials::kNone;
}

// The per-rank dispatch where it is asked for and the layout allows it (entries carry the local
// expert in 16 bits); the library also needs its shared memory to fit (every test and bench shape
// does), and the combine of such a dispatch returns low_latency_partials(l, level).
// (Its send holds a token's destination ranks in 32 bits: groups of up to 32 ranks.)
inline bool low_latency_per_rank_wanted(const LowLatencyLayout& l, bool use_fp8, int level) {
  return level >= 1 && l.num_ranks <= 32 && l.per_rank_fits(use_fp8) && l.local_experts <= 0xffff;
}

// What the tests and the bench check a per-rank combine against, relative to sum_k |w_k y_k|: each
// kind's bound (combine_per_rank.cu) with slack, and the kind's name in their messages.
inline float low_latency_partials_tolerance(LowLatencyPartials k) {
  return k == LowLatencyPartials::kF32    ? 1.0f / 262144.0f
         : k == LowLatencyPartials::kFine ? 1.0f / 16384.0f
                                          : 1.0f / 256.0f;
}
inline const char* low_latency_partials_name(LowLatencyPartials k) {
  return k == LowLatencyPartials::kF32 ? "float32" : k == LowLatencyPartials::kFine ? "fine" : "BF16";
}

}  // namespace epcomm
