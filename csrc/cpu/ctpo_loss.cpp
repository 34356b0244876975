// CPU kernel of ctpo_megatron::ctpo_token_loss: one pass over each sequence accumulates the
// cumulative clamped log-ratio and count of valid tokens (float64) — or reads them when the
// caller precomputed them (context parallelism) — and evaluates the per-token CTPO surrogate,
// its derivative with respect to the log-prob, the ratio, the log-ratio, the LA scale and the
// clip flags.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ctpo/cpu_segments.h"
#include "ctpo/ctpo_math.h"
#include "ctpo/fast_exp.h"
#include "ctpo/layout.h"
#include "ctpo/loss_checks.h"
#include "ctpo/loss_stats.h"

namespace ctpo {
namespace {

constexpr int64_t kTile = 256;
static_assert(kStatsTile <= kTile, "a statistics tile must fit the loss kernel's tile buffers");

// Calls fn(adaptive, geomean, dual_is_high) with each flag as a std::bool_constant.
template <typename Fn>
void dispatch_flags(const CtpoParams& p, const Fn& fn) {
  auto with_dual = [&](auto adaptive, auto geomean) {
    if (p.dual_is_high) {
      fn(adaptive, geomean, std::true_type{});
    } else {
      fn(adaptive, geomean, std::false_type{});
    }
  };
  auto with_geomean = [&](auto adaptive) {
    if (p.geomean) {
      with_dual(adaptive, std::true_type{});
    } else {
      with_dual(adaptive, std::false_type{});
    }
  };
  if (p.adaptive) {
    with_geomean(std::true_type{});
  } else {
    with_geomean(std::false_type{});
  }
}

// The elementwise half of a tile: no dependence between tokens, no calls, the three flags
// compile-time constants and restrict pointers, so the compiler vectorizes it (float). Not
// inlined: inlined into the scan its restrict parameters stop counting and it stays scalar.
template <bool kAdaptive, bool kGeomean, bool kDualIsHigh, typename scalar_t, typename T, typename Exp>
CTPO_CPU_CLONES __attribute__((noinline)) void eval_tile(int64_t n, const T* __restrict__ cum, const T* __restrict__ count, const T* __restrict__ scale,
               const scalar_t* __restrict__ lp, const scalar_t* __restrict__ adv, const scalar_t* __restrict__ m,
               T* __restrict__ loss, T* __restrict__ grad, T* __restrict__ ratio, bool* __restrict__ high,
               bool* __restrict__ low, bool* __restrict__ dual, bool* __restrict__ clipped, const CtpoParams& params) {
  CtpoParams p = params;
  p.adaptive = kAdaptive;
  p.geomean = kGeomean;
  p.dual_is_high = kDualIsHigh;
  const Exp exp_fn;
#pragma GCC ivdep
  for (int64_t k = 0; k < n; ++k) {
    const bool valid = static_cast<T>(m[k]) > T(0);
    const TokenTerms<T> tt = ctpo_token<T>(cum[k], count[k], static_cast<T>(lp[k]), static_cast<T>(adv[k]), scale[k],
                                           p, exp_fn);
    loss[k] = valid ? tt.loss : T(0);
    grad[k] = valid ? tt.grad : T(0);
    ratio[k] = valid ? tt.ratio : T(0);
    high[k] = valid & (tt.high != 0);
    low[k] = valid & (tt.low != 0);
    dual[k] = valid & (tt.dual != 0);
    clipped[k] = valid & (tt.clipped != 0);
  }
}

// LA scale of a tile; the default p = 0.5 is a plain sqrt loop, which vectorizes.
template <typename T>
void fill_scale(int64_t n, const T* __restrict__ count, T* __restrict__ scale, const CtpoParams& params) {
  if (!params.adaptive) {
    std::fill(scale, scale + n, T(1));
  } else if (params.power == 0.5) {
    for (int64_t k = 0; k < n; ++k) scale[k] = std::sqrt(count[k] > T(1) ? count[k] : T(1));
  } else {
    for (int64_t k = 0; k < n; ++k) scale[k] = la_scale<T>(count[k], params.power);
  }
}

// The loss kernel over one batch's tensors: `tile` evaluates tokens [i0, i0 + n) (n <= kTile) of one
// sequence, continuing its prefix sums from `carry`; the plain op scans whole sequences with it,
// ctpo_token_loss_metrics hands each tile to the statistics right after evaluating it.
template <typename scalar_t, typename T>
class LossKernel {
 public:
  LossKernel(const at::Tensor& log_probs, const at::Tensor& old_log_probs, const at::Tensor& advantages,
             const at::Tensor& mask, const c10::optional<at::Tensor>& cum_in, const c10::optional<at::Tensor>& count_in,
             const CtpoParams& params, LossOutputs& out)
      : lp_(log_probs.data_ptr<scalar_t>()),
        old_(old_log_probs.data_ptr<scalar_t>()),
        adv_(advantages.data_ptr<scalar_t>()),
        m_(mask.data_ptr<scalar_t>()),
        pre_cum_(cum_in.has_value() ? cum_in->data_ptr<T>() : nullptr),
        pre_cnt_(count_in.has_value() ? count_in->data_ptr<T>() : nullptr),
        loss_(out.loss.data_ptr<T>()),
        grad_(out.grad.data_ptr<T>()),
        ratio_(out.ratio.data_ptr<T>()),
        log_ratio_(out.log_ratio.data_ptr<T>()),
        scale_(params.adaptive ? out.la_scale.data_ptr<T>() : nullptr),
        high_(out.clip_high.data_ptr<bool>()),
        low_(out.clip_low.data_ptr<bool>()),
        dual_(out.clip_dual.data_ptr<bool>()),
        clipped_(out.clipped.data_ptr<bool>()),
        params_(params) {}

  // The prefix sums' total over [b, e) (the blocked scan's first pass).
  Carry total(int64_t b, int64_t e) const {
    Carry t;
    for (int64_t i = b; i < e; ++i) {
      if (static_cast<double>(m_[i]) > 0.0) {
        t.sum += static_cast<double>(delta(i));
        t.count += 1.0;
      }
    }
    return t;
  }

  // Tiles of kTile tokens: a sequential pass carries the prefix sums (float64) into small
  // buffers, then an elementwise pass evaluates the surrogate; the second loop has no
  // dependence between tokens and no calls, so it vectorizes (FastExp for float).
  void scan(int64_t b, int64_t e, Carry c) const {
    for (int64_t t0 = b; t0 < e; t0 += kTile) tile(t0, std::min<int64_t>(kTile, e - t0), c);
  }

  void tile(int64_t t0, int64_t n, Carry& carry) const {
    T cum_buf[kTile], cnt_buf[kTile], scale_buf[kTile];
    Carry c = carry;  // a local: with T = double, the stores below could alias the caller's
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = t0 + k;
      const bool valid = static_cast<double>(m_[i]) > 0.0;
      const T d = valid ? delta(i) : T(0);
      log_ratio_[i] = d;
      if (pre_cum_ != nullptr) {
        cum_buf[k] = pre_cum_[i];
        cnt_buf[k] = pre_cnt_[i];
      } else {
        c.sum += static_cast<double>(d);
        c.count += valid ? 1.0 : 0.0;
        cum_buf[k] = static_cast<T>(c.sum);
        cnt_buf[k] = static_cast<T>(c.count);
      }
    }
    carry = c;
    fill_scale(n, cnt_buf, scale_buf, params_);
    if (scale_ != nullptr) std::copy(scale_buf, scale_buf + n, scale_ + t0);
    dispatch_flags(params_, [&](auto adaptive, auto geomean, auto dual_is_high) {
      eval_tile<decltype(adaptive)::value, decltype(geomean)::value, decltype(dual_is_high)::value, scalar_t, T, Exp>(
          n, cum_buf, cnt_buf, scale_buf, lp_ + t0, adv_ + t0, m_ + t0, loss_ + t0, grad_ + t0, ratio_ + t0,
          high_ + t0, low_ + t0, dual_ + t0, clipped_ + t0, params_);
    });
  }

 private:
  using Exp = std::conditional_t<std::is_same_v<T, float>, FastExp, StdExp>;
  // d_t = clamp(lp - olp, -20, 20) in the math type; invalid tokens contribute nothing, even
  // when their log-probs are garbage (-inf padding).
  T delta(int64_t i) const {
    const T d = static_cast<T>(lp_[i]) - static_cast<T>(old_[i]);
    return d < T(-20) ? T(-20) : (d > T(20) ? T(20) : d);
  }

  const scalar_t *lp_, *old_, *adv_, *m_;
  const T *pre_cum_, *pre_cnt_;
  T *loss_, *grad_, *ratio_, *log_ratio_, *scale_;
  bool *high_, *low_, *dual_, *clipped_;
  const CtpoParams params_;
};

template <typename scalar_t, typename T>
void loss_cpu_typed(const at::Tensor& log_probs, const at::Tensor& old_log_probs, const at::Tensor& advantages,
                    const at::Tensor& mask, const c10::optional<at::Tensor>& cum_in,
                    const c10::optional<at::Tensor>& count_in, const SegmentLayout& L, const CtpoParams& params,
                    LossOutputs& out) {
  const LossKernel<scalar_t, T> kernel(log_probs, old_log_probs, advantages, mask, cum_in, count_in, params, out);
  run_segments(
      L, nullptr, nullptr, /*reverse=*/false, [&](int64_t b, int64_t e) { return kernel.total(b, e); },
      [&](int64_t, int64_t b, int64_t e, Carry c) { kernel.scan(b, e, c); });
}

LossResult ctpo_token_loss_cpu(
    const at::Tensor& log_probs, const at::Tensor& old_log_probs, const at::Tensor& advantages,
    const at::Tensor& mask, const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& cum,
    const c10::optional<at::Tensor>& count, bool geomean, bool adaptive, double clip_low, double clip_high,
    double clip_c, double power) {
  constexpr const char* what = "ctpo_megatron::ctpo_token_loss";
  check_loss_inputs(log_probs, old_log_probs, advantages, mask, cum, count);
  const SegmentLayout L = parse_layout(log_probs, cu_seqlens, what);
  check_cu_seqlens_cpu(L, what);
  const bool tail = L.cu != nullptr && L.cu[L.num_segments] < L.num_tokens;
  LossOutputs out = make_loss_outputs(log_probs, adaptive, tail);
  const CtpoParams params = make_ctpo_params(geomean, adaptive, clip_low, clip_high, clip_c, power);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "ctpo_token_loss_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    loss_cpu_typed<scalar_t, T>(log_probs, old_log_probs, advantages, mask, cum, count, L, params, out);
  });
  return out.as_tuple();
}

// valid[k] = mask[k] > 0, as the statistics read it (one byte per token), in SIMD.
template <typename T>
CTPO_CPU_CLONES void positive_flags(const T* __restrict__ mask, int64_t n, uint8_t* __restrict__ valid) {
  for (int64_t k = 0; k < n; ++k) valid[k] = mask[k] > T(0);
}

// The statistics of a batch's terms: called with the valid flags (mask > 0), the loss's outputs
// and, in the fused case, the producer that evaluates each tile of terms before they read it.
using TermStats = std::function<void(const at::Tensor& valid, const LossOutputs& out, const TileProducer* before_tile)>;

// ctpo_token_loss of a padded batch with `stats` run on its terms (running positions, and
// la_power = power with adaptive clipping) in one pass: each tile of kStatsTile tokens goes to
// the statistics right after the loss kernel wrote it, while it is in L1, instead of a second
// pass reading ~17 bytes per token back from L3. Where the loss would split one sequence over
// threads (the blocked scan: fewer rows than twice the threads), the two passes run one after
// the other instead. Either way the results equal those of the loss op and the statistics op.
LossOutputs loss_with_stats(const at::Tensor& log_probs, const at::Tensor& old_log_probs,
                            const at::Tensor& advantages, const at::Tensor& mask, bool geomean, bool adaptive,
                            double clip_low, double clip_high, double clip_c, double power, const char* what,
                            const TermStats& stats) {
  check_loss_inputs(log_probs, old_log_probs, advantages, mask, c10::nullopt, c10::nullopt);
  TORCH_CHECK(log_probs.scalar_type() == at::kFloat || log_probs.scalar_type() == at::kDouble, what,
              ": log_probs must be float32 or float64 (the statistics read the terms in the inputs' dtype), got ",
              log_probs.scalar_type());
  TORCH_CHECK(log_probs.dim() == 1 || log_probs.dim() == 2, what, ": log_probs must be [S] or [B, S], got shape ",
              log_probs.sizes());
  const SegmentLayout L = parse_layout(log_probs, c10::nullopt, what);
  LossOutputs out = make_loss_outputs(log_probs, adaptive, /*zero_fill=*/false);
  const CtpoParams params = make_ctpo_params(geomean, adaptive, clip_low, clip_high, clip_c, power);
  const bool fused = scans_whole_segments(L);
  // mask > 0 for the statistics, in a per-thread buffer: a new tensor of this size per call came
  // from fresh pages each time (page faults).
  thread_local std::vector<uint8_t> valid_buffer;
  if (static_cast<int64_t>(valid_buffer.size()) < L.num_tokens) valid_buffer.resize(L.num_tokens);
  const at::Tensor valid = at::from_blob(valid_buffer.data(), log_probs.sizes(), log_probs.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(log_probs.scalar_type(), "ctpo_loss_with_stats_cpu", [&] {
    using T = scalar_t;
    const scalar_t* m = mask.data_ptr<scalar_t>();
    auto fill_valid = [&](int64_t i0, int64_t n) { positive_flags(m + i0, n, valid_buffer.data() + i0); };
    if (!fused) {
      loss_cpu_typed<scalar_t, T>(log_probs, old_log_probs, advantages, mask, c10::nullopt, c10::nullopt, L, params,
                                  out);
      fill_valid(0, L.num_tokens);
      stats(valid, out, nullptr);
      return;
    }
    const LossKernel<scalar_t, T> kernel(log_probs, old_log_probs, advantages, mask, c10::nullopt, c10::nullopt,
                                         params, out);
    std::vector<Carry> carries(L.num_segments);  // each row's prefix sums; a row stays in one chunk
    const TileProducer produce = [&](int64_t row, int64_t t0, int64_t n) {
      const int64_t i0 = row * L.row_len + t0;
      fill_valid(i0, n);
      kernel.tile(i0, n, carries[row]);
    };
    stats(valid, out, &produce);
  });
  return out;
}

using LossMetricsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                     at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ctpo_token_loss of a padded batch and the metric values of its terms (loss_stats_metrics), in
// one pass (loss_with_stats).
LossMetricsResult ctpo_token_loss_metrics_cpu(
    const at::Tensor& log_probs, const at::Tensor& old_log_probs, const at::Tensor& advantages,
    const at::Tensor& mask, bool geomean, bool adaptive, double clip_low, double clip_high, double clip_c,
    double power, at::IntArrayRef bucket_edges, at::ArrayRef<double> exp_coeffs,
    int64_t hist_shift, int64_t hist_first, int64_t hist_bins, at::ArrayRef<double> qs) {
  constexpr const char* what = "ctpo_megatron::ctpo_token_loss_metrics";
  at::Tensor values;
  const TermStats metrics = [&](const at::Tensor& valid, const LossOutputs& out, const TileProducer* before_tile) {
    values = stats_metric_values(valid, advantages, out.ratio, out.log_ratio, c10::nullopt,
                                 adaptive ? c10::optional<double>(power) : c10::nullopt, out.clip_high, out.clip_low,
                                 out.clip_dual, out.clipped, c10::nullopt, bucket_edges, exp_coeffs,
                                 HistSpec{hist_shift, hist_first, hist_bins}, qs, adaptive, what, before_tile);
  };
  const LossOutputs out = loss_with_stats(log_probs, old_log_probs, advantages, mask, geomean, adaptive, clip_low,
                                          clip_high, clip_c, power, what, metrics);
  const auto [loss, grad, ratio, log_ratio, la_scale, high, low, dual, clipped] = out.as_tuple();
  return {loss, grad, ratio, log_ratio, la_scale, high, low, dual, clipped, values};
}

using LossStatsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ctpo_token_loss of a padded batch and loss_stats of its terms (sums, maxima), in one pass
// (loss_with_stats): what the trainer's loss function sums over a step.
LossStatsResult ctpo_token_loss_stats_cpu(
    const at::Tensor& log_probs, const at::Tensor& old_log_probs, const at::Tensor& advantages,
    const at::Tensor& mask, bool geomean, bool adaptive, double clip_low, double clip_high, double clip_c,
    double power, at::IntArrayRef bucket_edges, at::ArrayRef<double> exp_coeffs,
    int64_t hist_shift, int64_t hist_first, int64_t hist_bins) {
  constexpr const char* what = "ctpo_megatron::ctpo_token_loss_stats";
  // Checked before the vectors are sized from them (loss_stats_into checks the rest).
  TORCH_CHECK(static_cast<int64_t>(exp_coeffs.size()) <= kMaxExpCoeffs && hist_bins >= 1, what,
              ": bad layout (", exp_coeffs.size(), " exp coefficients, hist_bins ", hist_bins, ")");
  at::Tensor sums, maxima;
  std::tie(sums, maxima) = fresh_stats(log_probs.options(), static_cast<int64_t>(exp_coeffs.size()), hist_bins,
                                       static_cast<int64_t>(bucket_edges.size()));
  const TermStats into = [&](const at::Tensor& valid, const LossOutputs& out, const TileProducer* before_tile) {
    loss_stats_into(valid, advantages, out.ratio, out.log_ratio, c10::nullopt,
                    adaptive ? c10::optional<double>(power) : c10::nullopt, out.clip_high, out.clip_low,
                    out.clip_dual, out.clipped, c10::nullopt, bucket_edges, exp_coeffs,
                    HistSpec{hist_shift, hist_first, hist_bins}, sums.data_ptr<double>(),
                    maxima.data_ptr<double>(), before_tile);
  };
  const LossOutputs out = loss_with_stats(log_probs, old_log_probs, advantages, mask, geomean, adaptive, clip_low,
                                          clip_high, clip_c, power, what, into);
  const auto [loss, grad, ratio, log_ratio, la_scale, high, low, dual, clipped] = out.as_tuple();
  return {loss, grad, ratio, log_ratio, la_scale, high, low, dual, clipped, sums, maxima};
}

}  // namespace
}  // namespace ctpo

TORCH_LIBRARY_IMPL(ctpo_megatron, CPU, m) {
  m.impl("ctpo_token_loss", &ctpo::ctpo_token_loss_cpu);
  m.impl("ctpo_token_loss_metrics", &ctpo::ctpo_token_loss_metrics_cpu);
  m.impl("ctpo_token_loss_stats", &ctpo::ctpo_token_loss_stats_cpu);
}
