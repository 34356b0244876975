// CPU kernel of ctpo_megatron::loss_stats: one pass over the valid tokens of a micro-batch's
// loss terms accumulates the counts, sums, extremes, the two log-bin histograms and the token
// and clip counts per position bucket (float64), in parallel over chunks of rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "ctpo/fast_exp.h"
#include "ctpo/loss_stats.h"

namespace ctpo {
namespace {

constexpr int64_t kStatsTile = 256;
constexpr int64_t kTokensPerChunk = 32768;  // below this, waking a thread costs more than it saves

template <typename T>
struct StatsArgs {
  const bool* valid;
  const T* adv;
  const T* ratio;
  const T* log_ratio;
  const T* scale;  // nullptr without LA
  const bool* high;
  const bool* low;
  const bool* dual;
  const bool* clipped;
  const int64_t* positions;  // nullptr: the running count of valid tokens in the row
  const int64_t* bucket_of_position;
  int64_t max_position;  // bucket_of_position has max_position + 1 entries
  int64_t num_buckets;
  std::vector<double> exp_coeffs;
  HistSpec hist;
  int64_t row_len;
};

// One chunk's accumulators; the first chunk writes straight into the outputs.
struct StatsAcc {
  double* scalars;
  double* ratio_hist;
  double* scale_hist;
  double* pos_clipped;
  double* pos_tokens;
};

// Per tile of kStatsTile tokens: the sums, counts and extremes in one SIMD loop (reduction in
// T: exact for counts, float32 rounding over at most 256 values for sums), added into float64
// per tile; then a scalar loop over the valid tokens for what scatters (histograms, position
// buckets). A float64 accumulator per token would chain its 4-cycle add latency through the
// whole row, and a branch per token on a random mask mispredicts.
struct TileSums {
  double tokens = 0, neg_adv = 0, high = 0, low = 0, dual = 0, any = 0, clipped = 0;
  double neg_log_ratio = 0, ratio_sum = 0, scale_sum = 0;
  double ratio_max, ratio_min, scale_max, scale_min;
};

template <typename T>
CTPO_CPU_CLONES void tile_sums(const StatsArgs<T>& a, int64_t i0, int64_t n, TileSums& acc) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  // Flags read as bytes: loads of `bool` kept the count loop scalar (7x slower with AVX2).
  auto bytes = [&](const bool* p) { return reinterpret_cast<const uint8_t*>(p + i0); };
  const uint8_t* __restrict__ v = bytes(a.valid);
  const T* __restrict__ adv = a.adv + i0;
  const T* __restrict__ r = a.ratio + i0;
  const T* __restrict__ lr = a.log_ratio + i0;
  const uint8_t* __restrict__ hi = bytes(a.high);
  const uint8_t* __restrict__ lo = bytes(a.low);
  const uint8_t* __restrict__ du = bytes(a.dual);
  const uint8_t* __restrict__ cl = bytes(a.clipped);
  // Counts in int32 (an integer reduction vectorizes as written), float sums and extremes in
  // their own SIMD loops: one loop with all eleven reductions stayed scalar.
  int32_t tokens = 0, neg_adv = 0, high = 0, low = 0, dual = 0, any = 0, clipped = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int32_t valid = v[k];
    tokens += valid;
    neg_adv += valid & static_cast<int32_t>(adv[k] < T(0));
    high += valid & hi[k];
    low += valid & lo[k];
    dual += valid & du[k];
    any += valid & (hi[k] | lo[k] | du[k]);
    clipped += valid & cl[k];
  }
  T nlr = 0, rsum = 0;
#pragma omp simd reduction(+ : nlr, rsum)
  for (int64_t k = 0; k < n; ++k) {
    nlr -= v[k] ? lr[k] : T(0);
    rsum += v[k] ? r[k] : T(0);
  }
  T rmax = 0, rmin = inf;
#pragma omp simd reduction(max : rmax) reduction(min : rmin)
  for (int64_t k = 0; k < n; ++k) {
    rmax = std::max(rmax, v[k] ? r[k] : T(0));
    rmin = std::min(rmin, v[k] ? r[k] : inf);
  }
  acc.tokens += tokens;
  acc.neg_adv += neg_adv;
  acc.high += high;
  acc.low += low;
  acc.dual += dual;
  acc.any += any;
  acc.clipped += clipped;
  acc.neg_log_ratio += nlr;
  acc.ratio_sum += rsum;
  acc.ratio_max = std::max<double>(acc.ratio_max, rmax);
  acc.ratio_min = std::min<double>(acc.ratio_min, rmin);
  if (a.scale == nullptr) return;
  const T* __restrict__ g = a.scale + i0;
  T gsum = 0, gmax = 0, gmin = inf;
#pragma omp simd reduction(+ : gsum) reduction(max : gmax) reduction(min : gmin)
  for (int64_t k = 0; k < n; ++k) {
    gsum += v[k] ? g[k] : T(0);
    gmax = std::max(gmax, v[k] ? g[k] : T(0));
    gmin = std::min(gmin, v[k] ? g[k] : inf);
  }
  acc.scale_sum += gsum;
  acc.scale_max = std::max<double>(acc.scale_max, gmax);
  acc.scale_min = std::min<double>(acc.scale_min, gmin);
}

// sum over the tile's valid tokens of exp(c * g): the exp loop unmasked (no select: it
// vectorizes), then a masked SIMD sum.
template <typename T>
CTPO_CPU_CLONES double tile_exp_sum(const bool* valid_flags, const T* __restrict__ scale, int64_t n, double c) {
  using Exp = std::conditional_t<std::is_same_v<T, float>, FastExp, StdExp>;
  const Exp exp_fn;
  const T coeff = static_cast<T>(c);
  const uint8_t* __restrict__ valid = reinterpret_cast<const uint8_t*>(valid_flags);
  T buf[kStatsTile];
  for (int64_t k = 0; k < n; ++k) buf[k] = exp_fn(coeff * scale[k]);
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t k = 0; k < n; ++k) total += valid[k] ? buf[k] : T(0);
  return total;
}

// hist_bin of n values (a SIMD loop).
template <typename T>
CTPO_CPU_CLONES void tile_bins(const T* __restrict__ values, int64_t n, HistSpec h, int32_t* __restrict__ bins) {
  for (int64_t k = 0; k < n; ++k) bins[k] = static_cast<int32_t>(hist_bin(static_cast<float>(values[k]), h));
}

// Counts that usually repeat their target from one token to the next (the position bucket and
// the LA scale's bin, both monotone in n_t along a row) are kept in registers and written when
// the target changes: a memory increment per token would chain each add through the previous
// one's store.
struct Runs {
  const int64_t num_buckets;  // buckets >= this are left out (positions below the first edge)
  int64_t bucket = -1, scale_bin = -1;
  int64_t bucket_tokens = 0, bucket_clipped = 0, scale_count = 0;  // integer adds: 1-cycle chains

  void flush_bucket(const StatsAcc& acc) {
    if (bucket >= 0 && bucket < num_buckets) {
      acc.pos_tokens[bucket] += static_cast<double>(bucket_tokens);
      acc.pos_clipped[bucket] += static_cast<double>(bucket_clipped);
    }
    bucket_tokens = bucket_clipped = 0;
  }
  void flush_scale(const StatsAcc& acc) {
    if (scale_bin >= 0) acc.scale_hist[scale_bin] += static_cast<double>(scale_count);
    scale_count = 0;
  }
  void flush(const StatsAcc& acc) {
    flush_bucket(acc);
    flush_scale(acc);
  }
};

// Histogram bins of a tile (vectorizes), then the scatter over its tokens; invalid tokens add
// weight 0 instead of branching on a mask that mispredicts.
template <typename T>
void scatter_tile(const StatsArgs<T>& a, int64_t i0, int64_t n, int64_t& count, Runs& runs, const StatsAcc& acc) {
  int32_t ratio_bins[kStatsTile], scale_bins[kStatsTile];
  tile_bins(a.ratio + i0, n, a.hist, ratio_bins);
  if (a.scale != nullptr) tile_bins(a.scale + i0, n, a.hist, scale_bins);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = i0 + k;
    const bool valid = a.valid[i];
    const double w = valid ? 1.0 : 0.0;
    count += valid;
    acc.ratio_hist[ratio_bins[k]] += w;
    if (a.scale != nullptr) {
      if (scale_bins[k] != runs.scale_bin) {
        runs.flush_scale(acc);
        runs.scale_bin = scale_bins[k];
      }
      runs.scale_count += valid;
    }
    int64_t pos = a.positions != nullptr ? a.positions[i] : count;
    pos = pos < 0 ? 0 : (pos > a.max_position ? a.max_position : pos);
    const int64_t bucket = a.bucket_of_position[pos];
    if (bucket != runs.bucket) {
      runs.flush_bucket(acc);
      runs.bucket = bucket;
    }
    runs.bucket_tokens += valid;
    runs.bucket_clipped += valid & (a.high[i] | a.low[i] | a.dual[i]);
  }
}

template <typename T>
void stats_rows(const StatsArgs<T>& a, int64_t row_begin, int64_t row_end, const StatsAcc& acc) {
  double* s = acc.scalars;
  TileSums sums;
  sums.ratio_max = s[kRatioMax];
  sums.ratio_min = s[kRatioMin];
  sums.scale_max = s[kScaleMax];
  sums.scale_min = s[kScaleMin];
  Runs runs{a.num_buckets};
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * a.row_len;
    int64_t count = 0;
    for (int64_t t0 = 0; t0 < a.row_len; t0 += kStatsTile) {
      const int64_t n = std::min(kStatsTile, a.row_len - t0);
      const int64_t i0 = base + t0;
      tile_sums(a, i0, n, sums);
      if (a.scale != nullptr) {
        for (size_t c = 0; c < a.exp_coeffs.size(); ++c) {
          s[kExpSums + c] += tile_exp_sum<T>(a.valid + i0, a.scale + i0, n, a.exp_coeffs[c]);
        }
      }
      scatter_tile(a, i0, n, count, runs, acc);
    }
  }
  runs.flush(acc);
  s[kTokens] += sums.tokens;
  s[kNegAdv] += sums.neg_adv;
  s[kClipHigh] += sums.high;
  s[kClipLow] += sums.low;
  s[kClipDual] += sums.dual;
  s[kClipAny] += sums.any;
  s[kClipped] += sums.clipped;
  s[kNegLogRatio] += sums.neg_log_ratio;
  s[kRatioSum] += sums.ratio_sum;
  s[kScaleSum] += sums.scale_sum;
  s[kRatioMax] = sums.ratio_max;
  s[kRatioMin] = sums.ratio_min;
  s[kScaleMax] = sums.scale_max;
  s[kScaleMin] = sums.scale_min;
}

void init_extremes(double* scalars, bool has_scale) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  scalars[kRatioMin] = inf;
  if (has_scale) scalars[kScaleMin] = inf;  // else stays 0 like the other LA slots
}

StatsResult loss_stats_cpu(const at::Tensor& valid, const at::Tensor& advantages, const at::Tensor& ratio,
                           const at::Tensor& log_ratio, const c10::optional<at::Tensor>& la_scale,
                           const at::Tensor& clip_high, const at::Tensor& clip_low, const at::Tensor& clip_dual,
                           const at::Tensor& clipped, const c10::optional<at::Tensor>& positions,
                           const at::Tensor& bucket_of_position, int64_t num_buckets,
                           at::ArrayRef<double> exp_coeffs, int64_t hist_shift, int64_t hist_first,
                           int64_t hist_bins) {
  const HistSpec hist{hist_shift, hist_first, hist_bins};
  const std::vector<double> coeffs(exp_coeffs.begin(), exp_coeffs.end());
  check_stats_inputs(valid, advantages, ratio, log_ratio, la_scale, {clip_high, clip_low, clip_dual, clipped},
                     positions, bucket_of_position, num_buckets, coeffs, hist);
  const int64_t num_exp = static_cast<int64_t>(coeffs.size());
  StatsOutputs out = make_stats_outputs(valid, num_exp, hist_bins, num_buckets);
  const bool has_scale = la_scale.has_value();
  const int64_t row_len = valid.size(-1);
  const int64_t rows = row_len > 0 ? valid.numel() / row_len : 0;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), rows, valid.numel() / kTokensPerChunk}));
  const int64_t slots = kExpSums + num_exp;
  AT_DISPATCH_FLOATING_TYPES(ratio.scalar_type(), "loss_stats_cpu", [&] {
    StatsArgs<scalar_t> a{valid.data_ptr<bool>(), advantages.data_ptr<scalar_t>(), ratio.data_ptr<scalar_t>(),
                          log_ratio.data_ptr<scalar_t>(), has_scale ? la_scale->data_ptr<scalar_t>() : nullptr,
                          clip_high.data_ptr<bool>(), clip_low.data_ptr<bool>(), clip_dual.data_ptr<bool>(),
                          clipped.data_ptr<bool>(), positions.has_value() ? positions->data_ptr<int64_t>() : nullptr,
                          bucket_of_position.data_ptr<int64_t>(), bucket_of_position.numel() - 1, num_buckets,
                          coeffs, hist, row_len};
    double* pos = out.positions.data_ptr<double>();
    StatsAcc first{out.scalars.data_ptr<double>(), out.ratio_hist.data_ptr<double>(),
                   out.scale_hist.data_ptr<double>(), pos, pos + num_buckets};
    init_extremes(first.scalars, has_scale);
    if (chunks == 1) {
      stats_rows(a, 0, rows, first);
      return;
    }
    // Chunks other than the first accumulate into buffers of their own, merged below.
    std::vector<std::vector<double>> buffers(chunks - 1,
                                             std::vector<double>(slots + 2 * hist_bins + 2 * num_buckets, 0.0));
    std::vector<StatsAcc> accs{first};
    for (auto& buf : buffers) {
      double* p = buf.data();
      accs.push_back({p, p + slots, p + slots + hist_bins, p + slots + 2 * hist_bins,
                      p + slots + 2 * hist_bins + num_buckets});
      init_extremes(p, has_scale);
    }
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) stats_rows(a, rows * c / chunks, rows * (c + 1) / chunks, accs[c]);
    });
    for (int64_t c = 1; c < chunks; ++c) {
      const StatsAcc& src = accs[c];
      for (int64_t k = 0; k < slots; ++k) {
        if (k == kRatioMax || k == kScaleMax) {
          first.scalars[k] = std::max(first.scalars[k], src.scalars[k]);
        } else if (k == kRatioMin || k == kScaleMin) {
          first.scalars[k] = std::min(first.scalars[k], src.scalars[k]);
        } else {
          first.scalars[k] += src.scalars[k];
        }
      }
      for (int64_t k = 0; k < hist_bins; ++k) first.ratio_hist[k] += src.ratio_hist[k];
      if (has_scale) {
        for (int64_t k = 0; k < hist_bins; ++k) first.scale_hist[k] += src.scale_hist[k];
      }
      for (int64_t k = 0; k < num_buckets; ++k) {
        first.pos_clipped[k] += src.pos_clipped[k];
        first.pos_tokens[k] += src.pos_tokens[k];
      }
    }
  });
  return {out.scalars, out.ratio_hist, out.scale_hist, out.positions};
}

}  // namespace
}  // namespace ctpo

TORCH_LIBRARY_IMPL(ctpo_megatron, CPU, m) {
  m.impl("loss_stats", &ctpo::loss_stats_cpu);
}
