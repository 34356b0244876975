// ctpo_megatron::loss_stats (CPU and CUDA): the additive statistics of one micro-batch's policy
// loss terms in one pass, for algo.stats.LossSums. Shared here: the slots of the scalar output,
// the histogram bin of a value and the input checks / output allocation.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "ctpo/ctpo_math.h"

namespace ctpo {

// Leading slots of the sums output (float64); kExpSums.. holds one sum of exp(c * g) per
// coefficient, then come the histograms and the position buckets (StatsLayout).
enum SumSlot : int {
  kTokens = 0,     // valid tokens
  kNegAdv,         // valid tokens with A < 0
  kClipHigh,       // clip flags summed over valid tokens
  kClipLow,
  kClipDual,
  kClipAny,        // high | low | dual
  kClipped,        // l2 > l1 (pg_clipfrac)
  kNegLogRatio,    // sum of -d_t
  kRatioSum,
  kScaleSum,       // LA scale g_t (0 without la_scale or la_power)
  kExpSums,
};

// Slots of the maxima output (float64; minima stored negated, so that every slot reduces with
// max): neutral values 0 / -inf when there is no valid token (or no LA scale).
enum MaxSlot : int { kRatioMax = 0, kRatioNegMin, kScaleMax, kScaleNegMin, kNumMaxSlots };

constexpr int64_t kMaxExpCoeffs = 4;
constexpr int64_t kStatsTile = 256;  // tokens per tile of the statistics' pass
constexpr int64_t kMaxPositionBuckets = 64;

struct HistSpec {
  int64_t shift;  // float32 mantissa bits below the kept ones
  int64_t first;  // (biased exponent of the smallest binned octave) << kept mantissa bits
  int64_t bins;
};

// Bin of a value by its float32 bit pattern (algo.histogram.bin_index): log-spaced bins,
// out-of-range values (and NaN, negatives) clamped into the first or last bin.
CTPO_HD int64_t hist_bin(float value, const HistSpec& h) {
  int32_t bits;
#ifdef __CUDACC__
  bits = __float_as_int(value);
#else
  std::memcpy(&bits, &value, sizeof(bits));
#endif
  int64_t bin = static_cast<int64_t>(bits >> h.shift) - h.first;
  return bin < 0 ? 0 : (bin >= h.bins ? h.bins - 1 : bin);
}

// Offsets of the sections of the sums output: [kExpSums + num_exp] scalars, then the ratio and
// LA-scale histograms [bins] each, then clipped and valid tokens per position bucket [K] each.
struct StatsLayout {
  int64_t ratio_hist, scale_hist, pos_clipped, pos_tokens, size;
};

inline StatsLayout stats_layout(int64_t num_exp, int64_t bins, int64_t num_buckets) {
  StatsLayout l;
  l.ratio_hist = kExpSums + num_exp;
  l.scale_hist = l.ratio_hist + bins;
  l.pos_clipped = l.scale_hist + bins;
  l.pos_tokens = l.pos_clipped + num_buckets;
  l.size = l.pos_tokens + num_buckets;
  return l;
}

// valid: bool [..., S]; advantages/ratio/log_ratio/la_scale: one float dtype, shape of valid;
// la_power: instead of la_scale, the LA scales are la_scale(n_t, la_power);
// flags: bool; positions: int64 (optional); bucket_edges: K strictly increasing positions >= 1
// (bucket k holds positions [edges[k], edges[k + 1]), the last one [edges[K - 1], inf)).
inline void check_stats_inputs(const at::Tensor& valid, const at::Tensor& advantages, const at::Tensor& ratio,
                               const at::Tensor& log_ratio, const c10::optional<at::Tensor>& la_scale,
                               const c10::optional<double>& la_power, const std::vector<at::Tensor>& flags,
                               const c10::optional<at::Tensor>& positions,
                               at::IntArrayRef bucket_edges,
                               const std::vector<double>& exp_coeffs, const HistSpec& hist) {
  constexpr const char* what = "ctpo_megatron::loss_stats";
  TORCH_CHECK(valid.scalar_type() == at::kBool, what, ": valid must be bool, got ", valid.scalar_type());
  TORCH_CHECK(valid.dim() >= 1, what, ": valid must have a token dimension, got a 0-d tensor");
  TORCH_CHECK(ratio.scalar_type() == at::kFloat || ratio.scalar_type() == at::kDouble, what,
              ": ratio must be float32 or float64, got ", ratio.scalar_type());
  auto like = [&](const at::Tensor& t, at::ScalarType dtype, const char* name) {
    TORCH_CHECK(t.sizes() == valid.sizes(), what, ": ", name, " must have the shape of valid ", valid.sizes(),
                ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, what, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == valid.device(), what, ": ", name, " must be on ", valid.device(), ", got ",
                t.device());
    TORCH_CHECK(t.is_contiguous(), what, ": ", name, " must be contiguous");
  };
  like(valid, at::kBool, "valid");
  like(advantages, ratio.scalar_type(), "advantages");
  like(ratio, ratio.scalar_type(), "ratio");
  like(log_ratio, ratio.scalar_type(), "log_ratio");
  if (la_scale.has_value()) like(*la_scale, ratio.scalar_type(), "la_scale");
  TORCH_CHECK(!(la_scale.has_value() && la_power.has_value()), what,
              ": pass la_scale (per-token LA scales) or la_power (scales from the positions), not both");
  TORCH_CHECK(!la_power.has_value() || std::isfinite(*la_power), what, ": la_power must be finite, got ",
              la_power.value_or(0.0));
  const char* names[] = {"clip_high", "clip_low", "clip_dual", "clipped"};
  for (size_t k = 0; k < flags.size(); ++k) like(flags[k], at::kBool, names[k]);
  if (positions.has_value()) like(*positions, at::kLong, "positions");
  const int64_t num_buckets = static_cast<int64_t>(bucket_edges.size());
  TORCH_CHECK(num_buckets >= 1 && num_buckets <= kMaxPositionBuckets, what, ": bucket_edges must hold 1 to ",
              kMaxPositionBuckets, " edges, got ", num_buckets);
  for (int64_t k = 0; k < num_buckets; ++k) {
    TORCH_CHECK(bucket_edges[k] >= 1 && (k == 0 || bucket_edges[k] > bucket_edges[k - 1]), what,
                ": bucket_edges must be strictly increasing integers >= 1, got ", bucket_edges);
  }
  TORCH_CHECK(static_cast<int64_t>(exp_coeffs.size()) <= kMaxExpCoeffs, what, ": at most ", kMaxExpCoeffs,
              " exp_coeffs, got ", exp_coeffs.size());
  TORCH_CHECK(hist.bins >= 1 && hist.shift >= 0 && hist.shift < 32, what, ": bad histogram spec (bins ", hist.bins,
              ", shift ", hist.shift, ")");
}

// (sums [layout.size] float64, maxima [kNumMaxSlots] float64): the op's outputs, zero sums and
// neutral maxima.
using StatsResult = std::tuple<at::Tensor, at::Tensor>;

// Histogram bins written (lo > hi: none).
struct BinRange {
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1;
  void add(int64_t first, int64_t last) {
    lo = std::min(lo, first);
    hi = std::max(hi, last);
  }
  void add(const BinRange& other) { add(other.lo, other.hi); }
};

// The bins of the ratio and LA-scale histograms that a loss_stats_into call wrote.
using WrittenBins = std::pair<BinRange, BinRange>;

struct RunningTables;  // csrc/cpu/loss_stats.cpp

// The LA scales of rows with running positions (a row of c valid tokens holds positions 1..c)
// as the rows' valid-token counts and the tables of la_scale over positions: enough for their
// quantiles without a histogram (running_scale_quantile).
struct RunningScaleRows {
  std::shared_ptr<const RunningTables> tables;  // null: the LA scales went into the histogram
  std::vector<int64_t> counts;                  // ascending
};

// The q-quantile of the LA scales of `rows` (n = their tokens, lo and hi their extremes):
// histogram_quantile_values' result for their histogram, from O(log) lookups instead of a walk
// over it.
double running_scale_quantile(const RunningScaleRows& rows, double q, double n, double lo, double hi,
                              const HistSpec& hist);

// Writes the inputs of tokens [t0, t0 + n) of row `row` (n <= kStatsTile) before the statistics read
// them; rows come in order within a chunk of rows, a row's tiles in order.
using TileProducer = std::function<void(int64_t row, int64_t t0, int64_t n)>;

// The CPU kernel of loss_stats (csrc/cpu/loss_stats.cpp), accumulating into sums (zeros, the
// StatsLayout's size) and maxima (init_maxima): the op allocates them, loss_stats_metrics
// reuses a buffer that it keeps zero by clearing the written bins afterwards. With
// `before_tile`, each tile of the inputs is produced right before the statistics read it, while
// it is in L1 (ctpo_token_loss_metrics: the loss kernel writes it). With `la_rows`, LA scales
// that come from the running tables (la_power, no positions) are not counted into the
// LA-scale histogram: la_rows takes the rows for running_scale_quantile instead.
WrittenBins loss_stats_into(const at::Tensor& valid, const at::Tensor& advantages, const at::Tensor& ratio,
                            const at::Tensor& log_ratio, const c10::optional<at::Tensor>& la_scale,
                            c10::optional<double> la_power, const at::Tensor& clip_high, const at::Tensor& clip_low,
                            const at::Tensor& clip_dual, const at::Tensor& clipped,
                            const c10::optional<at::Tensor>& positions, at::IntArrayRef bucket_edges,
                            at::ArrayRef<double> exp_coeffs, const HistSpec& hist,
                            double* sums, double* maxima, const TileProducer* before_tile = nullptr,
                            RunningScaleRows* la_rows = nullptr);

// loss_stats_into on a per-thread buffer that stays zero between calls, then the metric values
// of the result (loss 0, one update), as the loss_metrics op returns them (csrc/cpu/loss_metrics.cpp);
// `what` names the op in errors.
at::Tensor stats_metric_values(const at::Tensor& valid, const at::Tensor& advantages, const at::Tensor& ratio,
                               const at::Tensor& log_ratio, const c10::optional<at::Tensor>& la_scale,
                               c10::optional<double> la_power, const at::Tensor& clip_high,
                               const at::Tensor& clip_low, const at::Tensor& clip_dual, const at::Tensor& clipped,
                               const c10::optional<at::Tensor>& positions, at::IntArrayRef bucket_edges,
                               at::ArrayRef<double> exp_coeffs, const HistSpec& hist,
                               at::ArrayRef<double> qs, bool adaptive_clip, const char* what,
                               const TileProducer* before_tile = nullptr);

inline void init_maxima(double* maxima) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  maxima[kRatioMax] = 0.0;
  maxima[kRatioNegMin] = -inf;
  maxima[kScaleMax] = 0.0;
  maxima[kScaleNegMin] = -inf;
}

// A loss_stats result ready for loss_stats_into: sums zero, of the StatsLayout's size; maxima
// init_maxima. float64 on the device of `options`.
inline StatsResult fresh_stats(const at::TensorOptions& options, int64_t num_exp, int64_t hist_bins,
                               int64_t num_buckets) {
  const auto f64 = options.dtype(at::kDouble);
  at::Tensor sums = at::zeros({stats_layout(num_exp, hist_bins, num_buckets).size}, f64);
  at::Tensor maxima = at::empty({kNumMaxSlots}, f64);
  init_maxima(maxima.data_ptr<double>());
  return {sums, maxima};
}

}  // namespace ctpo
