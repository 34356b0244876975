// A branch-free float exp that compilers vectorize (the CPU loss kernel's hot loop); glibc's
// expf is a call and keeps the loop scalar. Cephes-style: exp(x) = 2^n exp(r), |r| <= ln2/2,
// degree-6 polynomial; within ~1 ulp of expf on [-87, 88.37], 0 below -87, inf above 88.38
// (expf overflows at 88.72), NaN kept.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

// Hot CPU loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load time (GCC
// function multi-versioning): the baseline build targets SSE2, whose 4-wide vectors left the
// loss kernel ~3x slower than the machine allows. The AVX-512 clone is x86-64-v4 (F, BW, DQ,
// VL), not plain avx512f: byte and word vectors (the statistics' flag counts and masks) need
// BW, and without it stayed 256 bits wide (measured: the loss statistics ~8% faster). It
// implies FMA, so that clone contracts multiply-adds and can differ from the AVX2 and baseline
// clones by an ulp; the kernel tests compare with tolerances that hold for every clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CTPO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define CTPO_CPU_CLONES
#endif

namespace ctpo {

struct FastExp {
  inline __attribute__((always_inline)) float operator()(float x) const {
    const float xc = x < -87.0f ? -87.0f : (x > 88.8f ? 88.8f : x);
    // n = round(x / ln2) by the 1.5 * 2^23 trick (round to nearest even, no select): a
    // data-dependent rounding direction made the compiler evaluate the polynomial twice.
    constexpr float kRound = 12582912.0f;
    const float nf_rounded = (xc * 1.44269504088896341f + kRound) - kRound;
    const int32_t n = static_cast<int32_t>(nf_rounded);
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
    // No select on the result: one kept AVX2 / AVX-512 builds from if-converting the loop. NaN
    // propagates through xc; above ~88.38, n = 128 makes pow2 the bit pattern of +inf;
    // below -87 the factor is 0.
    return result * static_cast<float>(!(x < -87.0f));
  }
  double operator()(double x) const;  // not provided: the float64 path keeps std::exp
};

}  // namespace ctpo
