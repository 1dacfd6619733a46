// The cells' float tanh (csrc/cells/common.h) against two faster forms measured as alternatives
// and not used (docs/performance.md, "The cells' tanh"):
//   rational  x P(x^2) / Q(x^2) on [-7.9053, 7.9053], degrees 10 / 6 (scripts/fit_tanh.py)
//   expm1     -m / (m + 2) with x's sign, m = expm1(-2|x|) from exp's reduction and polynomial
// For each: the error against tanh in double, in ulps of the float result, over every float in
// [0, 12) by ranges (all three are odd), and the LSTM cell math with it (cells/lstm.h: three
// sigmoids, two tanh, the state update) in a loop compiled for AVX2 and for AVX-512 as the step
// kernels are, ns per element.
//
//   g++ -O3 -fno-math-errno -fno-trapping-math -std=c++17 -Icsrc scripts/tanh_variants.cpp \
//       -o /tmp/tanh_variants && /tmp/tanh_variants [stride]
// (stride: test every stride-th float only; default 1, every float, about a minute per form.)
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cells/common.h"

namespace {

using fusedrnn::math::bits_to_float;

inline float tanh_current(float x) { return fusedrnn::math::tanh(x); }

inline float tanh_rational(float x) {
  x = x > 7.90531111f ? 7.90531111f : x;
  x = x < -7.90531111f ? -7.90531111f : x;
  const float t = x * x;
  float p = 2.40748567e-11f;
  p = p * t - 1.48961732e-08f;
  p = p * t + 9.93622416e-06f;
  p = p * t + 2.99179577e-03f;
  p = p * t + 1.29846364e-01f;
  p = p * t + 1.0f;
  float q = 2.38043896e-04f;
  q = q * t + 2.40518805e-02f;
  q = q * t + 4.63179529e-01f;
  q = q * t + 1.0f;
  return x * p / q;
}

inline float tanh_expm1(float x) {
  const float ax = x < 0.0f ? -x : x;
  float z = -2.0f * ax;
  z = z < -50.0f ? -50.0f : z;
  const float shifter = 12582912.0f;
  const float n = (z * 1.44269504088896341f + shifter) - shifter;
  float r = z - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  const float em = r + (r * r) * p;                                      // expm1(r)
  const float s = bits_to_float((static_cast<int32_t>(n) + 127) << 23);  // 2^n
  const float m = s * em + (s - 1.0f);
  const float y = (0.0f - m) / (m + 2.0f);
  return x < 0.0f ? -y : y;
}

template <float (*Tanh)(float)>
inline void lstm(float a_i, float a_f, float a_g, float a_o, float c_prev, float& c, float& h) {
  const float i = fusedrnn::math::sigmoid(a_i), f = fusedrnn::math::sigmoid(a_f);
  const float g = Tanh(a_g), o = fusedrnn::math::sigmoid(a_o);
  c = f * c_prev + i * g;
  h = o * Tanh(c);
}

template <float (*Tanh)(float)>
__attribute__((target("avx2,fma"), noinline)) void cells_avx2(const float* a, const float* c_prev,
                                                              float* c, float* h, int n) {
#pragma GCC ivdep
  for (int j = 0; j < n; ++j) {
    lstm<Tanh>(a[j], a[n + j], a[2 * n + j], a[3 * n + j], c_prev[j], c[j], h[j]);
  }
}

template <float (*Tanh)(float)>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512"), noinline)) void
cells_avx512(const float* a, const float* c_prev, float* c, float* h, int n) {
#pragma GCC ivdep
  for (int j = 0; j < n; ++j) {
    lstm<Tanh>(a[j], a[n + j], a[2 * n + j], a[3 * n + j], c_prev[j], c[j], h[j]);
  }
}

template <float (*Tanh)(float)>
void accuracy(const char* name, uint32_t stride) {
  const float edges[] = {0.0f, 0.1f, 0.4f, 1.0f, 2.0f, 3.0f, 5.0f, 8.0f, 12.0f};
  std::printf("%s\n", name);
  int bad = 0;
  for (int k = 0; k + 1 < static_cast<int>(sizeof edges / sizeof edges[0]); ++k) {
    uint32_t lo, hi;
    std::memcpy(&lo, &edges[k], 4);
    std::memcpy(&hi, &edges[k + 1], 4);
    double worst = 0, sum = 0, n = 0;
    float at = 0;
    for (uint32_t i = lo; i < hi; i += stride) {
      float x;
      std::memcpy(&x, &i, 4);
      const float y = Tanh(x);
      const double ref = std::tanh(static_cast<double>(x));
      const float ref_f = static_cast<float>(ref);
      double ulp = std::nextafter(ref_f, 2.0f) - ref_f;
      if (ulp == 0) ulp = 1.4e-45;  // the smallest denormal
      const double e = std::fabs(y - ref) / ulp;
      if (e > worst) worst = e, at = x;
      sum += e;
      n += 1;
      if (y > 1.0f || Tanh(-x) != -y) ++bad;
    }
    std::printf("  [%5.2f, %5.2f): max %.2f ulp (at %.7g), mean %.3f\n", edges[k], edges[k + 1],
                worst, at, sum / n);
  }
  if (!std::isnan(Tanh(NAN))) ++bad;
  std::printf("  %s\n", bad ? "FAILED: above 1, not odd, or NaN lost" : "odd, <= 1, NaN kept");
}

template <void (*Loop)(const float*, const float*, float*, float*, int)>
double ns_per_element() {
  const int n = 4096, repeats = 2000;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);  // pre-activations of a trained model
  std::vector<float> a(4 * n), c_prev(n), c(n), h(n);
  for (float& v : a) v = u(rng);
  for (float& v : c_prev) v = u(rng);
  double best = 1e30;
  for (int round = 0; round < 5; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < repeats; ++r) Loop(a.data(), c_prev.data(), c.data(), h.data(), n);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = s < best ? s : best;
  }
  return best / repeats / n * 1e9;
}

template <float (*Tanh)(float)>
void speed(const char* name) {
  std::printf("%-9s LSTM cell math: AVX2 %.2f ns per element", name,
              ns_per_element<cells_avx2<Tanh>>());
  if (__builtin_cpu_supports("avx512f")) {
    std::printf(", AVX-512 %.2f", ns_per_element<cells_avx512<Tanh>>());
  }
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  const uint32_t stride = argc > 1 ? static_cast<uint32_t>(std::atoi(argv[1])) : 1;
  speed<tanh_current>("current");
  speed<tanh_rational>("rational");
  speed<tanh_expm1>("expm1");
  accuracy<tanh_current>("current (cells/common.h)", stride);
  accuracy<tanh_rational>("rational", stride);
  accuracy<tanh_expm1>("expm1", stride);
}
