// CPU kernels of ctpo_megatron::loss_metrics and ctpo_megatron::loss_stats_metrics: the metric
// values of a loss_stats result (algo.stats.LossSums.metrics, whose Python body is their
// definition and the path without the extension). Both run once per call of Python code that
// otherwise made ~15 tensor calls and built every value in Python: at one micro-batch, that
// fixed cost was about as large as the statistics' pass over the tokens.
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ctpo/histogram_quantiles.h"
#include "ctpo/loss_stats.h"

namespace ctpo {
namespace {

// Values before the quantiles: loss, valid_tokens, neg_adv_tokens, pg_clipfrac,
// pg_clipfrac_lower, ppo_kl, (clip_count, clipfrac) of high, low, dual, total, and
// is_ratio_{mean,min,max}.
constexpr int64_t kLeadingValues = 17;
// After the quantiles: la_scale_{mean,min,max,p50} and one mean per exp coefficient.
constexpr int64_t kScaleValues = 4;

// The values in the order of algo.stats (METRIC_KEYS): the leading ones, the ratio quantiles,
// the LA ones (0 unless adaptive_clip and a valid token), one per exp coefficient, then the
// clip rate of each position bucket (NaN for a bucket without tokens, which has no rate). The
// arithmetic is the Python definition's, in its order, so the results are equal.
void metric_values(const double* sums, const double* maxima, double loss, int64_t num_exp, int64_t bins,
                   int64_t num_buckets, int64_t num_updates, bool adaptive_clip, at::ArrayRef<double> qs,
                   const HistSpec& hist, double* out, const RunningScaleRows* la_rows = nullptr) {
  const StatsLayout l = stats_layout(num_exp, bins, num_buckets);
  const double n = sums[kTokens];
  const double per = 1.0 / static_cast<double>(std::max<int64_t>(num_updates, 1));
  auto rate = [n](double x) { return n != 0 ? x / n : 0.0; };
  double* v = out;
  *v++ = loss * per;
  *v++ = n * per;
  *v++ = sums[kNegAdv] * per;
  *v++ = sums[kClipped] / (n + 1e-8);
  *v++ = sums[kClipDual] / (n + 1e-8);
  *v++ = sums[kNegLogRatio] / (n + 1e-8);
  for (int slot : {kClipHigh, kClipLow, kClipDual, kClipAny}) {
    *v++ = sums[slot] * per;
    *v++ = rate(sums[slot]);
  }
  const double lo = n != 0 ? -maxima[kRatioNegMin] : 0.0, hi = n != 0 ? maxima[kRatioMax] : 0.0;
  *v++ = rate(sums[kRatioSum]);
  *v++ = lo;
  *v++ = hi;
  const std::vector<double> ratio_q = histogram_quantile_values(sums + l.ratio_hist, bins, qs, lo, hi, n, hist);
  v = std::copy(ratio_q.begin(), ratio_q.end(), v);
  std::fill(v, v + kScaleValues + num_exp, 0.0);
  if (adaptive_clip && n != 0) {
    const double scale_lo = -maxima[kScaleNegMin], scale_hi = maxima[kScaleMax];
    const double median = 0.5;
    v[0] = rate(sums[kScaleSum]);
    v[1] = scale_lo;
    v[2] = scale_hi;
    v[3] = la_rows != nullptr && la_rows->tables != nullptr
               ? running_scale_quantile(*la_rows, median, n, scale_lo, scale_hi, hist)
               : histogram_quantile_values(sums + l.scale_hist, bins, {median}, scale_lo, scale_hi, n, hist)[0];
    for (int64_t e = 0; e < num_exp; ++e) v[kScaleValues + e] = rate(sums[kExpSums + e]);
  }
  v += kScaleValues + num_exp;
  for (int64_t k = 0; k < num_buckets; ++k) {
    const double tokens = sums[l.pos_tokens + k];
    v[k] = tokens != 0 ? sums[l.pos_clipped + k] / tokens : std::numeric_limits<double>::quiet_NaN();
  }
}

int64_t num_values(int64_t num_exp, int64_t num_quantiles, int64_t num_buckets) {
  return kLeadingValues + num_quantiles + kScaleValues + num_exp + num_buckets;
}

at::Tensor loss_metrics_cpu(const at::Tensor& sums, const at::Tensor& maxima, double loss, int64_t num_exp,
                            int64_t num_buckets, int64_t num_updates, bool adaptive_clip, at::ArrayRef<double> qs,
                            int64_t hist_shift, int64_t hist_first, int64_t hist_bins) {
  constexpr const char* what = "ctpo_megatron::loss_metrics";
  TORCH_CHECK(num_exp >= 0 && num_exp <= kMaxExpCoeffs && num_buckets >= 0 && hist_bins >= 1, what,
              ": bad layout (num_exp ", num_exp, ", num_buckets ", num_buckets, ", hist_bins ", hist_bins, ")");
  const int64_t size = stats_layout(num_exp, hist_bins, num_buckets).size;
  TORCH_CHECK(sums.dim() == 1 && sums.numel() == size && sums.scalar_type() == at::kDouble && sums.is_contiguous(),
              what, ": sums must be a contiguous float64 [", size, "] (the loss_stats layout), got ",
              sums.scalar_type(), " of shape ", sums.sizes());
  TORCH_CHECK(maxima.dim() == 1 && maxima.numel() == kNumMaxSlots && maxima.scalar_type() == at::kDouble &&
                  maxima.is_contiguous(),
              what, ": maxima must be a contiguous float64 [", kNumMaxSlots, "], got ", maxima.scalar_type(),
              " of shape ", maxima.sizes());
  check_quantiles(qs, what);
  auto out = at::empty({num_values(num_exp, static_cast<int64_t>(qs.size()), num_buckets)}, sums.options());
  metric_values(sums.data_ptr<double>(), maxima.data_ptr<double>(), loss, num_exp, hist_bins, num_buckets,
                num_updates, adaptive_clip, qs, HistSpec{hist_shift, hist_first, hist_bins}, out.data_ptr<double>());
  return out;
}

// The statistics' buffer of loss_stats_metrics, per thread: zero between calls (each call clears
// what it wrote), so that a call does not allocate and zero the ~0.5 MB of histograms, most of
// which stay empty.
thread_local std::vector<double> stats_buffer;

// Leaves the buffer zero again when a call ends: the bins it wrote, or everything when an error
// left the statistics before they said which.
class ClearOnExit {
 public:
  ClearOnExit(std::vector<double>& buffer, const StatsLayout& layout) : buffer_(buffer), layout_(layout) {}
  ~ClearOnExit() {
    if (!written_) {
      std::fill(buffer_.begin(), buffer_.end(), 0.0);
      return;
    }
    clear(0, layout_.ratio_hist);
    clear(layout_.ratio_hist, written_->first);
    clear(layout_.scale_hist, written_->second);
    clear(layout_.pos_clipped, layout_.size);
  }
  void written(const WrittenBins& bins) { written_ = bins; }

 private:
  void clear(int64_t begin, int64_t end) { std::fill(buffer_.begin() + begin, buffer_.begin() + end, 0.0); }
  void clear(int64_t offset, const BinRange& bins) {
    if (bins.lo <= bins.hi) clear(offset + bins.lo, offset + bins.hi + 1);
  }
  std::vector<double>& buffer_;
  const StatsLayout layout_;
  c10::optional<WrittenBins> written_;
};

at::Tensor loss_stats_metrics_cpu(const at::Tensor& valid, const at::Tensor& advantages, const at::Tensor& ratio,
                                  const at::Tensor& log_ratio, const c10::optional<at::Tensor>& la_scale,
                                  c10::optional<double> la_power, const at::Tensor& clip_high,
                                  const at::Tensor& clip_low, const at::Tensor& clip_dual, const at::Tensor& clipped,
                                  const c10::optional<at::Tensor>& positions, at::IntArrayRef bucket_edges,
                                  at::ArrayRef<double> exp_coeffs, int64_t hist_shift,
                                  int64_t hist_first, int64_t hist_bins, at::ArrayRef<double> qs,
                                  bool adaptive_clip) {
  return stats_metric_values(valid, advantages, ratio, log_ratio, la_scale, la_power, clip_high, clip_low, clip_dual,
                             clipped, positions, bucket_edges, exp_coeffs,
                             HistSpec{hist_shift, hist_first, hist_bins}, qs, adaptive_clip,
                             "ctpo_megatron::loss_stats_metrics");
}

}  // namespace

at::Tensor stats_metric_values(const at::Tensor& valid, const at::Tensor& advantages, const at::Tensor& ratio,
                               const at::Tensor& log_ratio, const c10::optional<at::Tensor>& la_scale,
                               c10::optional<double> la_power, const at::Tensor& clip_high,
                               const at::Tensor& clip_low, const at::Tensor& clip_dual, const at::Tensor& clipped,
                               const c10::optional<at::Tensor>& positions, at::IntArrayRef bucket_edges,
                               at::ArrayRef<double> exp_coeffs, const HistSpec& hist,
                               at::ArrayRef<double> qs, bool adaptive_clip, const char* what,
                               const TileProducer* before_tile) {
  check_quantiles(qs, what);
  const int64_t num_exp = static_cast<int64_t>(exp_coeffs.size());
  const int64_t num_buckets = static_cast<int64_t>(bucket_edges.size());
  const StatsLayout l = stats_layout(num_exp, std::max<int64_t>(hist.bins, 0), std::max<int64_t>(num_buckets, 0));
  std::vector<double>& sums = stats_buffer;
  if (static_cast<int64_t>(sums.size()) < l.size) sums.assign(l.size, 0.0);
  double maxima[kNumMaxSlots];
  init_maxima(maxima);
  ClearOnExit clear_on_exit(sums, l);
  RunningScaleRows la_rows;  // the LA scales' median from the rows, when the statistics give them
  clear_on_exit.written(loss_stats_into(valid, advantages, ratio, log_ratio, la_scale, la_power, clip_high, clip_low,
                                        clip_dual, clipped, positions, bucket_edges, exp_coeffs,
                                        hist, sums.data(), maxima, before_tile, &la_rows));
  auto out = at::empty({num_values(num_exp, static_cast<int64_t>(qs.size()), num_buckets)},
                       valid.options().dtype(at::kDouble));
  metric_values(sums.data(), maxima, 0.0, num_exp, hist.bins, num_buckets, 1, adaptive_clip, qs, hist,
                out.data_ptr<double>(), &la_rows);
  return out;
}

}  // namespace ctpo

TORCH_LIBRARY_IMPL(ctpo_megatron, CPU, m) {
  m.impl("loss_metrics", &ctpo::loss_metrics_cpu);
  m.impl("loss_stats_metrics", &ctpo::loss_stats_metrics_cpu);
}
