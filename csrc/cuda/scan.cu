// CUDA kernel of ctpo_megatron::segmented_scan (see csrc/ops.cpp for the contract).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "ctpo/cuda_scan.cuh"
#include "ctpo/layout.h"

namespace ctpo {
namespace {

template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kScanThreads)
    segmented_scan_kernel(const scalar_t* __restrict__ values, const scalar_t* __restrict__ mask,
                          const int32_t* __restrict__ cu, int64_t num_segments, int64_t row_len, int64_t num_tokens,
                          const double* __restrict__ carry_sum, const double* __restrict__ carry_count, bool reverse,
                          out_t* __restrict__ cum, out_t* __restrict__ count) {
  for (int64_t seg = blockIdx.x; seg < num_segments; seg += gridDim.x) {
    int64_t b, e;
    segment_range(cu, row_len, num_tokens, seg, &b, &e);
    const SumCount carry = {carry_sum != nullptr ? carry_sum[seg] : 0.0,
                            carry_count != nullptr ? carry_count[seg] : 0.0};
    auto contrib = [&](int64_t i) {
      const double m = mask != nullptr ? static_cast<double>(mask[i]) : 1.0;
      return SumCount{m * static_cast<double>(values[i]), m};
    };
    auto emit = [&](int64_t i, const SumCount& s) {
      cum[i] = static_cast<out_t>(s.sum);
      count[i] = static_cast<out_t>(s.count);
    };
    block_segment_scan(b, e, reverse, carry, contrib, emit);
  }
}

std::tuple<at::Tensor, at::Tensor> segmented_scan_cuda(const at::Tensor& values, const c10::optional<at::Tensor>& mask,
                                                       const c10::optional<at::Tensor>& cu_seqlens,
                                                       const c10::optional<at::Tensor>& carry_sum,
                                                       const c10::optional<at::Tensor>& carry_count, bool reverse) {
  constexpr const char* what = "ctpo_megatron::segmented_scan";
  check_scan_inputs(values, mask);
  const SegmentLayout L = parse_layout(values, cu_seqlens, what);
  const double* cs = carry_ptr(carry_sum, values, L, "carry_sum");
  const double* cn = carry_ptr(carry_count, values, L, "carry_count");
  const c10::cuda::CUDAGuard guard(values.device());
  auto opts = values.options().dtype(result_dtype(values.scalar_type()));
  // Packed tokens past cu_seqlens[-1] belong to no segment; zero-fill rather than read the offset.
  const bool packed = L.cu != nullptr;
  at::Tensor cum = packed ? at::zeros_like(values, opts) : at::empty_like(values, opts);
  at::Tensor count = packed ? at::zeros_like(values, opts) : at::empty_like(values, opts);
  if (L.num_segments == 0 || L.num_tokens == 0) return {cum, count};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(L.num_segments, 1 << 30));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "segmented_scan_cuda", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    segmented_scan_kernel<scalar_t, out_t><<<grid, kScanThreads, 0, stream>>>(
        values.data_ptr<scalar_t>(), mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr, L.cu,
        L.num_segments, L.row_len, L.num_tokens, cs, cn, reverse, cum.data_ptr<out_t>(), count.data_ptr<out_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cum, count};
}

}  // namespace
}  // namespace ctpo

TORCH_LIBRARY_IMPL(ctpo_megatron, CUDA, m) {
  m.impl("segmented_scan", &ctpo::segmented_scan_cuda);
}
