// The quantiles of a log-bin histogram (csrc/cpu/histogram.cpp), shared by the
// histogram_quantiles op and the loss metrics (csrc/cpu/loss_metrics.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>

#include "ctpo/loss_stats.h"

namespace ctpo {

// torch.quantile-style quantiles of the values counted in counts[0 .. bins) (float64, the
// layout h), each order statistic spread evenly over its bin; lo/hi: the exact extremes, if
// known (results are clamped to them); total: the sum of counts, if known. 0.0 each when the
// counts are empty.
std::vector<double> histogram_quantile_values(const double* counts, int64_t bins, at::ArrayRef<double> qs,
                                              c10::optional<double> lo, c10::optional<double> hi,
                                              c10::optional<double> total, const HistSpec& h);

inline void check_quantiles(at::ArrayRef<double> qs, const char* what) {
  for (double q : qs) TORCH_CHECK(q >= 0.0 && q <= 1.0, what, ": quantile ", q, " is outside [0, 1]");
}

}  // namespace ctpo
