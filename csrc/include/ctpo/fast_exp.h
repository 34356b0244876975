// A branch-free float exp that compilers vectorize (the CPU loss kernel's hot loop); glibc's
// expf is a call and keeps the loop scalar. Cephes-style: exp(x) = 2^n exp(r), |r| <= ln2/2,
// degree-6 polynomial; within ~1 ulp of expf on [-87, 88], 0 below, inf above, NaN kept.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace ctpo {

struct FastExp {
  inline __attribute__((always_inline)) float operator()(float x) const {
    const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float t = xc * 1.44269504088896341f;
    const int32_t n = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));
    const float nf = static_cast<float>(n);
    const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    const float y = poly * r * r + r + 1.0f;
    const int32_t bits = (n + 127) << 23;
    float pow2;
    std::memcpy(&pow2, &bits, sizeof(pow2));
    const float result = y * pow2;
    return x != x ? x : (x < -87.0f ? 0.0f : (x > 88.0f ? std::numeric_limits<float>::infinity() : result));
  }
  double operator()(double x) const;  // not provided: the float64 path keeps std::exp
};

}  // namespace ctpo
