// CPU driver shared by the scan and loss kernels: runs a sequential per-segment scan, in
// parallel over segments, or — when there are too few segments to keep the threads busy (one
// 128k-token sequence) — as a blocked two-pass scan: per-block totals in parallel, a short
// serial carry pass, then every block scanned from its carry in parallel. Accumulation is
// float64 throughout, which also bounds the error of long float32 scans.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ctpo/layout.h"

namespace ctpo {

constexpr int64_t kCpuBlock = 8192;

struct Carry {
  double sum = 0.0;
  double count = 0.0;
};

inline void segment_bounds(const SegmentLayout& L, int64_t seg, int64_t* begin, int64_t* end) {
  if (L.cu != nullptr) {
    *begin = L.cu[seg];
    *end = L.cu[seg + 1];
  } else {
    *begin = seg * L.row_len;
    *end = *begin + L.row_len;
  }
}

// Validates packed offsets on the host: starts at 0, non-decreasing, ends within the tensor.
inline void check_cu_seqlens_cpu(const SegmentLayout& L, const char* what) {
  if (L.cu == nullptr) return;
  TORCH_CHECK(L.cu[0] == 0, what, ": cu_seqlens[0] must be 0, got ", L.cu[0]);
  for (int64_t i = 0; i < L.num_segments; ++i) {
    TORCH_CHECK(L.cu[i + 1] >= L.cu[i], what, ": cu_seqlens must be non-decreasing, but cu_seqlens[",
                i + 1, "] = ", L.cu[i + 1], " < cu_seqlens[", i, "] = ", L.cu[i]);
  }
  TORCH_CHECK(L.cu[L.num_segments] <= L.num_tokens, what, ": cu_seqlens[-1] = ", L.cu[L.num_segments],
              " exceeds the ", L.num_tokens, " packed tokens");
}

// Whether run_segments scans each segment whole on one thread (else it splits segments into
// blocks: too few segments to keep the threads busy, e.g. one 128k-token sequence).
inline bool scans_whole_segments(const SegmentLayout& L) {
  const int64_t threads = at::get_num_threads();
  return threads <= 1 || L.num_segments >= 2 * threads || L.num_tokens <= kCpuBlock;
}

// total(begin, end, reverse) -> Carry of one span; scan(seg, begin, end, carry_in) scans a span
// (in the direction the caller chose) starting from carry_in.
template <typename TotalFn, typename ScanFn>
void run_segments(const SegmentLayout& L, const double* carry_sum, const double* carry_count,
                  bool reverse, const TotalFn& total, const ScanFn& scan) {
  const int64_t nseg = L.num_segments;
  auto carry_of = [&](int64_t seg) {
    Carry c;
    if (carry_sum != nullptr) c.sum = carry_sum[seg];
    if (carry_count != nullptr) c.count = carry_count[seg];
    return c;
  };
  if (scans_whole_segments(L)) {
    // Each task gets about kCpuBlock tokens: waking threads for a few hundred tokens costs
    // more than scanning them (a [16, 60] batch ran 5x slower on 2 threads than on 1).
    const int64_t grain = std::max<int64_t>(1, kCpuBlock * nseg / std::max<int64_t>(L.num_tokens, 1));
    at::parallel_for(0, nseg, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t seg = lo; seg < hi; ++seg) {
        int64_t b, e;
        segment_bounds(L, seg, &b, &e);
        scan(seg, b, e, carry_of(seg));
      }
    });
    return;
  }
  struct Span {
    int64_t seg, begin, end;
  };
  std::vector<Span> spans;
  for (int64_t seg = 0; seg < nseg; ++seg) {
    int64_t b, e;
    segment_bounds(L, seg, &b, &e);
    for (int64_t s = b; s < e; s += kCpuBlock) spans.push_back({seg, s, std::min(e, s + kCpuBlock)});
  }
  const int64_t nspan = static_cast<int64_t>(spans.size());
  std::vector<Carry> totals(nspan), carries(nspan);
  at::parallel_for(0, nspan, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) totals[i] = total(spans[i].begin, spans[i].end);
  });
  // Spans of one segment are contiguous in `spans`; carry runs along the scan direction.
  for (int64_t i = 0; i < nspan;) {
    int64_t j = i;
    while (j < nspan && spans[j].seg == spans[i].seg) ++j;
    Carry run = carry_of(spans[i].seg);
    for (int64_t k = 0; k < j - i; ++k) {
      const int64_t idx = reverse ? j - 1 - k : i + k;
      carries[idx] = run;
      run.sum += totals[idx].sum;
      run.count += totals[idx].count;
    }
    i = j;
  }
  at::parallel_for(0, nspan, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) scan(spans[i].seg, spans[i].begin, spans[i].end, carries[i]);
  });
}

}  // namespace ctpo
