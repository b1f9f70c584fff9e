// The ring of chunks of docs/design-scale.md §4 (normal mode across nodes with bounded memory),
// checked on the CPU before its kernels exist: its sizes (core/internode_ring.hpp) against the
// section's figures, and a model of its dispatch protocol under a random scheduler.
//
// The model: every rank's channel-c sender walks its chunks of S tokens in order and, per remote
// destination node m, puts the chunk's rows for m into the ring (c, source rank, m) on the
// forwarder of m with the source's local index, waiting while the ring lacks room; every
// forwarder's channel-c block takes rows from its rings (one per source node) in any order, copies
// each to the destination ranks of its node that the row's local mask names, at the receive row
// the plan gives (source rank, token order), and frees the slot. Tokens for the sender's own node
// go straight over NVLink. A random scheduler runs whichever actor can move. Checked: no slot is
// written before it was freed, no slot is read before it was written, no state where nothing can
// move before the end (deadlock), and every (token, destination rank) lands exactly once, where the
// per-token definition puts it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/internode_ring.hpp"

namespace epcomm {
namespace {

using ring::InternodeRingGeometry;

constexpr double kMiB = 1024.0 * 1024.0;

// DeepSeek's prefill shape (hidden 7168 BF16, top-8, 56 scale words) at 24 SMs: the section's
// table says about 336 MiB from 2 to 33 nodes and 410 at 40, against DeepEP's hint growing with
// the nodes; and the data part stops growing with the nodes once every peer is at its floor.
TEST(InternodeRing, SizesFollowTheSection) {
  EXPECT_EQ(InternodeRingGeometry::make(24, 1, 7168, 2, 8, 56).total_bytes, 0u);  // one node: no rings
  for (int N : {2, 3, 5, 9, 17, 33}) {
    const InternodeRingGeometry g = InternodeRingGeometry::make(24, N, 7168, 2, 8, 56);
    SCOPED_TRACE("N=" + std::to_string(N));
    EXPECT_EQ(g.channels, 12);
    EXPECT_EQ(g.slot_bytes, 28704u);                          // the combine partial (float32 row) is the larger slot
    EXPECT_LE(static_cast<size_t>(g.peers) * g.depth, 512u);  // the budget B shared by the peers
    EXPECT_GE(g.depth, 2 * g.chunk);
    EXPECT_EQ(g.depth % g.chunk, 0);
    EXPECT_NEAR(g.total_bytes / kMiB, 336.4, 1.0);
  }
  const InternodeRingGeometry g40 = InternodeRingGeometry::make(24, 40, 7168, 2, 8, 56);
  EXPECT_EQ(g40.depth, 16);  // every peer at its floor of two chunks
  EXPECT_NEAR(g40.total_bytes / kMiB, 410.0, 1.0);
  // Past the floor, each further node adds exactly its two chunks per channel and direction.
  const InternodeRingGeometry g41 = InternodeRingGeometry::make(24, 41, 7168, 2, 8, 56);
  EXPECT_EQ(g41.total_bytes - g40.total_bytes, 2u * 12 * 16 * 28704 + 12 * 4 * 16);
}

struct Model {
  int N, P, R, S, channels, depth;
  std::vector<int> tokens;                           // [rank]
  std::vector<std::vector<std::vector<int>>> dests;  // [rank][token]: destination ranks (distinct, ascending)
};

Model make_model(std::mt19937_64& rng, int N, int P, int channels, int depth, int max_tokens, int K, bool skew) {
  Model m{N, P, N * P, 8, channels, depth, {}, {}};
  const int EL = 3, E = EL * m.R;
  std::uniform_int_distribution<int> tok(0, max_tokens), ex(0, E - 1), hot(0, EL * P - 1);
  std::bernoulli_distribution drop(0.1);
  m.tokens.resize(m.R);
  m.dests.resize(m.R);
  for (int s = 0; s < m.R; ++s) {
    m.tokens[s] = s % P == 0 ? max_tokens : tok(rng);  // every node's first rank: the most
    for (int t = 0; t < m.tokens[s]; ++t) {
      std::vector<int> d;
      for (int k = 0; k < K; ++k) {
        if (drop(rng)) continue;
        const int e = skew ? hot(rng) : ex(rng);  // skew: every token to node 0's experts
        d.push_back(e / EL);
      }
      std::sort(d.begin(), d.end());
      d.erase(std::unique(d.begin(), d.end()), d.end());
      m.dests[s].push_back(d);
    }
  }
  return m;
}

// One row in flight: which token, and the ranks of the destination node it goes to.
struct Row {
  int src = -1, token = -1;
  uint64_t local_mask = 0;
  int64_t seq = -1;  // the ring position it was written at (a stale or overwritten slot shows)
};

struct Ring {
  std::vector<Row> slots;
  std::vector<bool> full;
  int64_t head = 0, tail = 0;  // freed / written
};

// Runs the model; returns "" or the first problem.
std::string run_model(const Model& m, std::mt19937_64& rng) {
  const int N = m.N, P = m.P, R = m.R, S = m.S, C = m.channels;
  // The receive plan: destination rank d's rows in (source rank, token) order.
  std::vector<std::map<std::pair<int, int>, int>> want(R);
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < m.tokens[s]; ++t)
      for (int d : m.dests[s][t]) {
        const int at = static_cast<int>(want[d].size());
        want[d][{s, t}] = at;  // (s, t) ascending: map order is the plan's order
      }
  for (auto& w : want) {
    int i = 0;
    for (auto& [key, at] : w) at = i++;
  }
  std::string problem;
  std::vector<std::vector<int>> landed(R);
  for (int d = 0; d < R; ++d) landed[d].assign(want[d].size(), 0);
  auto land = [&](int d, int s, int t) -> std::string {
    auto it = want[d].find({s, t});
    if (it == want[d].end())
      return "rank " + std::to_string(d) + " got token " + std::to_string(t) + " of " + std::to_string(s) + " unasked";
    if (++landed[d][it->second] != 1) return "a row landed twice on rank " + std::to_string(d);
    return "";
  };
  // Rings: [channel][source rank][destination node] (unused where the node is the source's own).
  std::vector<Ring> rings(static_cast<size_t>(C) * R * N);
  auto ring_of = [&](int c, int s, int node) -> Ring& { return rings[(static_cast<size_t>(c) * R + s) * N + node]; };
  for (Ring& r : rings) {
    r.slots.resize(m.depth);
    r.full.assign(m.depth, false);
  }
  // Senders: (channel, rank) -> position (chunk index, next destination node).
  struct Sender {
    int c, s, begin, end, next_token, next_node;
    bool done;
  };
  std::vector<Sender> senders;
  for (int s = 0; s < R; ++s)
    for (int c = 0; c < C; ++c) {
      const int b = static_cast<int>(static_cast<int64_t>(m.tokens[s]) * c / C);
      const int e = static_cast<int>(static_cast<int64_t>(m.tokens[s]) * (c + 1) / C);
      senders.push_back({c, s, b, e, b, 0, b >= e});
    }
  auto rows_for = [&](int s, int first, int last, int node) {
    std::vector<Row> rows;
    for (int t = first; t < last; ++t) {
      uint64_t mask = 0;
      for (int d : m.dests[s][t])
        if (d / P == node) mask |= 1ull << (d % P);
      if (mask) rows.push_back({s, t, mask, -1});
    }
    return rows;
  };
  // Moves sender x one step (a chunk's rows for one node): 0 moved, 1 must wait, 2 a problem.
  auto step_sender = [&](Sender& x) -> int {
    const int last = std::min(x.next_token + S, x.end), own = x.s / P;
    if (x.next_node == own) {  // own node: NVLink, straight to the destination ranks
      for (int t = x.next_token; t < last; ++t)
        for (int d : m.dests[x.s][t])
          if (d / P == own) {
            problem = land(d, x.s, t);
            if (!problem.empty()) return 2;
          }
    } else {
      Ring& r = ring_of(x.c, x.s, x.next_node);
      std::vector<Row> rows = rows_for(x.s, x.next_token, last, x.next_node);
      if (r.tail - r.head + static_cast<int64_t>(rows.size()) > m.depth) return 1;  // no room yet
      for (Row& row : rows) {
        const int slot = static_cast<int>(r.tail % m.depth);
        if (r.full[slot]) {
          problem = "sender overwrote an unfreed slot";
          return 2;
        }
        row.seq = r.tail++;
        r.slots[slot] = row;
        r.full[slot] = true;
      }
    }
    if (++x.next_node == N) {
      x.next_node = 0;
      x.next_token = last;
      x.done = x.next_token >= x.end;
    }
    return 0;
  };
  // Forwarder (channel c, rank f = (node, local)): its rings are those of sources (n, local), n != node.
  auto forwarder_rings = [&](int c, int f) {
    std::vector<Ring*> rs;
    for (int n = 0; n < N; ++n)
      if (n != f / P) rs.push_back(&ring_of(c, n * P + f % P, f / P));
    return rs;
  };
  for (int64_t moves = 0;; ++moves) {
    std::vector<int> runnable_senders, runnable_forwarders;
    bool all_done = true;
    for (size_t i = 0; i < senders.size(); ++i)
      if (!senders[i].done) {
        all_done = false;
        runnable_senders.push_back(static_cast<int>(i));  // may still have to wait: tried below
      }
    for (int c = 0; c < C; ++c)
      for (int f = 0; f < R; ++f)
        for (Ring* r : forwarder_rings(c, f))
          if (r->tail > r->head) {
            runnable_forwarders.push_back(c * R + f);
            all_done = false;
            break;
          }
    if (all_done) break;
    // Try actors in random order until one moves.
    std::vector<int> order;
    for (int i : runnable_senders) order.push_back(i);
    for (int i : runnable_forwarders) order.push_back(-1 - i);
    std::shuffle(order.begin(), order.end(), rng);
    bool moved = false;
    for (int a : order) {
      if (a >= 0) {
        const int res = step_sender(senders[a]);
        if (res == 1) continue;
        if (res == 2) return problem;
        moved = true;
        break;
      }
      const int c = (-1 - a) / R, f = (-1 - a) % R;
      std::vector<Ring*> rs;
      for (Ring* r : forwarder_rings(c, f))
        if (r->tail > r->head) rs.push_back(r);
      Ring& r = *rs[std::uniform_int_distribution<size_t>(0, rs.size() - 1)(rng)];
      const int slot = static_cast<int>(r.head % m.depth);
      if (!r.full[slot] || r.slots[slot].seq != r.head) return "forwarder read a slot not written for it";
      const Row row = r.slots[slot];
      for (int l = 0; l < P; ++l)
        if (row.local_mask >> l & 1) {
          problem = land((f / P) * P + l, row.src, row.token);
          if (!problem.empty()) return problem;
        }
      r.full[slot] = false;
      ++r.head;
      moved = true;
      break;
    }
    if (!moved) return "deadlock after " + std::to_string(moves) + " moves: no actor can move";
  }
  for (int d = 0; d < R; ++d)
    for (size_t i = 0; i < landed[d].size(); ++i)
      if (landed[d][i] != 1) return "rank " + std::to_string(d) + " row " + std::to_string(i) + " never landed";
  return "";
}

TEST(InternodeRing, DispatchProtocolModelUnderARandomScheduler) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  struct Shape {
    int N, P, channels, max_tokens, K;
    bool skew;
  };
  for (const Shape sh : {Shape{2, 1, 1, 40, 4, false}, Shape{2, 4, 2, 64, 8, false}, Shape{3, 2, 3, 50, 8, true},
                         Shape{5, 2, 2, 33, 6, false}, Shape{4, 8, 2, 24, 8, true}, Shape{9, 1, 1, 70, 8, true}}) {
    for (int budget : {16, 64, 512}) {
      // The section's depth for this budget (its floor is two chunks).
      const int depth = InternodeRingGeometry::make(2 * sh.channels, sh.N, 128, 2, sh.K, 1, 8, budget).depth;
      const Model m = make_model(rng, sh.N, sh.P, sh.channels, depth, sh.max_tokens, sh.K, sh.skew);
      SCOPED_TRACE("N=" + std::to_string(sh.N) + " P=" + std::to_string(sh.P) + " channels=" +
                   std::to_string(sh.channels) + " depth=" + std::to_string(depth) + (sh.skew ? " skewed" : ""));
      EXPECT_EQ(run_model(m, rng), "");
    }
  }
}

// The model can fail: a ring shallower than a chunk's rows for one node can never take them.
TEST(InternodeRing, ModelCatchesARingShallowerThanAChunk) {
  std::mt19937_64 rng(7);
  const Model m = make_model(rng, 2, 2, 1, 4, 64, 8, true);  // depth 4 < S = 8; node 1 sends to node 0
  const std::string got = run_model(m, rng);
  EXPECT_NE(got.find("deadlock"), std::string::npos) << got;
}

}  // namespace
}  // namespace epcomm
