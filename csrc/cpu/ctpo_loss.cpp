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
#include "ctpo/layout.h"
#include "ctpo/loss_checks.h"

namespace ctpo {
namespace {

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
  auto scan = [&](int64_t, int64_t b, int64_t e, Carry c) {
    for (int64_t i = b; i < e; ++i) {
      const bool valid = static_cast<double>(m[i]) > 0.0;
      const T d = valid ? delta(i) : T(0);
      T cum, cnt;
      if (pre_cum != nullptr) {
        cum = pre_cum[i];
        cnt = pre_cnt[i];
      } else {
        c.sum += static_cast<double>(d);
        c.count += valid ? 1.0 : 0.0;
        cum = static_cast<T>(c.sum);
        cnt = static_cast<T>(c.count);
      }
      const T g = scale != nullptr ? la_scale<T>(cnt, params.power) : T(1);
      if (scale != nullptr) scale[i] = g;
      log_ratio[i] = d;
      if (!valid) {
        loss[i] = T(0);
        grad[i] = T(0);
        ratio[i] = T(0);
        high[i] = low[i] = dual[i] = clipped[i] = false;
        continue;
      }
      const TokenTerms<T> tt = ctpo_token<T>(cum, cnt, static_cast<T>(lp[i]), static_cast<T>(adv[i]), g, params);
      loss[i] = tt.loss;
      grad[i] = tt.grad;
      ratio[i] = tt.ratio;
      high[i] = (tt.flags & kClipHigh) != 0;
      low[i] = (tt.flags & kClipLow) != 0;
      dual[i] = (tt.flags & kClipDual) != 0;
      clipped[i] = (tt.flags & kClipSurrogate) != 0;
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
  const CtpoParams params{geomean, adaptive, clip_low, clip_high, clip_c, power};
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
