// CPU kernel of ctpo_megatron::loss_stats: one pass over the valid tokens of a micro-batch's
// loss terms accumulates the counts, sums, extremes, the two log-bin histograms and the token
// and clip counts per position bucket (float64), in parallel over chunks of rows. With
// la_power, the LA scale's statistics are taken per position instead of per token (see
// PositionWeights).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "ctpo/fast_exp.h"
#include "ctpo/histogram_quantiles.h"
#include "ctpo/loss_stats.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define CTPO_X86_AVX512_TILE 1
#else
#define CTPO_X86_AVX512_TILE 0
#endif

namespace ctpo {
namespace {

constexpr int64_t kByteLanes = 64;
static_assert(kStatsTile / kByteLanes <= 255, "a byte lane must not overflow");
constexpr int64_t kTokensPerChunk = 32768;  // below this, waking a thread costs more than it saves

template <typename T>
struct StatsArgs {
  const bool* valid;
  const T* adv;
  const T* ratio;
  const T* log_ratio;
  const T* scale;  // per-token LA scales; nullptr without LA or with la_power
  const bool* high;
  const bool* low;
  const bool* dual;
  const bool* clipped;
  const int64_t* positions;  // nullptr: the running count of valid tokens in the row
  const int64_t* bucket_edges;  // [num_buckets], strictly increasing, >= 1
  int64_t num_buckets;
  std::vector<double> exp_coeffs;  // distinct coefficients: sums of exp(c g) go to kExpSums + their index
  HistSpec hist;
  int64_t row_len;
  bool la_from_positions;  // LA statistics of g = la_scale(n_t, la_power), per position
  double la_power;
  const RunningTables* running = nullptr;  // running positions: per-row statistics from tables
  const TileProducer* before_tile = nullptr;
};

// One chunk's accumulators (sections of a sums vector in StatsLayout, and the maxima); the first
// chunk writes straight into the outputs.
struct StatsAcc {
  double* scalars;
  double* ratio_hist;
  double* scale_hist;
  double* pos_clipped;
  double* pos_tokens;
  double* maxima;
  mutable BinRange ratio_bins, scale_bins;  // the histogram bins written
  std::vector<int64_t>* running_rows = nullptr;  // set: LA rows go here, not into scale_hist

  StatsAcc(double* sums, double* max_slots, const StatsLayout& l)
      : scalars(sums),
        ratio_hist(sums + l.ratio_hist),
        scale_hist(sums + l.scale_hist),
        pos_clipped(sums + l.pos_clipped),
        pos_tokens(sums + l.pos_tokens),
        maxima(max_slots) {}
};

// Per tile of kStatsTile tokens: the sums, counts and extremes in SIMD loops (reduction in T:
// exact for counts, float32 rounding over at most 256 values for sums), added into float64 per
// tile. A float64 accumulator per token would chain its 4-cycle add latency through the whole
// row, and a branch per token on a random mask mispredicts.
struct TileSums {
  double tokens = 0, neg_adv = 0, high = 0, low = 0, dual = 0, any = 0, clipped = 0;
  double neg_log_ratio = 0, ratio_sum = 0, scale_sum = 0;
  double ratio_max, ratio_min, scale_max, scale_min;
};

// Counts of one tile, for the position buckets.
struct TileCounts {
  int32_t tokens, clipped_any;
};

// Sum, max and min of the valid entries of a tile (max over them and 0, min +inf if none).
// The masked values go to buffers first: with the selects inside the reduction loop, the
// masked loads kept GCC's AVX-512 build scalar (2.6x slower).
template <typename T>
CTPO_CPU_CLONES void masked_sum_max_min(const uint8_t* __restrict__ v, const T* __restrict__ x, int64_t n,
                                        double& sum, double& top, double& bottom) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  T zero_masked[kStatsTile], inf_masked[kStatsTile];
  for (int64_t k = 0; k < n; ++k) {
    const T value = x[k];
    const bool ok = v[k] != 0;
    zero_masked[k] = ok ? value : T(0);
    inf_masked[k] = ok ? value : inf;
  }
  T s = 0, hi = 0, lo = inf;
#pragma omp simd reduction(+ : s) reduction(max : hi) reduction(min : lo)
  for (int64_t k = 0; k < n; ++k) {
    s += zero_masked[k];
    hi = std::max(hi, zero_masked[k]);
    lo = std::min(lo, inf_masked[k]);
  }
  sum += s;
  top = std::max<double>(top, hi);
  bottom = std::min<double>(bottom, lo);
}

template <typename T>
CTPO_CPU_CLONES TileCounts tile_sums(const StatsArgs<T>& a, int64_t i0, int64_t n, TileSums& acc) {
  // Flags read as bytes: loads of `bool` kept the count loop scalar (7x slower with AVX2).
  auto bytes = [&](const bool* p) { return reinterpret_cast<const uint8_t*>(p + i0); };
  const uint8_t* __restrict__ v = bytes(a.valid);
  const T* __restrict__ adv = a.adv + i0;
  const T* __restrict__ lr = a.log_ratio + i0;
  const uint8_t* __restrict__ hi = bytes(a.high);
  const uint8_t* __restrict__ lo = bytes(a.low);
  const uint8_t* __restrict__ du = bytes(a.dual);
  const uint8_t* __restrict__ cl = bytes(a.clipped);
  // The flags are counted in byte lanes, each summing at most kStatsTile / kByteLanes flags:
  // an int32 count per flag widened every byte to 32 bits in the loop (most of the tile's
  // time); here the loop adds bytes and only the lanes are widened, once per tile. Float
  // sums have their own SIMD loop: one loop with all the reductions stayed scalar.
  uint8_t lane_tokens[kByteLanes] = {}, lane_high[kByteLanes] = {}, lane_low[kByteLanes] = {},
          lane_dual[kByteLanes] = {}, lane_any[kByteLanes] = {}, lane_clipped[kByteLanes] = {};
  int64_t k0 = 0;
  for (; k0 + kByteLanes <= n; k0 += kByteLanes) {
    for (int64_t j = 0; j < kByteLanes; ++j) {
      const uint8_t valid = v[k0 + j];
      lane_tokens[j] += valid;
      lane_high[j] += valid & hi[k0 + j];
      lane_low[j] += valid & lo[k0 + j];
      lane_dual[j] += valid & du[k0 + j];
      lane_any[j] += valid & (hi[k0 + j] | lo[k0 + j] | du[k0 + j]);
      lane_clipped[j] += valid & cl[k0 + j];
    }
  }
  int32_t tokens = 0, neg_adv = 0, high = 0, low = 0, dual = 0, any = 0, clipped = 0;
  for (int64_t j = 0; j < kByteLanes; ++j) {
    tokens += lane_tokens[j];
    high += lane_high[j];
    low += lane_low[j];
    dual += lane_dual[j];
    any += lane_any[j];
    clipped += lane_clipped[j];
  }
  for (int64_t k = k0; k < n; ++k) {
    const int32_t valid = v[k];
    tokens += valid;
    high += valid & hi[k];
    low += valid & lo[k];
    dual += valid & du[k];
    any += valid & (hi[k] | lo[k] | du[k]);
    clipped += valid & cl[k];
  }
  for (int64_t k = 0; k < n; ++k) neg_adv += static_cast<int32_t>(v[k]) & static_cast<int32_t>(adv[k] < T(0));
  T masked_lr[kStatsTile];
  for (int64_t k = 0; k < n; ++k) {
    const T value = lr[k];
    masked_lr[k] = v[k] ? value : T(0);
  }
  T nlr = 0;
#pragma omp simd reduction(+ : nlr)
  for (int64_t k = 0; k < n; ++k) nlr -= masked_lr[k];
  acc.tokens += tokens;
  acc.neg_adv += neg_adv;
  acc.high += high;
  acc.low += low;
  acc.dual += dual;
  acc.any += any;
  acc.clipped += clipped;
  acc.neg_log_ratio += nlr;
  masked_sum_max_min(v, a.ratio + i0, n, acc.ratio_sum, acc.ratio_max, acc.ratio_min);
  if (a.scale != nullptr) masked_sum_max_min(v, a.scale + i0, n, acc.scale_sum, acc.scale_max, acc.scale_min);
  return {tokens, any};
}

#if CTPO_X86_AVX512_TILE
#define CTPO_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,popcnt")))
// GCC 12's AVX-512 headers start some intrinsics from an undefined vector, which its
// uninitialized-use warnings flag (GCC PR 105593, fixed in later releases).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Bit k: the byte p[k] of the first 16 (those in `in`) is not 0.
CTPO_AVX512_TARGET inline __attribute__((always_inline)) __mmask16 nonzero_bytes(const uint8_t* p, __mmask16 in) {
  const __m128i bytes = _mm_maskz_loadu_epi8(in, p);
  return _mm_test_epi8_mask(bytes, bytes);
}

// 1 in each byte lane where the byte at p + lane (one of those in `in`) is not 0, else 0: flags
// that are bool bytes, read as 0 or 1 whatever their bit pattern.
CTPO_AVX512_TARGET inline __attribute__((always_inline)) __m512i flag_bytes(const uint8_t* p, __mmask64 in) {
  return _mm512_min_epu8(_mm512_maskz_loadu_epi8(in, p), _mm512_set1_epi8(1));
}

// The sum of the 64 unsigned bytes of x.
CTPO_AVX512_TARGET inline __attribute__((always_inline)) int64_t byte_sum(__m512i x) {
  return _mm512_reduce_add_epi64(_mm512_sad_epu8(x, _mm512_setzero_si512()));
}

// tile_sums, tile_bins and valid_bin_range of a float32 tile in one AVX-512 pass: the flags
// counted 64 tokens a step in byte lanes (bit masks and popcnt per 16 tokens took ~1.5x the
// instructions), then 16 tokens a step the float sums and extremes as masked vector
// operations, the bins computed and stored on the way. The
// generic loops read each tile's valid bytes six times and the ratios three, each loop with its
// own reductions; this one reads every input once (measured: `policy_metrics` on warm caches
// 0.207 -> 0.170 ms at 8 x 8192, 0.369 -> 0.290 ms at 1 x 131072). The extremes keep
// std::max(top, x)'s semantics (a NaN x leaves top), like the generic loops.
CTPO_AVX512_TARGET TileCounts tile_pass_avx512(
    const StatsArgs<float>& a, int64_t i0, int64_t n, TileSums& acc, int32_t* __restrict__ bins, int32_t& bin_lo,
    int32_t& bin_hi) {
  const uint8_t* v = reinterpret_cast<const uint8_t*>(a.valid + i0);
  const uint8_t* hi = reinterpret_cast<const uint8_t*>(a.high + i0);
  const uint8_t* lo = reinterpret_cast<const uint8_t*>(a.low + i0);
  const uint8_t* du = reinterpret_cast<const uint8_t*>(a.dual + i0);
  const uint8_t* cl = reinterpret_cast<const uint8_t*>(a.clipped + i0);
  const float* adv = a.adv + i0;
  const float* lr = a.log_ratio + i0;
  const float* ratio = a.ratio + i0;
  const __m512 zero = _mm512_setzero_ps();
  __m512 nlr = zero, rsum = zero, rmax = zero, rmin = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512i bmin = _mm512_set1_epi32(std::numeric_limits<int32_t>::max()), bmax = _mm512_set1_epi32(-1);
  const __m512i first = _mm512_set1_epi32(static_cast<int32_t>(a.hist.first));
  const __m512i last_bin = _mm512_set1_epi32(static_cast<int32_t>(a.hist.bins - 1));
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(a.hist.shift));
  // The flag counts kByteLanes tokens a step, in byte lanes (at most 4 per lane and tile).
  static_assert(kByteLanes == 64, "one __m512i of bytes a step");
  __m512i tokens8 = _mm512_setzero_si512(), high8 = tokens8, low8 = tokens8, dual8 = tokens8, any8 = tokens8,
          clipped8 = tokens8;
  for (int64_t k = 0; k < n; k += kByteLanes) {
    const __mmask64 in = n - k >= kByteLanes ? ~__mmask64(0) : (__mmask64(1) << (n - k)) - 1;
    const __m512i ok = flag_bytes(v + k, in);
    const __m512i h = _mm512_and_si512(flag_bytes(hi + k, in), ok), l = _mm512_and_si512(flag_bytes(lo + k, in), ok);
    const __m512i d = _mm512_and_si512(flag_bytes(du + k, in), ok);
    tokens8 = _mm512_add_epi8(tokens8, ok);
    high8 = _mm512_add_epi8(high8, h);
    low8 = _mm512_add_epi8(low8, l);
    dual8 = _mm512_add_epi8(dual8, d);
    any8 = _mm512_add_epi8(any8, _mm512_or_si512(_mm512_or_si512(h, l), d));
    clipped8 = _mm512_add_epi8(clipped8, _mm512_and_si512(flag_bytes(cl + k, in), ok));
  }
  const int64_t tokens = byte_sum(tokens8), high = byte_sum(high8), low = byte_sum(low8), dual = byte_sum(dual8),
                any = byte_sum(any8), clipped = byte_sum(clipped8);
  int64_t neg_adv = 0;
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 in = n - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1u);
    const __mmask16 ok = nonzero_bytes(v + k, in);
    const __m512 adv_k = _mm512_maskz_loadu_ps(in, adv + k);
    neg_adv += _mm_popcnt_u32(_mm512_mask_cmp_ps_mask(ok, adv_k, zero, _CMP_LT_OQ));
    nlr = _mm512_mask_sub_ps(nlr, ok, nlr, _mm512_maskz_loadu_ps(in, lr + k));
    const __m512 r = _mm512_maskz_loadu_ps(in, ratio + k);
    rsum = _mm512_mask_add_ps(rsum, ok, rsum, r);
    rmax = _mm512_mask_max_ps(rmax, ok, r, rmax);  // max(x, top): top when x is NaN
    rmin = _mm512_mask_min_ps(rmin, ok, r, rmin);
    // hist_bin: arithmetic shift of the bits (negative floats give negative bins), clamped.
    __m512i bin = _mm512_sub_epi32(_mm512_sra_epi32(_mm512_castps_si512(r), shift), first);
    bin = _mm512_min_epi32(_mm512_max_epi32(bin, _mm512_setzero_si512()), last_bin);
    _mm512_mask_storeu_epi32(bins + k, in, bin);
    bmin = _mm512_mask_min_epi32(bmin, ok, bmin, bin);
    bmax = _mm512_mask_max_epi32(bmax, ok, bmax, bin);
  }
  acc.tokens += static_cast<double>(tokens);
  acc.neg_adv += static_cast<double>(neg_adv);
  acc.high += static_cast<double>(high);
  acc.low += static_cast<double>(low);
  acc.dual += static_cast<double>(dual);
  acc.any += static_cast<double>(any);
  acc.clipped += static_cast<double>(clipped);
  acc.neg_log_ratio += _mm512_reduce_add_ps(nlr);
  acc.ratio_sum += _mm512_reduce_add_ps(rsum);
  // Lanes without a valid token hold 0 and inf: neutral, as in masked_sum_max_min.
  acc.ratio_max = std::max<double>(acc.ratio_max, _mm512_reduce_max_ps(rmax));
  acc.ratio_min = std::min<double>(acc.ratio_min, _mm512_reduce_min_ps(rmin));
  bin_lo = std::min(bin_lo, _mm512_reduce_min_epi32(bmin));
  bin_hi = std::max(bin_hi, _mm512_reduce_max_epi32(bmax));
  return {static_cast<int32_t>(tokens), static_cast<int32_t>(any)};
}

#pragma GCC diagnostic pop

// Whether this CPU runs tile_pass_avx512 (checked once). CTPO_CPU_GENERIC_STATS=1 turns it off, so
// that the tests can run the generic loops on a machine with AVX-512 too.
bool has_avx512_tile_pass() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("popcnt") &&
                                std::getenv("CTPO_CPU_GENERIC_STATS") == nullptr;
  return supported;
}
#endif

// sum over the tile's valid tokens of exp(c * g): the exp loop unmasked (no select: it
// vectorizes), then a masked SIMD sum.
template <typename T>
CTPO_CPU_CLONES double tile_exp_sum(const bool* valid_flags, const T* __restrict__ scale, int64_t n, double c) {
  using Exp = std::conditional_t<std::is_same_v<T, float>, FastExp, StdExp>;
  const Exp exp_fn;
  const T coeff = static_cast<T>(c);
  const uint8_t* __restrict__ valid = reinterpret_cast<const uint8_t*>(valid_flags);
  T buf[kStatsTile];
  for (int64_t k = 0; k < n; ++k) buf[k] = exp_fn(coeff * scale[k]);
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t k = 0; k < n; ++k) total += valid[k] ? buf[k] : T(0);
  return total;
}

// hist_bin of n values (a SIMD loop).
template <typename T>
CTPO_CPU_CLONES void tile_bins(const T* __restrict__ values, int64_t n, HistSpec h, int32_t* __restrict__ bins) {
  for (int64_t k = 0; k < n; ++k) bins[k] = static_cast<int32_t>(hist_bin(static_cast<float>(values[k]), h));
}

// Smallest and largest bin of the valid tokens (SIMD; lo > hi when there is none).
CTPO_CPU_CLONES void valid_bin_range(const int32_t* __restrict__ bins, const uint8_t* __restrict__ valid, int64_t n,
                                     int32_t& lo, int32_t& hi) {
  int32_t smallest = std::numeric_limits<int32_t>::max(), largest = -1;
  for (int64_t k = 0; k < n; ++k) {
    const int32_t keep = -static_cast<int32_t>(valid[k]);  // all ones or zero: no select in the loop
    smallest = std::min(smallest, (bins[k] & keep) | (std::numeric_limits<int32_t>::max() & ~keep));
    largest = std::max(largest, (bins[k] & keep) | (-1 & ~keep));
  }
  lo = std::min(lo, smallest);
  hi = std::max(hi, largest);
}

// out[b] += c0[b] + c1[b] + c2[b] + c3[b] for b in [lo, hi], zeroing the counts (SIMD: the
// scalar loop took ~45 us per call for the ~20k bins the benchmark's ratios span).
CTPO_CPU_CLONES void add_and_clear_counts(int32_t* __restrict__ c0, int32_t* __restrict__ c1, int32_t* __restrict__ c2,
                                          int32_t* __restrict__ c3, int64_t lo, int64_t hi, double* __restrict__ out) {
  for (int64_t b = lo; b <= hi; ++b) {
    out[b] += static_cast<double>(c0[b] + c1[b] + c2[b] + c3[b]);
    c0[b] = c1[b] = c2[b] = c3[b] = 0;
  }
}

// A histogram's counts in int32, in a buffer per thread that stays zero between calls: only the
// bins a chunk touched are added to the float64 output and cleared again. A float64 increment
// in memory per token chained its add through the previous one's store when neighbours share a
// bin: int32 adds are ~1.7x faster. Token k counts into array k % kCountArrays, the arrays summed
// when flushed, so that an add does not wait for a neighbour's store to the same bin. Measured
// in ctpo_token_loss_metrics (the ratio histogram's scatter per call, 1 thread, against merging
// two neighbours that share a bin into one add): 1 x 131072 random-walk ratios 0.125 -> 0.094
// ms, on-policy ratios (every token in one bin) 0.208 -> 0.099 ms; two arrays gave 0.094 and
// 0.140 ms.
class BinCounts {
 public:
  static constexpr int64_t kCountArrays = 4;

  BinCounts(std::vector<int32_t>& buffer, int64_t bins) : buffer_(buffer), stride_(bins) {
    if (static_cast<int64_t>(buffer_.size()) < kCountArrays * bins) buffer_.assign(kCountArrays * bins, 0);
  }
  // Counts not flushed (an error left the chunk) are dropped: the next call starts from zeros.
  ~BinCounts() {
    for (int64_t j = 0; j < kCountArrays; ++j) {
      for (int32_t b = lo_; b <= hi_; ++b) buffer_[j * stride_ + b] = 0;
    }
  }
  // Adds valid[k] to the bin of each of n tokens. Only the valid tokens' bins can change, so
  // only they widen the range that flush walks (invalid ones, ratio 0, would stretch it down to
  // bin 0).
  void add(const int32_t* bins, const uint8_t* valid, int64_t n) {
    valid_bin_range(bins, valid, n, lo_, hi_);
    scatter(bins, valid, n);
  }
  // add, with the smallest and largest bin of the valid tokens already known.
  void add(const int32_t* bins, const uint8_t* valid, int64_t n, int32_t lo, int32_t hi) {
    lo_ = std::min(lo_, lo);
    hi_ = std::max(hi_, hi);
    scatter(bins, valid, n);
  }
  // Adds the counts into out and zeroes them; `written` takes their bins.
  void flush(double* out, BinRange& written) {
    if (lo_ <= hi_) written.add(lo_, hi_);
    int32_t* c0 = buffer_.data();
    add_and_clear_counts(c0, c0 + stride_, c0 + 2 * stride_, c0 + 3 * stride_, lo_, hi_, out);
    lo_ = std::numeric_limits<int32_t>::max();
    hi_ = -1;
  }

 private:
  void scatter(const int32_t* bins, const uint8_t* valid, int64_t n) {
    static_assert(kCountArrays == 4, "the loops below unroll four arrays");
    int32_t* c0 = buffer_.data();
    int32_t *c1 = c0 + stride_, *c2 = c1 + stride_, *c3 = c2 + stride_;
    int64_t k = 0;
    for (; k + 3 < n; k += 4) {
      c0[bins[k]] += valid[k];
      c1[bins[k + 1]] += valid[k + 1];
      c2[bins[k + 2]] += valid[k + 2];
      c3[bins[k + 3]] += valid[k + 3];
    }
    for (; k < n; ++k) c0[bins[k]] += valid[k];
  }

  std::vector<int32_t>& buffer_;  // kCountArrays arrays of stride_ bins
  const int64_t stride_;
  int32_t lo_ = std::numeric_limits<int32_t>::max(), hi_ = -1;
};

// A chunk flushes its int32 counts at least this often, far below int32 overflow.
constexpr int64_t kFlushTokens = int64_t{1} << 30;

// The position-bucket counts of a chunk: consecutive tokens usually share a bucket, so the
// counts are kept in registers and written when the bucket changes.
struct BucketRun {
  const int64_t num_buckets;  // buckets >= this are left out (positions below the first edge)
  int64_t bucket = -1, tokens = 0, clipped = 0;

  void add(int64_t b, int64_t add_tokens, int64_t add_clipped, const StatsAcc& acc) {
    if (b != bucket) {
      flush(acc);
      bucket = b;
    }
    tokens += add_tokens;
    clipped += add_clipped;
  }
  void flush(const StatsAcc& acc) {
    if (bucket >= 0 && bucket < num_buckets) {
      acc.pos_tokens[bucket] += static_cast<double>(tokens);
      acc.pos_clipped[bucket] += static_cast<double>(clipped);
    }
    tokens = clipped = 0;
  }
};

// Smallest and largest position of the tile's valid tokens (SIMD).
template <typename T>
CTPO_CPU_CLONES void position_range(const StatsArgs<T>& a, int64_t i0, int64_t n, int64_t& first, int64_t& last) {
  const uint8_t* __restrict__ v = reinterpret_cast<const uint8_t*>(a.valid + i0);
  const int64_t* __restrict__ pos = a.positions + i0;
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t p = pos[k];
    lo = std::min(lo, v[k] ? p : std::numeric_limits<int64_t>::max());
    hi = std::max(hi, v[k] ? p : std::numeric_limits<int64_t>::min());
  }
  first = lo;
  last = hi;
}

// The position bucket of position p: k where bucket_edges[k] <= p < bucket_edges[k + 1] (the
// last bucket has no upper edge), or num_buckets (left out) below the first edge. A search in
// the K edges, which stay in L1: a lookup table per position (1 MB at 131072 positions) missed
// the cache on every tile, after the loss had streamed its outputs through it.
template <typename T>
int64_t bucket_of(const StatsArgs<T>& a, int64_t p) {
  const int64_t* edges = a.bucket_edges;
  if (p < edges[0]) return a.num_buckets;
  return std::upper_bound(edges + 1, edges + a.num_buckets, p) - edges - 1;
}

// The last position of `bucket` (INT64_MAX for the last one, which has no upper edge).
template <typename T>
int64_t bucket_end(const StatsArgs<T>& a, int64_t bucket) {
  if (bucket == a.num_buckets) return a.bucket_edges[0] - 1;
  return bucket + 1 < a.num_buckets ? a.bucket_edges[bucket + 1] - 1 : std::numeric_limits<int64_t>::max();
}

// add_positions of a tile that crosses a bucket edge, with running positions: its valid tokens
// hold positions count + 1, count + 2, ... in order, so the tile is cut where a bucket's run of
// positions ends, and only the tokens up to the last cut are walked (adding their clip flags);
// the rest go in at once from the tile's counts.
template <typename T>
void add_running_positions(const StatsArgs<T>& a, int64_t i0, int64_t count, TileCounts tile, BucketRun& run,
                           const StatsAcc& acc) {
  const uint8_t* v = reinterpret_cast<const uint8_t*>(a.valid + i0);
  const uint8_t* high = reinterpret_cast<const uint8_t*>(a.high + i0);
  const uint8_t* low = reinterpret_cast<const uint8_t*>(a.low + i0);
  const uint8_t* dual = reinterpret_cast<const uint8_t*>(a.dual + i0);
  const int64_t last = count + tile.tokens;
  int64_t pos = count, clipped_before = 0, k = 0;  // pos: the position of the last valid token added
  while (true) {
    const int64_t bucket = bucket_of(a, pos + 1), end = bucket_end(a, bucket);
    if (end >= last) {
      run.add(bucket, last - pos, tile.clipped_any - clipped_before, acc);
      return;
    }
    int64_t clipped = 0;
    for (int64_t need = end - pos; need > 0; ++k) {  // the tile holds them: end < last
      const int64_t valid = v[k];
      need -= valid;
      clipped += valid & (high[k] | low[k] | dual[k]);
    }
    run.add(bucket, end - pos, clipped, acc);
    clipped_before += clipped;
    pos = end;
  }
}

// Adds a tile's tokens to the position buckets. `count`: valid tokens of the row before the
// tile. The buckets are ranges of positions (the "left out" one too: those below the first
// edge), so when the tile's first and last valid positions share a bucket, every position
// between them does, and the tile's counts go in at once. Only tiles that cross a bucket edge
// (a few per row) are walked token by token.
template <typename T>
void add_positions(const StatsArgs<T>& a, int64_t i0, int64_t n, int64_t count, TileCounts tile, BucketRun& run,
                   const StatsAcc& acc) {
  if (tile.tokens == 0) return;
  int64_t first, last;
  if (a.positions == nullptr) {
    first = count + 1;
    last = count + tile.tokens;
  } else {
    position_range(a, i0, n, first, last);
  }
  const int64_t bucket = bucket_of(a, first);
  if (bucket == bucket_of(a, last)) {
    run.add(bucket, tile.tokens, tile.clipped_any, acc);
    return;
  }
  if (a.positions == nullptr) {
    add_running_positions(a, i0, count, tile, run, acc);
    return;
  }
  // Without a branch on the (random) mask: an invalid token adds 0 to the current bucket.
  const uint8_t* v = reinterpret_cast<const uint8_t*>(a.valid + i0);
  const uint8_t* high = reinterpret_cast<const uint8_t*>(a.high + i0);
  const uint8_t* low = reinterpret_cast<const uint8_t*>(a.low + i0);
  const uint8_t* dual = reinterpret_cast<const uint8_t*>(a.dual + i0);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t valid = v[k];
    const int64_t at_position = bucket_of(a, a.positions[i0 + k]);
    const int64_t bucket = valid ? at_position : run.bucket;
    run.add(bucket, valid, valid & (high[k] | low[k] | dual[k]), acc);
  }
}

// Largest position among a tile's valid tokens, negative ones counted as 0 (-1 if none).
CTPO_CPU_CLONES int64_t max_valid_position(const uint8_t* __restrict__ v, const int64_t* __restrict__ pos,
                                           int64_t n) {
  int64_t hi = -1;
  for (int64_t k = 0; k < n; ++k) hi = std::max(hi, v[k] ? std::max<int64_t>(pos[k], 0) : int64_t{-1});
  return hi;
}

// Positions above this are refused: the per-position weights would need that many entries.
constexpr int64_t kMaxLaPosition = int64_t{1} << 30;

// The LA scale g_t = la_scale(n_t) depends on the position n_t alone, so its statistics are
// those of the distinct positions, each weighted by its number of valid tokens: B rows of S
// tokens need S evaluations instead of B * S, and the la_scale tensor is not read at all.
// Running positions need no table: a row of c valid tokens holds positions 1..c once each, so
// position p has weight #{rows with c >= p}, read off the sorted row counts. Given positions
// are counted one by one into a per-thread table that stays zero between calls.
class PositionWeights {
 public:
  explicit PositionWeights(std::vector<int64_t>& table) : table_(table) {}
  ~PositionWeights() { clear(); }  // leaves the table zero, also when an error left the chunk

  void add_row(int64_t count) {
    TORCH_CHECK(count <= kMaxLaPosition, "ctpo_megatron::loss_stats: a row of ", count, " valid tokens is above ",
                kMaxLaPosition, "; pass la_scale instead of la_power");
    row_counts_.push_back(count);
    max_ = std::max(max_, count);
  }
  void add_tile(const uint8_t* v, const int64_t* pos, int64_t n) {
    const int64_t hi = max_valid_position(v, pos, n);
    if (hi < 0) return;
    TORCH_CHECK(hi <= kMaxLaPosition, "ctpo_megatron::loss_stats: position ", hi, " is above ", kMaxLaPosition,
                "; pass la_scale instead of la_power");
    if (hi >= static_cast<int64_t>(table_.size())) table_.resize(hi + 1, 0);
    max_ = std::max(max_, hi);
    int64_t* w = table_.data();
    for (int64_t k = 0; k < n; ++k) w[v[k] ? std::max<int64_t>(pos[k], 0) : 0] += v[k];
  }
  int64_t end() const { return max_ + 1; }  // positions with tokens are below this
  std::vector<int64_t>& row_counts() { return row_counts_; }  // running positions: valid tokens per row
  // The weights of positions p0 .. p0 + n - 1; calls come with increasing p0.
  void fill(int64_t p0, int64_t n, double* w) {
    if (row_counts_.empty()) {
      for (int64_t k = 0; k < n; ++k) w[k] = static_cast<double>(table_[p0 + k]);
      return;
    }
    if (!sorted_) {
      std::sort(row_counts_.begin(), row_counts_.end());
      sorted_ = true;
    }
    const int64_t rows = static_cast<int64_t>(row_counts_.size());
    int64_t k = 0;
    if (p0 == 0) w[k++] = 0.0;  // running positions start at 1
    while (k < n) {
      const int64_t p = p0 + k;
      while (shorter_ < rows && row_counts_[shorter_] < p) ++shorter_;
      // The weight stays until the next row ends.
      const int64_t until = shorter_ < rows ? std::min(row_counts_[shorter_] - p0 + 1, n) : n;
      std::fill(w + k, w + until, static_cast<double>(rows - shorter_));
      k = until;
    }
  }
  void clear() {
    if (row_counts_.empty() && max_ >= 0) std::fill(table_.begin(), table_.begin() + (max_ + 1), int64_t{0});
    row_counts_.clear();
    max_ = -1;
    sorted_ = false;
    shorter_ = 0;
  }

 private:
  std::vector<int64_t>& table_;
  std::vector<int64_t> row_counts_;
  int64_t max_ = -1;
  bool sorted_ = false;
  int64_t shorter_ = 0;  // rows with fewer valid tokens than the position being filled
};

// Sum (weighted), max and min of x over the entries with weight > 0 (as masked_sum_max_min).
// The weighted sum in float64: products of integer weights and T values are exact there, so the
// sum does not depend on how rows were split over threads beyond float64 rounding. The max/min
// reduction is written out again rather than shared with masked_sum_max_min: moved into a
// helper of its own (inlined or cloned), GCC left it scalar in both callers.
template <typename T>
CTPO_CPU_CLONES void weighted_sum_max_min(const double* __restrict__ w, const T* __restrict__ x, int64_t n,
                                          double& sum, double& top, double& bottom) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  T zero_masked[kStatsTile], inf_masked[kStatsTile];
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += w[k] * static_cast<double>(x[k]);
  for (int64_t k = 0; k < n; ++k) {
    const bool ok = w[k] > 0;
    zero_masked[k] = ok ? x[k] : T(0);
    inf_masked[k] = ok ? x[k] : inf;
  }
  T hi = 0, lo = inf;
#pragma omp simd reduction(max : hi) reduction(min : lo)
  for (int64_t k = 0; k < n; ++k) {
    hi = std::max(hi, zero_masked[k]);
    lo = std::min(lo, inf_masked[k]);
  }
  sum += s;
  top = std::max<double>(top, hi);
  bottom = std::min<double>(bottom, lo);
}

// sum of w * exp(c * g) over a tile, in float64 like weighted_sum_max_min; positions without
// tokens add 0 even where exp(c g) overflows.
template <typename T>
CTPO_CPU_CLONES double weighted_exp_sum(const double* __restrict__ w, const T* __restrict__ g, int64_t n, double c) {
  using Exp = std::conditional_t<std::is_same_v<T, float>, FastExp, StdExp>;
  const Exp exp_fn;
  const T coeff = static_cast<T>(c);
  T buf[kStatsTile];
  for (int64_t k = 0; k < n; ++k) buf[k] = exp_fn(coeff * g[k]);
  double total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t k = 0; k < n; ++k) total += w[k] > 0 ? w[k] * static_cast<double>(buf[k]) : 0.0;
  return total;
}

// g = la_scale(p) for positions p0 .. p0 + n - 1 (below kMaxLaPosition), rounded to T like the
// loss kernel's n_t. The powers la_scale special-cases get loops of their own (a constant
// power folds its branches away): with the branches in the loop, it ran scalar.
template <typename T>
CTPO_CPU_CLONES void tile_la_scales(int64_t p0, int64_t n, double power, T* __restrict__ g) {
  const int32_t first = static_cast<int32_t>(p0);
  auto fill = [&](double constant_power) {
    for (int32_t k = 0; k < static_cast<int32_t>(n); ++k) g[k] = la_scale(static_cast<T>(first + k), constant_power);
  };
  if (power == 0.5) {
    fill(0.5);
  } else if (power == -0.5) {
    fill(-0.5);
  } else if (power == 1.0) {
    fill(1.0);
  } else {
    fill(power);  // other powers, 0 included: the branches stay in the loop
  }
}

// The LA statistics of a chunk from its per-position weights: sums, extremes, exp sums and the
// histogram, per tile of positions.
template <typename T>
void la_position_stats(const StatsArgs<T>& a, PositionWeights& weights, TileSums& sums, const StatsAcc& acc) {
  double w[kStatsTile];
  T g[kStatsTile];
  int32_t bins[kStatsTile];
  const int64_t positions = weights.end();
  for (int64_t p0 = 0; p0 < positions; p0 += kStatsTile) {
    const int64_t n = std::min(kStatsTile, positions - p0);
    weights.fill(p0, n, w);
    if (std::all_of(w, w + n, [](double x) { return x == 0; })) continue;  // e.g. the gap between CP chunks
    tile_la_scales(p0, n, a.la_power, g);
    weighted_sum_max_min(w, g, n, sums.scale_sum, sums.scale_max, sums.scale_min);
    for (size_t c = 0; c < a.exp_coeffs.size(); ++c) {
      acc.scalars[kExpSums + c] += weighted_exp_sum(w, g, n, a.exp_coeffs[c]);
    }
    // Neighbouring positions mostly share a bin (g changes slowly): one add per run of them,
    // not a float64 add per position chained through the previous one's store. The run is
    // counted in int64 (the weights are whole numbers): a float64 running sum chained its
    // 4-cycle add through every position (a quarter of the kernel at 1 x 131072).
    tile_bins(g, n, a.hist, bins);
    int32_t bin = bins[0];
    int64_t run = 0;
    for (int64_t k = 0; k < n; ++k) {
      if (bins[k] != bin) {
        acc.scale_hist[bin] += static_cast<double>(run);
        acc.scale_bins.add(bin, bin);
        bin = bins[k];
        run = 0;
      }
      run += static_cast<int64_t>(w[k]);
    }
    acc.scale_hist[bin] += static_cast<double>(run);
    acc.scale_bins.add(bin, bin);
  }
}

// Running positions at most this long use RunningTables (at most 8 * (3 + kMaxExpCoeffs) bytes
// per position); longer rows are evaluated per position.
constexpr int64_t kMaxTablePositions = int64_t{1} << 20;

// With running positions, a row of c valid tokens holds positions 1..c once each, so its LA
// statistics are functions of c alone: prefix sums (float64), prefix extremes and the runs of
// equal histogram bins of g = la_scale(p), p = 1..P, built once per dtype (a cache each),
// power, coefficients and bin layout and shared by every later call. A chunk's LA statistics
// then cost O(rows + runs) (the runs are at most the bins g spans: ~8.7k for sqrt over 131072
// positions) instead of five SIMD loops over every position.
}  // namespace

struct RunningTables {
  double power;
  std::vector<double> coeffs;
  HistSpec hist;
  int64_t positions;            // P: tables cover rows of up to P valid tokens
  std::vector<double> g_sum;    // [P + 1]: sum of g over positions 1..c (g_sum[0] = 0)
  std::vector<std::vector<double>> exp_sum;  // per coefficient, [P + 1]: sum of exp(coeff g)
  std::vector<double> g_max, g_min;          // [P + 1]: extremes of g over 1..c (c >= 1)
  std::vector<int64_t> run_start;            // first position of each run of equal bins, then P + 1
  std::vector<int32_t> run_bin;
  int direction = 0;  // run_bin ascends (1) or descends (-1) with the position; 0: neither

  bool covers(double p, const std::vector<double>& c, HistSpec h, int64_t needed) const {
    return power == p && coeffs == c && hist.shift == h.shift && hist.first == h.first && hist.bins == h.bins &&
           positions >= needed;
  }
};

namespace {

template <typename T>
std::shared_ptr<const RunningTables> build_running_tables(double power, const std::vector<double>& coeffs,
                                                          HistSpec hist, int64_t positions) {
  using Exp = std::conditional_t<std::is_same_v<T, float>, FastExp, StdExp>;
  const Exp exp_fn;
  auto t = std::make_shared<RunningTables>();
  t->power = power;
  t->coeffs = coeffs;
  t->hist = hist;
  t->positions = positions;
  t->g_sum.assign(positions + 1, 0.0);
  t->exp_sum.assign(coeffs.size(), std::vector<double>(positions + 1, 0.0));
  t->g_max.assign(positions + 1, 0.0);
  t->g_min.assign(positions + 1, std::numeric_limits<double>::infinity());
  std::vector<T> g(kStatsTile);
  for (int64_t p0 = 1; p0 <= positions; p0 += kStatsTile) {
    const int64_t n = std::min(kStatsTile, positions + 1 - p0);
    tile_la_scales(p0, n, power, g.data());  // the values la_position_stats evaluates
    for (int64_t k = 0; k < n; ++k) {
      const int64_t p = p0 + k;
      const double value = static_cast<double>(g[k]);
      t->g_sum[p] = t->g_sum[p - 1] + value;
      t->g_max[p] = std::max(t->g_max[p - 1], value);
      t->g_min[p] = std::min(t->g_min[p - 1], value);
      for (size_t c = 0; c < coeffs.size(); ++c) {
        t->exp_sum[c][p] = t->exp_sum[c][p - 1] + static_cast<double>(exp_fn(static_cast<T>(coeffs[c]) * g[k]));
      }
      const int32_t bin = static_cast<int32_t>(hist_bin(static_cast<float>(g[k]), hist));
      if (t->run_bin.empty() || t->run_bin.back() != bin) {
        t->run_start.push_back(p);
        t->run_bin.push_back(bin);
      }
    }
  }
  t->run_start.push_back(positions + 1);
  // g is monotone in p, so its bins are, unless rounding made a step back somewhere.
  const auto& bins = t->run_bin;
  if (std::is_sorted(bins.begin(), bins.end())) {
    t->direction = 1;
  } else if (std::is_sorted(bins.rbegin(), bins.rend())) {
    t->direction = -1;
  }
  return t;
}

// The tables for rows of up to `row_len` valid tokens: the cached ones when they fit, else new
// ones (at least twice the old length, so a growing row length rebuilds O(log) times). Callers
// keep their pointer: a rebuild for another call never changes tables in use.
template <typename T>
std::shared_ptr<const RunningTables> running_tables(double power, const std::vector<double>& coeffs, HistSpec hist,
                                                    int64_t row_len) {
  static std::mutex mutex;
  static std::shared_ptr<const RunningTables> cached;  // one per T: the values are rounded to T
  std::lock_guard<std::mutex> lock(mutex);
  if (cached && cached->covers(power, coeffs, hist, row_len)) return cached;
  int64_t positions = 1024;
  while (positions < row_len) positions *= 2;
  if (cached && cached->covers(power, coeffs, hist, 0)) {
    positions = std::max(positions, std::min(2 * cached->positions, kMaxTablePositions));
  }
  cached = build_running_tables<T>(power, coeffs, hist, std::min(positions, kMaxTablePositions));
  return cached;
}

// The LA statistics of a chunk's rows with running positions, from the tables: sums, extremes
// and exp sums per row, the histogram per run of equal bins (tokens at positions s..e-1 over
// all rows: T(e-1) - T(s-1) with T(x) = sum over rows of min(c_r, x), walked along the sorted
// row counts). Integer token counts, float64 sums: equal to la_position_stats to rounding.
void la_running_stats(const RunningTables& t, std::vector<int64_t>& row_counts, double* scalars, TileSums& sums,
                      double* scale_hist, BinRange& written, bool histogram) {
  std::sort(row_counts.begin(), row_counts.end());
  const auto first_row = std::upper_bound(row_counts.begin(), row_counts.end(), int64_t{0});
  if (first_row == row_counts.end()) return;  // no valid token
  for (auto it = first_row; it != row_counts.end(); ++it) {
    const int64_t c = *it;
    sums.scale_sum += t.g_sum[c];
    for (size_t k = 0; k < t.coeffs.size(); ++k) scalars[kExpSums + k] += t.exp_sum[k][c];
  }
  const int64_t longest = row_counts.back();
  sums.scale_max = std::max(sums.scale_max, t.g_max[longest]);  // prefix extremes: the longest row has them all
  sums.scale_min = std::min(sums.scale_min, t.g_min[longest]);
  if (!histogram) return;
  const int64_t rows = static_cast<int64_t>(row_counts.size());
  int64_t ended = first_row - row_counts.begin(), ended_tokens = 0;  // rows with c_r <= x, and their tokens
  auto tokens_up_to = [&](int64_t x) {
    while (ended < rows && row_counts[ended] <= x) ended_tokens += row_counts[ended++];
    return ended_tokens + x * (rows - ended);
  };
  int64_t before = 0;  // T(s - 1) of the current run
  for (size_t k = 0; k + 1 < t.run_start.size() && t.run_start[k] <= longest; ++k) {
    const int64_t through = tokens_up_to(t.run_start[k + 1] - 1);
    if (through > before) {
      scale_hist[t.run_bin[k]] += static_cast<double>(through - before);
      written.add(t.run_bin[k], t.run_bin[k]);
    }
    before = through;
  }
}

thread_local std::vector<int32_t> ratio_counts_buffer, scale_counts_buffer;
thread_local std::vector<int64_t> position_weights_buffer;

template <typename T>
void stats_rows(const StatsArgs<T>& a, int64_t row_begin, int64_t row_end, const StatsAcc& acc) {
  double* s = acc.scalars;
  double* m = acc.maxima;
  TileSums sums;
  sums.ratio_max = m[kRatioMax];
  sums.ratio_min = -m[kRatioNegMin];
  sums.scale_max = m[kScaleMax];
  sums.scale_min = -m[kScaleNegMin];
  BucketRun run{a.num_buckets};
  BinCounts ratio_counts(ratio_counts_buffer, a.hist.bins), scale_counts(scale_counts_buffer, a.hist.bins);
  PositionWeights la_weights(position_weights_buffer);
  int64_t unflushed = 0;
  int32_t bins[kStatsTile];
#if CTPO_X86_AVX512_TILE
  const bool avx512 = std::is_same_v<T, float> && has_avx512_tile_pass();
#else
  constexpr bool avx512 = false;
#endif
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * a.row_len;
    int64_t count = 0;
    for (int64_t t0 = 0; t0 < a.row_len; t0 += kStatsTile) {
      const int64_t n = std::min(kStatsTile, a.row_len - t0);
      const int64_t i0 = base + t0;
      if (a.before_tile != nullptr) (*a.before_tile)(row, t0, n);
      const uint8_t* valid = reinterpret_cast<const uint8_t*>(a.valid + i0);
      TileCounts tile;
#if CTPO_X86_AVX512_TILE
      if constexpr (std::is_same_v<T, float>) {
        if (avx512) {
          int32_t bin_lo = std::numeric_limits<int32_t>::max(), bin_hi = -1;
          tile = tile_pass_avx512(a, i0, n, sums, bins, bin_lo, bin_hi);
          ratio_counts.add(bins, valid, n, bin_lo, bin_hi);
          if (a.scale != nullptr) {
            masked_sum_max_min(valid, a.scale + i0, n, sums.scale_sum, sums.scale_max, sums.scale_min);
          }
        }
      }
#endif
      if (!avx512) {
        tile = tile_sums(a, i0, n, sums);
        tile_bins(a.ratio + i0, n, a.hist, bins);
        ratio_counts.add(bins, valid, n);
      }
      if (a.scale != nullptr) {
        for (size_t c = 0; c < a.exp_coeffs.size(); ++c) {
          s[kExpSums + c] += tile_exp_sum<T>(a.valid + i0, a.scale + i0, n, a.exp_coeffs[c]);
        }
        tile_bins(a.scale + i0, n, a.hist, bins);
        scale_counts.add(bins, valid, n);
      } else if (a.la_from_positions && a.positions != nullptr) {
        la_weights.add_tile(valid, a.positions + i0, n);
      }
      add_positions(a, i0, n, count, tile, run, acc);
      count += tile.tokens;
      unflushed += n;
      if (unflushed >= kFlushTokens) {
        ratio_counts.flush(acc.ratio_hist, acc.ratio_bins);
        scale_counts.flush(acc.scale_hist, acc.scale_bins);
        unflushed = 0;
      }
    }
    if (a.la_from_positions && a.positions == nullptr) la_weights.add_row(count);
  }
  if (a.running != nullptr) {
    std::vector<int64_t>& rows = la_weights.row_counts();
    la_running_stats(*a.running, rows, acc.scalars, sums, acc.scale_hist, acc.scale_bins, acc.running_rows == nullptr);
    if (acc.running_rows != nullptr) acc.running_rows->insert(acc.running_rows->end(), rows.begin(), rows.end());
  } else if (a.la_from_positions) {
    la_position_stats(a, la_weights, sums, acc);
  }
  ratio_counts.flush(acc.ratio_hist, acc.ratio_bins);
  scale_counts.flush(acc.scale_hist, acc.scale_bins);
  run.flush(acc);
  s[kTokens] += sums.tokens;
  s[kNegAdv] += sums.neg_adv;
  s[kClipHigh] += sums.high;
  s[kClipLow] += sums.low;
  s[kClipDual] += sums.dual;
  s[kClipAny] += sums.any;
  s[kClipped] += sums.clipped;
  s[kNegLogRatio] += sums.neg_log_ratio;
  s[kRatioSum] += sums.ratio_sum;
  s[kScaleSum] += sums.scale_sum;
  m[kRatioMax] = sums.ratio_max;
  m[kRatioNegMin] = -sums.ratio_min;
  m[kScaleMax] = sums.scale_max;
  m[kScaleNegMin] = -sums.scale_min;
}

}  // namespace

WrittenBins loss_stats_into(const at::Tensor& valid, const at::Tensor& advantages, const at::Tensor& ratio,
                            const at::Tensor& log_ratio, const c10::optional<at::Tensor>& la_scale,
                            c10::optional<double> la_power, const at::Tensor& clip_high, const at::Tensor& clip_low,
                            const at::Tensor& clip_dual, const at::Tensor& clipped,
                            const c10::optional<at::Tensor>& positions, at::IntArrayRef bucket_edges,
                            at::ArrayRef<double> exp_coeffs, const HistSpec& hist,
                            double* sums, double* maxima, const TileProducer* before_tile,
                            RunningScaleRows* la_rows) {
  const std::vector<double> coeffs(exp_coeffs.begin(), exp_coeffs.end());
  check_stats_inputs(valid, advantages, ratio, log_ratio, la_scale, la_power,
                     {clip_high, clip_low, clip_dual, clipped}, positions, bucket_edges, coeffs,
                     hist);
  // Equal coefficients (la_clip_c = la_clip_high by default) are summed once.
  std::vector<double> distinct;
  std::vector<size_t> distinct_index;
  for (double c : coeffs) {
    const auto it = std::find(distinct.begin(), distinct.end(), c);
    distinct_index.push_back(static_cast<size_t>(it - distinct.begin()));
    if (it == distinct.end()) distinct.push_back(c);
  }
  const int64_t num_buckets = static_cast<int64_t>(bucket_edges.size());
  const StatsLayout layout = stats_layout(static_cast<int64_t>(coeffs.size()), hist.bins, num_buckets);
  const int64_t row_len = valid.size(-1);
  const int64_t rows = row_len > 0 ? valid.numel() / row_len : 0;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), rows, valid.numel() / kTokensPerChunk}));
  StatsAcc first(sums, maxima, layout);
  if (la_rows != nullptr) *la_rows = RunningScaleRows{};
  AT_DISPATCH_FLOATING_TYPES(ratio.scalar_type(), "loss_stats_cpu", [&] {
    StatsArgs<scalar_t> a{valid.data_ptr<bool>(), advantages.data_ptr<scalar_t>(), ratio.data_ptr<scalar_t>(),
                          log_ratio.data_ptr<scalar_t>(), la_scale ? la_scale->data_ptr<scalar_t>() : nullptr,
                          clip_high.data_ptr<bool>(), clip_low.data_ptr<bool>(), clip_dual.data_ptr<bool>(),
                          clipped.data_ptr<bool>(), positions.has_value() ? positions->data_ptr<int64_t>() : nullptr,
                          bucket_edges.data(), num_buckets,
                          distinct, hist, row_len, la_power.has_value(), la_power.value_or(0.0)};
    a.before_tile = before_tile;
    // Running positions within the tables' reach: the LA statistics per row (la_running_stats).
    std::shared_ptr<const RunningTables> running;
    if (la_power.has_value() && !positions.has_value() && row_len <= kMaxTablePositions) {
      running = running_tables<scalar_t>(*la_power, distinct, hist, row_len);
      a.running = running.get();
    }
    // Asked for (the metrics need one quantile of them): the rows instead of the histogram.
    const bool rows_out = la_rows != nullptr && running != nullptr && running->direction != 0;
    std::vector<std::vector<int64_t>> chunk_rows(rows_out ? chunks : 0);
    if (rows_out) {
      la_rows->tables = running;
      first.running_rows = &chunk_rows[0];
    }
    auto rows_to_la_rows = [&] {
      if (!rows_out) return;
      for (const auto& chunk : chunk_rows) la_rows->counts.insert(la_rows->counts.end(), chunk.begin(), chunk.end());
      std::sort(la_rows->counts.begin(), la_rows->counts.end());
    };
    if (chunks == 1) {
      stats_rows(a, 0, rows, first);
      rows_to_la_rows();
      return;
    }
    // Chunks other than the first accumulate into buffers of their own (sums, then maxima), merged below.
    std::vector<std::vector<double>> buffers(chunks - 1, std::vector<double>(layout.size + kNumMaxSlots, 0.0));
    std::vector<StatsAcc> accs{first};
    for (auto& buf : buffers) {
      accs.emplace_back(buf.data(), buf.data() + layout.size, layout);
      init_maxima(accs.back().maxima);
      if (rows_out) accs.back().running_rows = &chunk_rows[accs.size() - 1];
    }
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) stats_rows(a, rows * c / chunks, rows * (c + 1) / chunks, accs[c]);
    });
    for (int64_t c = 1; c < chunks; ++c) {
      for (int64_t k = 0; k < layout.size; ++k) first.scalars[k] += accs[c].scalars[k];
      for (int64_t k = 0; k < kNumMaxSlots; ++k) first.maxima[k] = std::max(first.maxima[k], accs[c].maxima[k]);
      first.ratio_bins.add(accs[c].ratio_bins);
      first.scale_bins.add(accs[c].scale_bins);
    }
    rows_to_la_rows();
  });
  // The distinct sums sit at kExpSums + their index; every coefficient gets its own (in place:
  // a coefficient's distinct index is never above its own slot).
  for (size_t e = coeffs.size(); e-- > 0;) first.scalars[kExpSums + e] = first.scalars[kExpSums + distinct_index[e]];
  return {first.ratio_bins, first.scale_bins};
}

double running_scale_quantile(const RunningScaleRows& rows, double q, double n, double lo, double hi,
                              const HistSpec& hist) {
  const RunningTables& t = *rows.tables;
  const std::vector<int64_t>& counts = rows.counts;
  TORCH_CHECK(t.direction != 0 && !counts.empty() && counts.back() <= t.positions,
              "ctpo_megatron: running_scale_quantile needs monotone tables that cover the rows");
  std::vector<int64_t> prefix(counts.size() + 1, 0);
  for (size_t r = 0; r < counts.size(); ++r) prefix[r + 1] = prefix[r] + counts[r];
  auto tokens_up_to = [&](int64_t x) -> double {  // sum over rows of min(c_r, x): positions 1..x
    if (x <= 0) return 0.0;
    const auto ended = std::upper_bound(counts.begin(), counts.end(), x) - counts.begin();  // rows with c_r <= x
    return static_cast<double>(prefix[ended] + x * static_cast<int64_t>(counts.size() - ended));
  };
  const int64_t longest = counts.back();
  // The runs of equal bins that hold a position of some row.
  const int64_t runs = std::upper_bound(t.run_start.begin(), t.run_start.end() - 1, longest) - t.run_start.begin();
  // Run j's tokens before it (positions below it) and through it, over all rows.
  auto below = [&](int64_t j) { return tokens_up_to(t.run_start[j] - 1); };
  auto through = [&](int64_t j) { return tokens_up_to(std::min(t.run_start[j + 1] - 1, longest)); };
  // The i-th bin in ascending order is run i (bins ascend with the position) or run runs-1-i
  // (they descend); the tokens in the bins before it and up to it, in that order.
  const bool ascending = t.direction > 0;
  auto run_of = [&](int64_t i) { return ascending ? i : runs - 1 - i; };
  auto before_bin = [&](int64_t i) { return ascending ? below(run_of(i)) : n - through(run_of(i)); };
  auto up_to_bin = [&](int64_t i) { return ascending ? through(run_of(i)) : n - below(run_of(i)); };
  const OrderStatistics find = [&](const std::vector<double>& ranks) {
    // The bin of rank r: the first, in ascending order, whose tokens up to it exceed r (the
    // histogram walk's), by bisection over the runs, each run one bin.
    std::vector<double> values;
    for (const double r : ranks) {
      int64_t first = 0, last = runs - 1;
      while (first < last) {
        const int64_t mid = first + (last - first) / 2;
        if (up_to_bin(mid) > r) {
          last = mid;
        } else {
          first = mid + 1;
        }
      }
      const double before = before_bin(first), in_bin = up_to_bin(first) - before;
      const int64_t bin = t.run_bin[run_of(first)];
      const double lower = bin_lower_edge(bin, hist), upper = bin_lower_edge(bin + 1, hist);
      values.push_back(lower + (r - before + 0.5) / in_bin * (upper - lower));
    }
    return values;
  };
  return quantiles_from_order_statistics({q}, n, lo, hi, find)[0];
}

namespace {

StatsResult loss_stats_cpu(const at::Tensor& valid, const at::Tensor& advantages, const at::Tensor& ratio,
                           const at::Tensor& log_ratio, const c10::optional<at::Tensor>& la_scale,
                           c10::optional<double> la_power, const at::Tensor& clip_high, const at::Tensor& clip_low,
                           const at::Tensor& clip_dual, const at::Tensor& clipped,
                           const c10::optional<at::Tensor>& positions,
                           at::IntArrayRef bucket_edges,
                           at::ArrayRef<double> exp_coeffs, int64_t hist_shift, int64_t hist_first,
                           int64_t hist_bins) {
  at::Tensor sums_out, maxima_out;
  std::tie(sums_out, maxima_out) = fresh_stats(valid.options(), static_cast<int64_t>(exp_coeffs.size()),
                                               hist_bins, static_cast<int64_t>(bucket_edges.size()));
  loss_stats_into(valid, advantages, ratio, log_ratio, la_scale, la_power, clip_high, clip_low, clip_dual, clipped,
                  positions, bucket_edges, exp_coeffs, HistSpec{hist_shift, hist_first, hist_bins},
                  sums_out.data_ptr<double>(), maxima_out.data_ptr<double>());
  return {sums_out, maxima_out};
}

}  // namespace
}  // namespace ctpo

TORCH_LIBRARY_IMPL(ctpo_megatron, CPU, m) {
  m.impl("loss_stats", &ctpo::loss_stats_cpu);
}
