// The quantiles of a log-bin histogram (csrc/cpu/histogram.cpp), shared by the
// histogram_quantiles op and the loss metrics (csrc/cpu/loss_metrics.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <functional>
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

// Lower edge of bin b of the layout h: the float32 whose bits are (b + first) << shift (exact in
// float64); bin b holds [bin_lower_edge(b), bin_lower_edge(b + 1)).
double bin_lower_edge(int64_t b, const HistSpec& h);

// The values of the order statistics at the given ascending ranks (0-based, whole numbers
// below n), each spread evenly over its bin: (rank - tokens in the bins below + 0.5) / tokens
// in its bin of the way from the bin's lower to its upper edge.
using OrderStatistics = std::function<std::vector<double>(const std::vector<double>& ranks)>;

// The torch.quantile-style quantiles of n values from their order statistics (`find`): what
// histogram_quantile_values does once it has the counts' total, shared with quantiles whose
// counts are not a histogram (running_scale_quantile).
std::vector<double> quantiles_from_order_statistics(at::ArrayRef<double> qs, double n, c10::optional<double> lo,
                                                    c10::optional<double> hi, const OrderStatistics& find);

inline void check_quantiles(at::ArrayRef<double> qs, const char* what) {
  for (double q : qs) TORCH_CHECK(q >= 0.0 && q <= 1.0, what, ": quantile ", q, " is outside [0, 1]");
}

}  // namespace ctpo
