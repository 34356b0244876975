// CUDA kernel of ctpo_megatron::ctpo_token_loss (see csrc/ops.cpp and csrc/cpu/ctpo_loss.cpp):
// one block per sequence scans the clamped log-ratios (float64) and evaluates the per-token
// CTPO terms; with precomputed prefix sums it is a plain elementwise kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "ctpo/ctpo_math.h"
#include "ctpo/cuda_scan.cuh"
#include "ctpo/layout.h"
#include "ctpo/loss_checks.h"

namespace ctpo {
namespace {

template <typename scalar_t, typename T>
struct LossArgs {
  const scalar_t* __restrict__ lp;
  const scalar_t* __restrict__ old;
  const scalar_t* __restrict__ adv;
  const scalar_t* __restrict__ mask;
  const T* __restrict__ pre_cum;
  const T* __restrict__ pre_count;
  T* __restrict__ loss;
  T* __restrict__ grad;
  T* __restrict__ ratio;
  T* __restrict__ log_ratio;
  T* __restrict__ scale;  // nullptr unless adaptive
  bool* __restrict__ high;
  bool* __restrict__ low;
  bool* __restrict__ dual;
  bool* __restrict__ clipped;
  CtpoParams params;
};

template <typename scalar_t, typename T>
__device__ __forceinline__ bool is_valid(const LossArgs<scalar_t, T>& a, int64_t i) {
  return static_cast<double>(a.mask[i]) > 0.0;
}

template <typename scalar_t, typename T>
__device__ __forceinline__ T clamped_delta(const LossArgs<scalar_t, T>& a, int64_t i) {
  const T d = static_cast<T>(a.lp[i]) - static_cast<T>(a.old[i]);
  return d < T(-20) ? T(-20) : (d > T(20) ? T(20) : d);
}

// Writes every output of token i from its prefix sums (cum, count) in the math type.
template <typename scalar_t, typename T>
__device__ __forceinline__ void emit_token(const LossArgs<scalar_t, T>& a, int64_t i, T cum, T count) {
  const bool valid = is_valid(a, i);
  const T g = a.scale != nullptr ? la_scale<T>(count, a.params.power) : T(1);
  if (a.scale != nullptr) a.scale[i] = g;
  a.log_ratio[i] = valid ? clamped_delta(a, i) : T(0);
  if (!valid) {
    a.loss[i] = T(0);
    a.grad[i] = T(0);
    a.ratio[i] = T(0);
    a.high[i] = a.low[i] = a.dual[i] = a.clipped[i] = false;
    return;
  }
  const TokenTerms<T> tt = ctpo_token<T>(cum, count, static_cast<T>(a.lp[i]), static_cast<T>(a.adv[i]), g, a.params);
  a.loss[i] = tt.loss;
  a.grad[i] = tt.grad;
  a.ratio[i] = tt.ratio;
  a.high[i] = tt.high != 0;
  a.low[i] = tt.low != 0;
  a.dual[i] = tt.dual != 0;
  a.clipped[i] = tt.clipped != 0;
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kScanThreads)
    ctpo_loss_scan_kernel(LossArgs<scalar_t, T> a, const int32_t* __restrict__ cu, int64_t num_segments,
                          int64_t row_len, int64_t num_tokens) {
  for (int64_t seg = blockIdx.x; seg < num_segments; seg += gridDim.x) {
    int64_t b, e;
    segment_range(cu, row_len, num_tokens, seg, &b, &e);
    auto contrib = [&](int64_t i) {
      return is_valid(a, i) ? SumCount{static_cast<double>(clamped_delta(a, i)), 1.0} : SumCount{0.0, 0.0};
    };
    auto emit = [&](int64_t i, const SumCount& s) {
      emit_token(a, i, static_cast<T>(s.sum), static_cast<T>(s.count));
    };
    block_segment_scan(b, e, /*reverse=*/false, SumCount{0.0, 0.0}, contrib, emit);
  }
}

template <typename scalar_t, typename T>
__global__ void ctpo_loss_given_sums_kernel(LossArgs<scalar_t, T> a, int64_t num_tokens) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_tokens;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    emit_token(a, i, a.pre_cum[i], a.pre_count[i]);
  }
}

LossResult ctpo_token_loss_cuda(
    const at::Tensor& log_probs, const at::Tensor& old_log_probs, const at::Tensor& advantages,
    const at::Tensor& mask, const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& cum,
    const c10::optional<at::Tensor>& count, bool geomean, bool adaptive, double clip_low, double clip_high,
    double clip_c, double power) {
  constexpr const char* what = "ctpo_megatron::ctpo_token_loss";
  check_loss_inputs(log_probs, old_log_probs, advantages, mask, cum, count);
  const SegmentLayout L = parse_layout(log_probs, cu_seqlens, what);
  const c10::cuda::CUDAGuard guard(log_probs.device());
  LossOutputs out = make_loss_outputs(log_probs, adaptive, /*zero_fill=*/L.cu != nullptr && !cum.has_value());
  if (L.num_tokens == 0) return out.as_tuple();
  const CtpoParams params = make_ctpo_params(geomean, adaptive, clip_low, clip_high, clip_c, power);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "ctpo_token_loss_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    LossArgs<scalar_t, T> a{log_probs.data_ptr<scalar_t>(), old_log_probs.data_ptr<scalar_t>(),
                            advantages.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(),
                            cum.has_value() ? cum->data_ptr<T>() : nullptr,
                            count.has_value() ? count->data_ptr<T>() : nullptr,
                            out.loss.data_ptr<T>(), out.grad.data_ptr<T>(), out.ratio.data_ptr<T>(),
                            out.log_ratio.data_ptr<T>(), adaptive ? out.la_scale.data_ptr<T>() : nullptr,
                            out.clip_high.data_ptr<bool>(), out.clip_low.data_ptr<bool>(),
                            out.clip_dual.data_ptr<bool>(), out.clipped.data_ptr<bool>(), params};
    if (cum.has_value()) {
      const int threads = 256;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((L.num_tokens + threads - 1) / threads, 1 << 20));
      ctpo_loss_given_sums_kernel<scalar_t, T><<<blocks, threads, 0, stream>>>(a, L.num_tokens);
    } else if (L.num_segments > 0) {
      const unsigned grid = static_cast<unsigned>(std::min<int64_t>(L.num_segments, 1 << 30));
      ctpo_loss_scan_kernel<scalar_t, T><<<grid, kScanThreads, 0, stream>>>(a, L.cu, L.num_segments, L.row_len,
                                                                           L.num_tokens);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.as_tuple();
}

}  // namespace
}  // namespace ctpo

TORCH_LIBRARY_IMPL(ctpo_megatron, CUDA, m) {
  m.impl("ctpo_token_loss", &ctpo::ctpo_token_loss_cuda);
}
