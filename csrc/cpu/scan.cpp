// CPU kernel of ctpo_megatron::segmented_scan: per-segment inclusive prefix sums of mask * values
// and of mask (forward or reverse), plus optional per-segment carries. float64 accumulation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "ctpo/cpu_segments.h"
#include "ctpo/layout.h"

namespace ctpo {
namespace {

template <typename scalar_t, typename out_t>
void scan_cpu_typed(const at::Tensor& values, const c10::optional<at::Tensor>& mask, const SegmentLayout& L,
                    const double* carry_sum, const double* carry_count, bool reverse, at::Tensor& cum,
                    at::Tensor& count) {
  const scalar_t* x = values.data_ptr<scalar_t>();
  const scalar_t* m = mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr;
  out_t* cum_p = cum.data_ptr<out_t>();
  out_t* cnt_p = count.data_ptr<out_t>();
  auto total = [&](int64_t b, int64_t e) {
    Carry t;
    for (int64_t i = b; i < e; ++i) {
      const double mi = m != nullptr ? static_cast<double>(m[i]) : 1.0;
      t.sum += mi * static_cast<double>(x[i]);
      t.count += mi;
    }
    return t;
  };
  auto scan = [&](int64_t, int64_t b, int64_t e, Carry c) {
    for (int64_t k = 0; k < e - b; ++k) {
      const int64_t i = reverse ? e - 1 - k : b + k;
      const double mi = m != nullptr ? static_cast<double>(m[i]) : 1.0;
      c.sum += mi * static_cast<double>(x[i]);
      c.count += mi;
      cum_p[i] = static_cast<out_t>(c.sum);
      cnt_p[i] = static_cast<out_t>(c.count);
    }
  };
  run_segments(L, carry_sum, carry_count, reverse, total, scan);
}

std::tuple<at::Tensor, at::Tensor> segmented_scan_cpu(const at::Tensor& values,
                                                      const c10::optional<at::Tensor>& mask,
                                                      const c10::optional<at::Tensor>& cu_seqlens,
                                                      const c10::optional<at::Tensor>& carry_sum,
                                                      const c10::optional<at::Tensor>& carry_count,
                                                      bool reverse) {
  constexpr const char* what = "ctpo_megatron::segmented_scan";
  check_scan_inputs(values, mask);
  const SegmentLayout L = parse_layout(values, cu_seqlens, what);
  check_cu_seqlens_cpu(L, what);
  const double* cs = carry_ptr(carry_sum, values, L, "carry_sum");
  const double* cn = carry_ptr(carry_count, values, L, "carry_count");
  const auto out_dtype = result_dtype(values.scalar_type());
  // Packed tokens past cu_seqlens[-1] (tail padding) belong to no segment and stay 0.
  const bool tail = L.cu != nullptr && L.cu[L.num_segments] < L.num_tokens;
  auto opts = values.options().dtype(out_dtype);
  at::Tensor cum = tail ? at::zeros_like(values, opts) : at::empty_like(values, opts);
  at::Tensor count = tail ? at::zeros_like(values, opts) : at::empty_like(values, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "segmented_scan_cpu", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scan_cpu_typed<scalar_t, out_t>(values, mask, L, cs, cn, reverse, cum, count);
  });
  return {cum, count};
}

}  // namespace
}  // namespace ctpo

TORCH_LIBRARY_IMPL(ctpo_megatron, CPU, m) {
  m.impl("segmented_scan", &ctpo::segmented_scan_cpu);
}
