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
  T loss;       // w * pg_t
  T grad;       // d loss / d log_prob_t
  T ratio;      // r_t = exp(min(s_t, 10))
  uint8_t flags;
};

template <typename T>
CTPO_HD T ctpo_exp(T v) { return std::exp(v); }

// Derivative of torch.maximum(a, b) with respect to its inputs, as seen from d a and d b.
template <typename T>
CTPO_HD T max_grad(T a, T b, T da, T db) {
  if (a > b) return da;
  if (a < b) return db;
  return T(0.5) * da + T(0.5) * db;
}

// `cum`: inclusive masked prefix sum of clamped log-ratios (rounded to T); `count`: inclusive
// masked count; `adv`: advantage; `weight`: rollout IS weight (1 when absent). Valid token only.
template <typename T>
CTPO_HD TokenTerms<T> ctpo_token(T cum, T count, T adv, T weight, const CtpoParams& p) {
  const T n1 = count > T(1) ? count : T(1);
  const T s = p.geomean ? cum / n1 : cum;
  // min(s, 10) keeps NaN like torch.clamp; its gradient passes only where s <= 10.
  const T x = s > T(10) ? T(10) : s;
  const T dx = s <= T(10) ? T(1) : T(0);
  const T r = ctpo_exp(x);
  T rhat, drhat, dual;
  uint8_t flags = 0;
  if (p.adaptive) {
    T g = T(1);
    // torch.pow special-cases these exponents as sqrt and rsqrt; match it bit for bit.
    if (p.power == 0.5) {
      g = std::sqrt(n1);
    } else if (p.power == -0.5) {
      g = T(1) / std::sqrt(n1);
    } else if (p.power != 0.0) {
      g = std::pow(n1, T(p.power));
    }
    const T lo = -(T(p.clip_low) * g);
    const T hi = T(p.clip_high) * g;
    const T xc = x < lo ? lo : (x > hi ? hi : x);
    rhat = ctpo_exp(xc);
    drhat = (x >= lo && x <= hi) ? rhat : T(0);
    dual = ctpo_exp(T(p.clip_c) * g);
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
  const T c1 = l1 > l2 ? l1 : (l1 < l2 ? l2 : l1);
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
  out.loss = loss * weight;
  out.grad = dc1 * weight * dx;
  out.ratio = r;
  out.flags = flags;
  return out;
}

}  // namespace ctpo
