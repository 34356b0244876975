// Per-token CTPO surrogate shared by the CPU and CUDA kernels (host/device inline).
//
// Semantics follow the reference loss exactly (see docs/ops.md): the cumulative log-ratio `cum`
// and the count `count` of generated tokens enter without gradient; the gradient flows only
// through the current token's log-prob, x = min(s, 10) passes it where s <= 10, clamps pass it
// on their closed interval, and max/min split it 50/50 on exact ties like torch.maximum and
// torch.minimum. `T` is the math type: float for 16/32-bit inputs, double for float64.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define CTPO_HD __host__ __device__ __forceinline__
#else
// Forced: the CPU loop vectorizes only with the whole per-token math inlined into it.
#define CTPO_HD inline __attribute__((always_inline))
#endif

// An identity the optimizer cannot see through (GCC >= 12, CPU builds), for values whose
// relation to others it would otherwise fold into a form it then cannot vectorize.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && __GNUC__ >= 12
#define CTPO_OPAQUE(x) __builtin_assoc_barrier(x)
#else
#define CTPO_OPAQUE(x) (x)
#endif

namespace ctpo {

struct CtpoParams {
  bool geomean;       // L_t = C_t / max(n_t, 1) instead of C_t
  bool adaptive;      // LA clipping in log space, bounds scaled by max(n_t, 1)^power
  double clip_low;    // LA: la_low; plain: eps_low
  double clip_high;   // LA: la_high; plain: eps_high
  double clip_c;      // LA: la_c (dual bound exp(la_c * g)); plain: clip_ratio_c
  double power;       // LA scale exponent p; 0 means a uniform scale g = 1
  bool dual_is_high;  // clip_c == clip_high: the LA dual bound reuses exp(H_t)
};

inline CtpoParams make_ctpo_params(bool geomean, bool adaptive, double clip_low, double clip_high, double clip_c,
                                   double power) {
  return CtpoParams{geomean, adaptive, clip_low, clip_high, clip_c, power, clip_c == clip_high};
}

template <typename T>
struct TokenTerms {
  T loss;      // pg_t
  T grad;      // d pg_t / d log_prob_t
  T ratio;     // r_t = exp(min(s_t, 10))
  // Clip flags, 0/1. int rather than bool: four adjacent bools get merged into one memory
  // word and block the CPU loop's vectorization.
  int high;     // LA: x > H_t (plain: r > 1 + eps_high), with A > 0
  int low;      // LA: x < -L_t (plain: r < 1 - eps_low), with A < 0
  int dual;     // max(l1, l2) > l3 with A < 0: the dual clip bound is active
  int clipped;  // l2 > l1: the clipped surrogate is the larger one (pg_clipfrac)
};

// exp in the precision of T (expf / exp); the CPU float path swaps in a vectorizable one.
struct StdExp {
  template <typename T>
  CTPO_HD T operator()(T v) const {
    return std::exp(v);
  }
};

// g_t = max(n_t, 1)^p. torch.pow special-cases p = +-0.5 as sqrt/rsqrt; match it bit for bit.
template <typename T>
CTPO_HD T la_scale(T count, double power) {
  const T n1 = count > T(1) ? count : T(1);
  if (power == 0.0) return T(1);
  if (power == 0.5) return std::sqrt(n1);
  if (power == -0.5) return T(1) / std::sqrt(n1);
  if (power == 1.0) return n1;
  return std::pow(n1, T(power));
}

// Derivative of torch.maximum(a, b), given d a and d b: ties split 50/50.
template <typename T>
CTPO_HD T max_grad(T a, T b, T da, T db) {
  return a > b ? da : (a < b ? db : T(0.5) * da + T(0.5) * db);
}

// One valid token. `cum`: C_t, the masked prefix sum of clamped log-ratios, and `count`: n_t,
// both rounded to T; `log_prob`: this token's log-prob; `scale`: la_scale(count) (LA only).
// Written with selects rather than branches so that a loop over tokens vectorizes on CPU.
template <typename T, typename Exp = StdExp>
CTPO_HD TokenTerms<T> ctpo_token(T cum, T count, T log_prob, T adv, T scale, const CtpoParams& p,
                                 const Exp& exp_fn = Exp()) {
  const T s = p.geomean ? cum / (count > T(1) ? count : T(1)) : cum;
  // x = min(sg(s) + lp - sg(lp), 10), rounded in the reference's expression order; the
  // gradient passes where the clamp input is <= 10.
  const T xin = (s + log_prob) - log_prob;
  const T x = xin > T(10) ? T(10) : xin;
  const T dx = xin <= T(10) ? T(1) : T(0);
  const T r = exp_fn(x);
  T rhat, drhat, dual;
  bool above, below;
  if (p.adaptive) {
    const T lo = -(T(p.clip_low) * scale);
    const T hi = T(p.clip_high) * scale;
    const T exp_hi = exp_fn(hi);
    below = x < lo;
    above = x > hi;
    // One exp of the clamped argument (the same bits as exp(lo), exp(hi) or r): an exp call
    // inside a select arm kept AVX2 / AVX-512 builds of the CPU loop from if-converting it.
    rhat = exp_fn(below ? lo : (above ? hi : x));
    drhat = (below | above) ? T(0) : r;
    dual = p.dual_is_high ? exp_hi : exp_fn(T(p.clip_c) * scale);
  } else {
    const T lo = T(1.0 - p.clip_low);
    const T hi = T(1.0 + p.clip_high);
    below = r < lo;
    above = r > hi;
    // Opaque: seeing that rhat == r unless clipped, GCC rewrote l2 > l1 into a select of bools
    // by a float mask, which its vectorizer rejects; the plain-clip loop then ran scalar (2.7x).
    rhat = CTPO_OPAQUE(below ? lo : (above ? hi : r));
    drhat = (below | above) ? T(0) : r;
    dual = T(p.clip_c);
  }
  const T neg_adv = -adv;
  const T l1 = neg_adv * r;
  const T l2 = neg_adv * rhat;
  const T c1 = l1 < l2 ? l2 : l1;
  const T dc1 = max_grad(l1, l2, neg_adv * r, neg_adv * drhat);
  // Where A < 0: torch.minimum(l3, c1); the constant l3 carries no gradient.
  const T l3 = neg_adv * dual;
  const bool negative = adv < T(0);
  TokenTerms<T> out;
  out.loss = negative ? (c1 < l3 ? c1 : l3) : c1;
  out.grad = (negative ? max_grad(-c1, -l3, dc1, T(0)) : dc1) * dx;
  out.ratio = r;
  // Bitwise & on bools: no short-circuit branches in a vectorized loop.
  out.high = above & (adv > T(0));
  out.low = below & negative;
  out.dual = negative & (c1 > l3);
  out.clipped = l2 > l1;
  return out;
}

}  // namespace ctpo
