// Input validation and output allocation of ctpo_megatron::ctpo_token_loss (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <utility>

#include "ctpo/checks.h"
#include "ctpo/layout.h"

namespace ctpo {

struct LossOutputs {
  at::Tensor loss, grad, ratio, log_ratio, la_scale;
  at::Tensor clip_high, clip_low, clip_dual, clipped;  // bool

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
             at::Tensor>
  as_tuple() const {
    return {loss, grad, ratio, log_ratio, la_scale, clip_high, clip_low, clip_dual, clipped};
  }
};

using LossResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor>;

inline void check_like(const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of log_probs ", ref.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// old_log_probs/advantages/mask: like log_probs; cum/count (optional, both or neither): the
// precomputed prefix sums, in the result dtype.
inline void check_loss_inputs(const at::Tensor& log_probs, const at::Tensor& old_log_probs,
                              const at::Tensor& advantages, const at::Tensor& mask,
                              const c10::optional<at::Tensor>& cum, const c10::optional<at::Tensor>& count) {
  CTPO_CHECK_FLOATING(log_probs);
  CTPO_CHECK_CONTIGUOUS(log_probs);
  const auto dtype = log_probs.scalar_type();
  check_like(old_log_probs, log_probs, dtype, "old_log_probs");
  check_like(advantages, log_probs, dtype, "advantages");
  check_like(mask, log_probs, dtype, "mask");
  TORCH_CHECK(cum.has_value() == count.has_value(), "cum and count must be given together (or neither)");
  if (cum.has_value()) {
    check_like(*cum, log_probs, result_dtype(dtype), "cum");
    check_like(*count, log_probs, result_dtype(dtype), "count");
  }
}

// Float outputs are float32 for 16-bit inputs, else the input dtype; la_scale is empty when
// the clip is not adaptive; the four clip masks are bool.
inline LossOutputs make_loss_outputs(const at::Tensor& log_probs, bool adaptive, bool zero_fill) {
  auto opts = log_probs.options().dtype(result_dtype(log_probs.scalar_type()));
  auto make = [&](const at::TensorOptions& o) {
    return zero_fill ? at::zeros_like(log_probs, o) : at::empty_like(log_probs, o);
  };
  LossOutputs out;
  out.loss = make(opts);
  out.grad = make(opts);
  out.ratio = make(opts);
  out.log_ratio = make(opts);
  out.la_scale = adaptive ? make(opts) : at::empty({0}, opts);
  const auto bools = log_probs.options().dtype(at::kBool);
  out.clip_high = make(bools);
  out.clip_low = make(bools);
  out.clip_dual = make(bools);
  out.clipped = make(bools);
  return out;
}

}  // namespace ctpo
