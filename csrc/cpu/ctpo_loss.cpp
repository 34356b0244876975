// CPU kernel of ctpo_megatron::ctpo_token_loss: one pass over each sequence accumulates the
// cumulative clamped log-ratio and count of valid tokens (float64) — or reads them when the
// caller precomputed them (context parallelism) — and evaluates the per-token CTPO surrogate,
// its derivative with respect to the log-prob, the ratio, the log-ratio, the LA scale and the
// clip flags.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "ctpo/cpu_segments.h"
#include "ctpo/ctpo_math.h"
#include "ctpo/fast_exp.h"
#include "ctpo/layout.h"
#include "ctpo/loss_checks.h"

namespace ctpo {
namespace {

constexpr int64_t kTile = 256;

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

template <typename scalar_t, typename T>
void loss_cpu_typed(const at::Tensor& log_probs, const at::Tensor& old_log_probs, const at::Tensor& advantages,
                    const at::Tensor& mask, const c10::optional<at::Tensor>& cum_in,
                    const c10::optional<at::Tensor>& count_in, const SegmentLayout& L, const CtpoParams& params,
                    LossOutputs& out) {
  const scalar_t* lp = log_probs.data_ptr<scalar_t>();
  const scalar_t* old = old_log_probs.data_ptr<scalar_t>();
  const scalar_t* adv = advantages.data_ptr<scalar_t>();
  const scalar_t* m = mask.data_ptr<scalar_t>();
  const T* pre_cum = cum_in.has_value() ? cum_in->data_ptr<T>() : nullptr;
  const T* pre_cnt = count_in.has_value() ? count_in->data_ptr<T>() : nullptr;
  T* loss = out.loss.data_ptr<T>();
  T* grad = out.grad.data_ptr<T>();
  T* ratio = out.ratio.data_ptr<T>();
  T* log_ratio = out.log_ratio.data_ptr<T>();
  T* scale = params.adaptive ? out.la_scale.data_ptr<T>() : nullptr;
  bool* high = out.clip_high.data_ptr<bool>();
  bool* low = out.clip_low.data_ptr<bool>();
  bool* dual = out.clip_dual.data_ptr<bool>();
  bool* clipped = out.clipped.data_ptr<bool>();
  // d_t = clamp(lp - olp, -20, 20) in the math type; invalid tokens contribute nothing, even
  // when their log-probs are garbage (-inf padding).
  auto delta = [&](int64_t i) {
    const T d = static_cast<T>(lp[i]) - static_cast<T>(old[i]);
    return d < T(-20) ? T(-20) : (d > T(20) ? T(20) : d);
  };
  auto total = [&](int64_t b, int64_t e) {
    Carry t;
    for (int64_t i = b; i < e; ++i) {
      if (static_cast<double>(m[i]) > 0.0) {
        t.sum += static_cast<double>(delta(i));
        t.count += 1.0;
      }
    }
    return t;
  };
  // Tiles of kTile tokens: a sequential pass carries the prefix sums (float64) into small
  // buffers, then an elementwise pass evaluates the surrogate; the second loop has no
  // dependence between tokens and no calls, so it vectorizes (FastExp for float).
  using Exp = std::conditional_t<std::is_same_v<T, float>, FastExp, StdExp>;
  auto scan = [&](int64_t, int64_t b, int64_t e, Carry c) {
    T cum_buf[kTile], cnt_buf[kTile], scale_buf[kTile];
    for (int64_t t0 = b; t0 < e; t0 += kTile) {
      const int64_t n = std::min<int64_t>(kTile, e - t0);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t i = t0 + k;
        const bool valid = static_cast<double>(m[i]) > 0.0;
        const T d = valid ? delta(i) : T(0);
        log_ratio[i] = d;
        if (pre_cum != nullptr) {
          cum_buf[k] = pre_cum[i];
          cnt_buf[k] = pre_cnt[i];
        } else {
          c.sum += static_cast<double>(d);
          c.count += valid ? 1.0 : 0.0;
          cum_buf[k] = static_cast<T>(c.sum);
          cnt_buf[k] = static_cast<T>(c.count);
        }
      }
      fill_scale(n, cnt_buf, scale_buf, params);
      if (scale != nullptr) std::copy(scale_buf, scale_buf + n, scale + t0);
      dispatch_flags(params, [&](auto adaptive, auto geomean, auto dual_is_high) {
        eval_tile<decltype(adaptive)::value, decltype(geomean)::value, decltype(dual_is_high)::value, scalar_t, T,
                  Exp>(n, cum_buf, cnt_buf, scale_buf, lp + t0, adv + t0, m + t0, loss + t0, grad + t0, ratio + t0,
                       high + t0, low + t0, dual + t0, clipped + t0, params);
      });
    }
  };
  run_segments(L, nullptr, nullptr, /*reverse=*/false, total, scan);
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

}  // namespace
}  // namespace ctpo

TORCH_LIBRARY_IMPL(ctpo_megatron, CPU, m) {
  m.impl("ctpo_token_loss", &ctpo::ctpo_token_loss_cpu);
}
