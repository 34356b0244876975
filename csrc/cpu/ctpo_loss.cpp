// CPU kernel of ctpo_megatron::ctpo_token_loss: one pass over each sequence accumulates the
// masked cumulative log-ratio and count (float64) and evaluates the per-token CTPO surrogate,
// its gradient with respect to the log-prob, the ratio and the clip flags.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ctpo/cpu_segments.h"
#include "ctpo/ctpo_math.h"
#include "ctpo/layout.h"
#include "ctpo/loss_checks.h"

namespace ctpo {
namespace {

inline double clamp_log_ratio(double d) { return d < -20.0 ? -20.0 : (d > 20.0 ? 20.0 : d); }

template <typename scalar_t, typename T>
void loss_cpu_typed(const LossInputs& in, const SegmentLayout& L, const CtpoParams& params, LossOutputs& out) {
  const scalar_t* lp = in.log_probs.data_ptr<scalar_t>();
  const scalar_t* old = in.old_log_probs.data_ptr<scalar_t>();
  const scalar_t* adv = in.advantages.data_ptr<scalar_t>();
  const scalar_t* m = in.mask.data_ptr<scalar_t>();
  const scalar_t* w = in.weights.has_value() ? in.weights->data_ptr<scalar_t>() : nullptr;
  T* loss = out.loss.data_ptr<T>();
  T* grad = out.grad.data_ptr<T>();
  T* ratio = out.ratio.data_ptr<T>();
  uint8_t* flags = out.flags.data_ptr<uint8_t>();
  // The log-ratio is formed and clamped in the math type, as the torch composition does.
  auto delta = [&](int64_t i) {
    return static_cast<double>(static_cast<T>(clamp_log_ratio(static_cast<T>(lp[i]) - static_cast<T>(old[i]))));
  };
  auto total = [&](int64_t b, int64_t e) {
    Carry t;
    for (int64_t i = b; i < e; ++i) {
      const double mi = static_cast<double>(m[i]);
      t.sum += mi * delta(i);
      t.count += mi;
    }
    return t;
  };
  auto scan = [&](int64_t, int64_t b, int64_t e, Carry c) {
    for (int64_t i = b; i < e; ++i) {
      const double mi = static_cast<double>(m[i]);
      c.sum += mi * delta(i);
      c.count += mi;
      if (!(mi > 0.0)) {
        loss[i] = T(0);
        grad[i] = T(0);
        ratio[i] = T(0);
        flags[i] = 0;
        continue;
      }
      const T wi = w != nullptr ? static_cast<T>(w[i]) : T(1);
      const TokenTerms<T> tt = ctpo_token<T>(static_cast<T>(c.sum), static_cast<T>(c.count),
                                             static_cast<T>(adv[i]), wi, params);
      loss[i] = tt.loss;
      grad[i] = tt.grad;
      ratio[i] = tt.ratio;
      flags[i] = tt.flags;
    }
  };
  run_segments(L, in.carry_sum, in.carry_count, /*reverse=*/false, total, scan);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ctpo_token_loss_cpu(
    const at::Tensor& log_probs, const at::Tensor& old_log_probs, const at::Tensor& advantages,
    const at::Tensor& mask, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& carry_sum, const c10::optional<at::Tensor>& carry_count,
    const c10::optional<at::Tensor>& weights, bool geomean, bool adaptive, double clip_low,
    double clip_high, double clip_c, double power) {
  constexpr const char* what = "ctpo_megatron::ctpo_token_loss";
  LossInputs in = check_loss_inputs(log_probs, old_log_probs, advantages, mask, weights);
  const SegmentLayout L = parse_layout(log_probs, cu_seqlens, what);
  check_cu_seqlens_cpu(L, what);
  in.carry_sum = carry_ptr(carry_sum, log_probs, L, "carry_sum");
  in.carry_count = carry_ptr(carry_count, log_probs, L, "carry_count");
  const bool tail = L.cu != nullptr && L.cu[L.num_segments] < L.num_tokens;
  LossOutputs out = make_loss_outputs(log_probs, tail);
  const CtpoParams params{geomean, adaptive, clip_low, clip_high, clip_c, power};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "ctpo_token_loss_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    loss_cpu_typed<scalar_t, T>(in, L, params, out);
  });
  return {out.loss, out.grad, out.ratio, out.flags};
}

}  // namespace
}  // namespace ctpo

TORCH_LIBRARY_IMPL(ctpo_megatron, CPU, m) {
  m.impl("ctpo_token_loss", &ctpo::ctpo_token_loss_cpu);
}
