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
#define CTPO_HD inline
#endif

namespace ctpo {

// Bits of the per-token `flags` output.
enum ClipFlag : uint8_t {
  kClipHigh = 1,      // LA: x > H_t (plain: r > 1 + eps_high), with A > 0
  kClipLow = 2,       // LA: x < -L_t (plain: r < 1 - eps_low), with A < 0
  kClipDual = 4,      // max(l1, l2) > l3 with A < 0: the dual clip bound is active
  kClipSurrogate = 8  // l2 > l1: the clipped surrogate is the larger one (pg_clipfrac)
};

struct CtpoParams {
  bool geomean;       // L_t = C_t / max(n_t, 1) instead of C_t
  bool adaptive;      // LA clipping in log space, bounds scaled by max(n_t, 1)^power
  double clip_low;    // LA: la_low; plain: eps_low
  double clip_high;   // LA: la_high; plain: eps_high
  double clip_c;      // LA: la_c (dual bound exp(la_c * g)); plain: clip_ratio_c
  double power;       // LA scale exponent p; 0 means a uniform scale g = 1
};

template <typename T>
struct TokenTerms {
  T loss;      // pg_t
  T grad;      // d pg_t / d log_prob_t
  T ratio;     // r_t = exp(min(s_t, 10))
  uint8_t flags;
};

template <typename T>
CTPO_HD T ctpo_exp(T v) { return std::exp(v); }

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
  if (a > b) return da;
  if (a < b) return db;
  return T(0.5) * da + T(0.5) * db;
}

// One valid token. `cum`: C_t, the masked prefix sum of clamped log-ratios, and `count`: n_t,
// both rounded to T; `log_prob`: this token's log-prob; `scale`: la_scale(count) (LA only).
template <typename T>
CTPO_HD TokenTerms<T> ctpo_token(T cum, T count, T log_prob, T adv, T scale, const CtpoParams& p) {
  const T s = p.geomean ? cum / (count > T(1) ? count : T(1)) : cum;
  // x = min(sg(s) + lp - sg(lp), 10), rounded in the reference's expression order; the
  // gradient passes where the clamp input is <= 10 (NaN stays NaN like torch.clamp).
  const T xin = (s + log_prob) - log_prob;
  const T x = xin > T(10) ? T(10) : xin;
  const T dx = xin <= T(10) ? T(1) : T(0);
  const T r = ctpo_exp(x);
  T rhat, drhat, dual;
  uint8_t flags = 0;
  if (p.adaptive) {
    const T lo = -(T(p.clip_low) * scale);
    const T hi = T(p.clip_high) * scale;
    // exp(clamp(x, lo, hi)) is r itself inside the bounds (bitwise: same argument), so exp
    // runs again only for clamped tokens; exp(la_c * g) only where A < 0, reusing exp(hi)
    // when la_c == la_high (the default).
    T exp_hi = T(0);
    bool have_exp_hi = false;
    if (x < lo) {
      rhat = ctpo_exp(lo);
      drhat = T(0);
    } else if (x > hi) {
      exp_hi = ctpo_exp(hi);
      have_exp_hi = true;
      rhat = exp_hi;
      drhat = T(0);
    } else {
      rhat = r;
      drhat = r;
    }
    if (adv < T(0)) {
      if (p.clip_c == p.clip_high) {
        dual = have_exp_hi ? exp_hi : ctpo_exp(hi);
      } else {
        dual = ctpo_exp(T(p.clip_c) * scale);
      }
    } else {
      dual = T(1);  // unused: the dual clip applies only where A < 0
    }
    if (x > hi && adv > T(0)) flags |= kClipHigh;
    if (x < lo && adv < T(0)) flags |= kClipLow;
  } else {
    const T lo = T(1.0 - p.clip_low);
    const T hi = T(1.0 + p.clip_high);
    rhat = r < lo ? lo : (r > hi ? hi : r);
    drhat = (r >= lo && r <= hi) ? r : T(0);
    dual = T(p.clip_c);
    if (r > hi && adv > T(0)) flags |= kClipHigh;
    if (r < lo && adv < T(0)) flags |= kClipLow;
  }
  const T neg_adv = -adv;
  const T l1 = neg_adv * r;
  const T l2 = neg_adv * rhat;
  const T c1 = l1 < l2 ? l2 : l1;
  T dc1 = max_grad(l1, l2, neg_adv * r, neg_adv * drhat);
  if (l2 > l1) flags |= kClipSurrogate;
  T loss = c1;
  if (adv < T(0)) {
    const T l3 = neg_adv * dual;
    // torch.minimum(l3, c1): the constant l3 carries no gradient.
    dc1 = max_grad(-c1, -l3, dc1, T(0));
    loss = c1 < l3 ? c1 : l3;
    if (c1 > l3) flags |= kClipDual;
  }
  TokenTerms<T> out;
  out.loss = loss;
  out.grad = dc1 * dx;
  out.ratio = r;
  out.flags = flags;
  return out;
}

}  // namespace ctpo
