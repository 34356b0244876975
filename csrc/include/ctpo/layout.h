// Segment layout of the scan and loss kernels: either padded rows `[B, S]` (one segment per
// row) or packed tokens `[T]` split by `cu_seqlens: [N+1] int32`. Both kernels read it the same
// way on CPU and CUDA; the host-side parse validates shapes, dtypes and carries.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "ctpo/checks.h"

namespace ctpo {

struct SegmentLayout {
  int64_t num_segments = 0;
  int64_t row_len = 0;           // padded layout: tokens per row; unused when packed
  int64_t num_tokens = 0;        // total elements of the value tensor
  const int32_t* cu = nullptr;   // packed layout: [num_segments + 1] offsets; nullptr = padded
};

// Parses `values` ([B, S] padded, or [T] with cu_seqlens, or [T] alone = one segment) and checks
// the optional per-segment carries (`[num_segments]` float64). `what` names the op in errors.
inline SegmentLayout parse_layout(const at::Tensor& values, const c10::optional<at::Tensor>& cu_seqlens,
                                  const char* what) {
  SegmentLayout layout;
  layout.num_tokens = values.numel();
  if (cu_seqlens.has_value()) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(values.dim() == 1, what, ": packed input (cu_seqlens given) must be 1-D [T], got shape ",
                values.sizes());
    TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, what, ": cu_seqlens must be 1-D [N+1], got shape ",
                cu.sizes());
    TORCH_CHECK(cu.scalar_type() == at::kInt, what, ": cu_seqlens must be int32, got ", cu.scalar_type());
    CTPO_CHECK_CONTIGUOUS(cu);
    CTPO_CHECK_SAME_DEVICE(cu, values);
    layout.num_segments = cu.numel() - 1;
    layout.cu = cu.data_ptr<int32_t>();
  } else {
    TORCH_CHECK(values.dim() == 1 || values.dim() == 2, what,
                ": padded input must be [B, S] (or [T] for one sequence), got shape ", values.sizes());
    layout.num_segments = values.dim() == 2 ? values.size(0) : 1;
    layout.row_len = values.dim() == 2 ? values.size(1) : values.numel();
  }
  return layout;
}

// Checks the scan's values (floating, contiguous) and optional mask (shape, dtype and device
// of values, contiguous); shared by the CPU and CUDA kernels.
inline void check_scan_inputs(const at::Tensor& values, const c10::optional<at::Tensor>& mask) {
  CTPO_CHECK_FLOATING(values);
  CTPO_CHECK_CONTIGUOUS(values);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.sizes() == values.sizes(), "mask must have the shape of values ", values.sizes(), ", got ",
                m.sizes());
    TORCH_CHECK(m.scalar_type() == values.scalar_type(), "mask must have the dtype of values (",
                values.scalar_type(), "), got ", m.scalar_type());
    TORCH_CHECK(m.device() == values.device(), "mask must be on the device of values (", values.device(),
                "), got ", m.device());
    TORCH_CHECK(m.is_contiguous(), "mask must be contiguous");
  }
}

// Checks one optional carry tensor: float64, contiguous, [num_segments], on the values' device.
inline const double* carry_ptr(const c10::optional<at::Tensor>& carry, const at::Tensor& values,
                               const SegmentLayout& layout, const char* name) {
  if (!carry.has_value()) return nullptr;
  const at::Tensor& c = *carry;
  TORCH_CHECK(c.scalar_type() == at::kDouble, name, " must be float64, got ", c.scalar_type());
  TORCH_CHECK(c.dim() == 1 && c.numel() == layout.num_segments, name, " must have shape [",
              layout.num_segments, "] (one value per sequence), got ", c.sizes());
  TORCH_CHECK(c.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(c.device() == values.device(), name, " must be on ", values.device(), ", got ", c.device());
  return c.data_ptr<double>();
}

// Accumulated results are float32 for 16-bit inputs and the input dtype otherwise.
inline at::ScalarType result_dtype(at::ScalarType in) {
  return (in == at::kHalf || in == at::kBFloat16) ? at::kFloat : in;
}

}  // namespace ctpo
