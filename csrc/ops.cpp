// Operator schemas of the ctpo_megatron extension. Kernels register per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL), so CPU/CUDA dispatch, opcheck and
// torch.compile go through the torch dispatcher rather than Python branches.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// Importing ctpo_megatron._C loads this library and thereby registers the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace ctpo {
#ifndef CTPO_CUDA_SKIPPED
#define CTPO_CUDA_SKIPPED unknown
#endif
#define CTPO_STR_(x) #x
#define CTPO_STR(x) CTPO_STR_(x)

// "backends=cpu[,cuda];cuda_skipped=<why setup.py left CUDA out>", reported by
// `python -m ctpo_megatron.ops`.
std::string build_info() {
#ifdef CTPO_WITH_CUDA
  return "backends=cpu,cuda";
#else
  return std::string("backends=cpu;cuda_skipped=") + CTPO_STR(CTPO_CUDA_SKIPPED);
#endif
}
}  // namespace ctpo

TORCH_LIBRARY(ctpo_megatron, m) {
  m.def("build_info() -> str", &ctpo::build_info);
  // Inclusive prefix sums of mask * values and of mask within each segment (padded rows of a
  // [B, S] tensor, or [T] packed by int32 cu_seqlens [N+1]), starting from the optional float64
  // per-segment carries; reverse=True scans from the end of each segment. mask=None means ones.
  // Returns (cum, count): float32 for 16-bit values, else values' dtype.
  m.def(
      "segmented_scan(Tensor values, Tensor? mask, Tensor? cu_seqlens, Tensor? carry_sum, "
      "Tensor? carry_count, bool reverse) -> (Tensor, Tensor)");
  // Fused per-token CTPO terms of a [B, S] padded (or [T] packed) batch. Scans the clamped
  // log-ratios of valid tokens (mask > 0) per sequence, or takes precomputed prefix sums
  // cum/count (e.g. global ones under context parallelism). Returns (pg_loss, dpg_dlogp,
  // ratio, log_ratio, la_scale, clip_high, clip_low, clip_dual, clipped): per token the
  // surrogate, its derivative with respect to log_probs, exp(min(s_t, 10)), the clamped
  // log-ratio d_t, the LA scale (empty unless adaptive) and four bool clip masks.
  // adaptive=True: clip_low/high/c are la_low/la_high/la_c with scale max(n_t, 1)^power;
  // adaptive=False: eps_low, eps_high and the constant dual bound clip_ratio_c.
  m.def(
      "ctpo_token_loss(Tensor log_probs, Tensor old_log_probs, Tensor advantages, Tensor mask, "
      "Tensor? cu_seqlens, Tensor? cum, Tensor? count, bool geomean, bool adaptive, float clip_low, "
      "float clip_high, float clip_c, float power) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ctpo_token_loss of a padded [..., S] float32/float64 batch (no cu_seqlens, no given prefix
  // sums) and, as an 11th output, the metric values of its terms: loss_stats_metrics with the
  // running positions and, when adaptive, la_power = power. One pass: the statistics read each
  // tile of terms right after the kernel wrote it. CPU only.
  m.def(
      "ctpo_token_loss_metrics(Tensor log_probs, Tensor old_log_probs, Tensor advantages, Tensor mask, "
      "bool geomean, bool adaptive, float clip_low, float clip_high, float clip_c, float power, "
      "int[] bucket_edges, float[] exp_coeffs, int hist_shift, int hist_first, "
      "int hist_bins, float[] qs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ctpo_token_loss of a padded [..., S] float32/float64 batch and, as outputs 10 and 11, the
  // loss_stats (sums, maxima) of its terms with the running positions and, when adaptive,
  // la_power = power: the trainer's per-micro-batch statistics from the same one pass as
  // ctpo_token_loss_metrics. CPU only.
  m.def(
      "ctpo_token_loss_stats(Tensor log_probs, Tensor old_log_probs, Tensor advantages, Tensor mask, "
      "bool geomean, bool adaptive, float clip_low, float clip_high, float clip_c, float power, "
      "int[] bucket_edges, float[] exp_coeffs, int hist_shift, int hist_first, "
      "int hist_bins) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The additive statistics of a micro-batch's policy-loss terms (algo.stats.LossSums) in one
  // pass over its valid tokens, as two float64 vectors. sums: the counts and sums (SumSlot in
  // csrc/include/ctpo/loss_stats.h), one sum of exp(c * la_scale) per exp_coeffs entry, the
  // log-bin histograms of ratio and la_scale (bins by float32 bits >> hist_shift - hist_first,
  // clamped to [0, hist_bins)), then clipped and valid tokens per position bucket
  // (bucket k holds n_t in [bucket_edges[k], bucket_edges[k + 1]), the last one up from its edge,
  // n_t below the first edge are left out; n_t = positions, or the running count of valid tokens
  // along the last dimension), len(bucket_edges) each. maxima: max and -min of ratio and la_scale (MaxSlot).
  // The LA scale statistics come from la_scale per token, or with la_power from g_t =
  // max(n_t, 1)^la_power (what the loss computed, when n_t is its count), per position.
  m.def(
      "loss_stats(Tensor valid, Tensor advantages, Tensor ratio, Tensor log_ratio, Tensor? la_scale, float? la_power, "
      "Tensor clip_high, Tensor clip_low, Tensor clip_dual, Tensor clipped, Tensor? positions, "
      "int[] bucket_edges, float[] exp_coeffs, int hist_shift, int hist_first, "
      "int hist_bins) -> (Tensor, Tensor)");
  // torch.quantile-style quantiles (float64 [len(qs)]) of the values counted in a float64
  // log-bin histogram laid out as loss_stats' (bin b holds [float(b + hist_first << hist_shift),
  // float(b + 1 + hist_first << hist_shift))), each order statistic spread evenly over its
  // bin; lo/hi: the exact extremes, if known (results are clamped to them); total: the sum of
  // counts, if known. CPU only: the histograms are on the host by then.
  m.def(
      "histogram_quantiles(Tensor counts, float[] qs, float? lo, float? hi, float? total, int hist_shift, "
      "int hist_first) -> Tensor");
  // The metric values of a loss_stats result (float64 [17 + len(qs) + 4 + num_exp + num_buckets],
  // in the order of algo.stats.METRIC_KEYS; algo.stats.LossSums.metrics defines them): loss is
  // the summed loss, num_updates divides the per-update values; the LA values are 0 unless
  // adaptive_clip and a valid token; a position bucket without tokens has rate NaN. CPU only.
  m.def(
      "loss_metrics(Tensor sums, Tensor maxima, float loss, int num_exp, int num_buckets, int num_updates, "
      "bool adaptive_clip, float[] qs, int hist_shift, int hist_first, int hist_bins) -> Tensor");
  // loss_stats, then loss_metrics of its result (loss 0, one update): one micro-batch's metric
  // values in one call (algo.stats.policy_metrics). CPU only.
  m.def(
      "loss_stats_metrics(Tensor valid, Tensor advantages, Tensor ratio, Tensor log_ratio, Tensor? la_scale, "
      "float? la_power, Tensor clip_high, Tensor clip_low, Tensor clip_dual, Tensor clipped, Tensor? positions, "
      "int[] bucket_edges, float[] exp_coeffs, int hist_shift, int hist_first, "
      "int hist_bins, float[] qs, bool adaptive_clip) -> Tensor");
}
