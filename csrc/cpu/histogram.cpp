// CPU kernel of ctpo_megatron::histogram_quantiles: torch.quantile-style quantiles of the values
// counted in a log-bin histogram (algo.histogram), each order statistic spread evenly over its
// bin. The same arithmetic as algo.histogram's numpy path, in the same order, so the results
// are equal; what it saves is numpy's cumulative sum over the ~10^4 bins between the extremes
// (a chain of dependent adds) and a dozen small array calls: the bins are summed in blocks
// (independent adds, SIMD), once, and only the blocks holding an order statistic are walked
// bin by bin.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "ctpo/histogram_quantiles.h"

namespace ctpo {

double bin_lower_edge(int64_t b, const HistSpec& h) {
  const int32_t bits = static_cast<int32_t>((b + h.first) << h.shift);
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return static_cast<double>(value);
}

namespace {

constexpr int64_t kBlock = 64;

// Sums of the consecutive blocks of kBlock bins of [begin, end): independent adds, SIMD within
// a block. Whole counts, so exact in any order.
std::vector<double> block_sums(const double* __restrict__ c, int64_t begin, int64_t end) {
  std::vector<double> sums;
  sums.reserve((end - begin + kBlock - 1) / kBlock);
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += c[b + k];
    sums.push_back(s);
  }
  return sums;
}

// Order statistics at the ascending `ranks` within bins [begin, end) of counts (`sums`: their
// block sums): the first bin whose inclusive cumulative count exceeds the rank (the last bin if
// none), and its value. Only the blocks holding a rank are walked bin by bin.
std::vector<double> order_statistics(const double* counts, int64_t begin, int64_t end, const std::vector<double>& sums,
                                     const std::vector<double>& ranks, const HistSpec& h) {
  std::vector<double> values(ranks.size());
  size_t block = 0;
  double before_block = 0;  // counts of the bins before `block`
  for (size_t j = 0; j < ranks.size(); ++j) {
    const double r = ranks[j];
    int64_t k = -1;
    double before = 0;
    while (block < sums.size()) {
      if (before_block + sums[block] > r) {
        const int64_t first = begin + static_cast<int64_t>(block) * kBlock;
        double cum = before_block;
        for (int64_t i = first; i < std::min(first + kBlock, end); ++i) {
          cum += counts[i];
          if (cum > r) {
            k = i;
            before = cum - counts[i];
            break;
          }
        }
        break;
      }
      before_block += sums[block];
      ++block;
    }
    if (k < 0) {  // past the last count (not for ranks below the total): the last bin
      k = end - 1;
      before = before_block - counts[k];
    }
    const double lower = bin_lower_edge(k, h), upper = bin_lower_edge(k + 1, h);
    const double inside = (r - before + 0.5) / counts[k];
    values[j] = lower + inside * (upper - lower);
  }
  return values;
}

}  // namespace

std::vector<double> histogram_quantile_values(const double* c, int64_t bins, at::ArrayRef<double> qs,
                                              c10::optional<double> lo, c10::optional<double> hi,
                                              c10::optional<double> total, const HistSpec& h) {
  std::vector<double> result(qs.size(), 0.0);
  if (bins == 0) return result;
  // Only the bins between the extremes hold counts, unless NaN or out-of-range values sit
  // outside: then their sum falls short of the total and every bin is used. Each block is
  // summed once, for the check and for the walk.
  int64_t begin = 0, end = bins;
  std::vector<double> sums;  // block sums of [begin, end)
  auto total_of = [](const std::vector<double>& s) { return std::accumulate(s.begin(), s.end(), 0.0); };
  if (lo && hi && *lo <= *hi) {
    const int64_t first = hist_bin(static_cast<float>(*lo), h), last = hist_bin(static_cast<float>(*hi), h);
    std::vector<double> window = block_sums(c, first, last + 1);
    if (!total) sums = block_sums(c, 0, bins);
    if (total_of(window) == (total ? *total : total_of(sums))) {
      begin = first;
      end = last + 1;
      sums = std::move(window);
    }
  }
  if (sums.empty()) sums = block_sums(c, 0, bins);  // the window was not taken, total given
  const double n = total_of(sums);
  return quantiles_from_order_statistics(qs, n, lo, hi, [&](const std::vector<double>& ranks) {
    return order_statistics(c, begin, end, sums, ranks, h);
  });
}

std::vector<double> quantiles_from_order_statistics(at::ArrayRef<double> qs, double n, c10::optional<double> lo,
                                                    c10::optional<double> hi, const OrderStatistics& find) {
  std::vector<double> result(qs.size(), 0.0);
  if (n <= 0) return result;
  // Both order statistics of every quantile, ascending, each visited once.
  const size_t m = qs.size();
  std::vector<double> rank(m), ranks(2 * m);
  for (size_t j = 0; j < m; ++j) {
    rank[j] = qs[j] * (n - 1);
    ranks[j] = std::floor(rank[j]);
    ranks[m + j] = std::ceil(rank[j]);
  }
  std::vector<size_t> order(2 * m);
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranks[a] < ranks[b]; });
  std::vector<double> sorted(2 * m);
  for (size_t i = 0; i < order.size(); ++i) sorted[i] = ranks[order[i]];
  const std::vector<double> found = find(sorted);
  std::vector<double> value(2 * m);
  for (size_t i = 0; i < order.size(); ++i) {
    double v = found[i];
    // The smallest and largest order statistics are the exact extremes, when known.
    if (lo && sorted[i] == 0) v = *lo;
    if (hi && sorted[i] == n - 1) v = *hi;
    value[order[i]] = v;
  }
  for (size_t j = 0; j < m; ++j) {
    double q = value[j] + (rank[j] - ranks[j]) * (value[m + j] - value[j]);
    if (lo) q = std::max(q, *lo);
    if (hi) q = std::min(q, *hi);
    result[j] = q;
  }
  return result;
}

namespace {

at::Tensor histogram_quantiles_cpu(const at::Tensor& counts, at::ArrayRef<double> qs, c10::optional<double> lo,
                                   c10::optional<double> hi, c10::optional<double> total, int64_t hist_shift,
                                   int64_t hist_first) {
  constexpr const char* what = "ctpo_megatron::histogram_quantiles";
  TORCH_CHECK(counts.dim() == 1 && counts.scalar_type() == at::kDouble, what,
              ": counts must be a 1-d float64 tensor, got ", counts.scalar_type(), " of shape ", counts.sizes());
  check_quantiles(qs, what);
  const at::Tensor contiguous = counts.contiguous();
  const HistSpec h{hist_shift, hist_first, counts.numel()};
  const std::vector<double> values =
      histogram_quantile_values(contiguous.data_ptr<double>(), counts.numel(), qs, lo, hi, total, h);
  auto out = at::empty({static_cast<int64_t>(qs.size())}, counts.options());
  std::copy(values.begin(), values.end(), out.data_ptr<double>());
  return out;
}

}  // namespace
}  // namespace ctpo

TORCH_LIBRARY_IMPL(ctpo_megatron, CPU, m) {
  m.impl("histogram_quantiles", &ctpo::histogram_quantiles_cpu);
}
