// Input validation and output allocation of ctpo_megatron::ctpo_token_loss (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "ctpo/checks.h"
#include "ctpo/layout.h"

namespace ctpo {

struct LossInputs {
  at::Tensor log_probs, old_log_probs, advantages, mask;
  c10::optional<at::Tensor> weights;
  const double* carry_sum = nullptr;
  const double* carry_count = nullptr;
};

struct LossOutputs {
  at::Tensor loss, grad, ratio, flags;
};

inline LossInputs check_loss_inputs(const at::Tensor& log_probs, const at::Tensor& old_log_probs,
                                    const at::Tensor& advantages, const at::Tensor& mask,
                                    const c10::optional<at::Tensor>& weights) {
  CTPO_CHECK_FLOATING(log_probs);
  CTPO_CHECK_CONTIGUOUS(log_probs);
  for (const auto& pair : {std::make_pair("old_log_probs", &old_log_probs), std::make_pair("advantages", &advantages),
                           std::make_pair("mask", &mask)}) {
    const at::Tensor& t = *pair.second;
    TORCH_CHECK(t.sizes() == log_probs.sizes(), pair.first, " must have the shape of log_probs ",
                log_probs.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == log_probs.scalar_type(), pair.first, " must have the dtype of log_probs (",
                log_probs.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK(t.device() == log_probs.device(), pair.first, " must be on ", log_probs.device(), ", got ",
                t.device());
    TORCH_CHECK(t.is_contiguous(), pair.first, " must be contiguous");
  }
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    TORCH_CHECK(w.sizes() == log_probs.sizes() && w.scalar_type() == log_probs.scalar_type() &&
                    w.device() == log_probs.device() && w.is_contiguous(),
                "weights must be a contiguous tensor like log_probs (", log_probs.sizes(), ", ",
                log_probs.scalar_type(), "), got ", w.sizes(), " ", w.scalar_type());
  }
  LossInputs in;
  in.log_probs = log_probs;
  in.old_log_probs = old_log_probs;
  in.advantages = advantages;
  in.mask = mask;
  in.weights = weights;
  return in;
}

// loss/grad/ratio are float32 for 16-bit inputs, else the input dtype; flags are uint8.
inline LossOutputs make_loss_outputs(const at::Tensor& log_probs, bool zero_fill) {
  auto opts = log_probs.options().dtype(result_dtype(log_probs.scalar_type()));
  auto make = [&](const at::TensorOptions& o) {
    return zero_fill ? at::zeros_like(log_probs, o) : at::empty_like(log_probs, o);
  };
  LossOutputs out;
  out.loss = make(opts);
  out.grad = make(opts);
  out.ratio = make(opts);
  out.flags = make(log_probs.options().dtype(at::kByte));
  return out;
}

}  // namespace ctpo
