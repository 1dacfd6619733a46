// Scalar math shared by every cell header, compiled for the host (CPU path) and the device
// (CUDA path) alike. Everything here is branch-free so that gcc vectorises the CPU loops that
// call it (no libm calls in float loops), and NaN propagates as it does through torch's ops.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "traits.h"

// The cell math and the step elements (kernels/step_elements.h) are compiled several times into one
// library: for the portable CPU code, for the CUDA kernels and once per CPU instruction set
// (cpu/isa_*.cpp, with that ISA's target flags). Each copy lives in its own inline namespace,
// FUSEDRNN_ISA_NAMESPACE, set by the translation unit before it includes these headers, so that
// the linker can never take an AVX-512 copy of an inline function or template for a caller that
// runs on every CPU: the copies have different symbol names.
#ifndef FUSEDRNN_ISA_NAMESPACE
#define FUSEDRNN_ISA_NAMESPACE portable
#endif
#define FUSEDRNN_ISA_BEGIN inline namespace FUSEDRNN_ISA_NAMESPACE {
#define FUSEDRNN_ISA_END }

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDRNN_HD __host__ __device__ __forceinline__
#else
#define FUSEDRNN_HD inline __attribute__((always_inline))
#endif

namespace fusedrnn {
FUSEDRNN_ISA_BEGIN
namespace math {

FUSEDRNN_HD float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
#endif
}

// exp for float, ~1 ulp on the clamped range. The argument is clamped to [-87, 88] so that the
// result never becomes a denormal or inf (denormals make CPU arithmetic ~100x slower); the clamp
// is written as comparisons so that a NaN argument stays NaN.
FUSEDRNN_HD float exp(float x) {
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln 2) via the 1.5 * 2^23 trick (exact round-to-nearest for |t| < 2^22).
  const float shifter = 12582912.0f;
  float t = x * 1.44269504088896341f + shifter;
  float n = t - shifter;
  // r = x - n ln2, with ln2 split in two so that r is exact (Cody-Waite).
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  // exp(r) on |r| <= ln2/2 by its Taylor polynomial to degree 7 (truncation < 5e-9).
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;
  return p * bits_to_float(e << 23);
}

FUSEDRNN_HD double exp(double x) { return ::exp(x); }

FUSEDRNN_HD float sigmoid(float x) { return 1.0f / (1.0f + math::exp(-x)); }
FUSEDRNN_HD double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }

// tanh for float. For |x| >= 0.4: 1 - 2 / (exp(2|x|) + 1), whose cancellation costs at most
// ~3e-7 relative there; below 0.4 the odd Taylor series to x^13 (next term < 5e-9 relative).
FUSEDRNN_HD float tanh(float x) {
  float ax = x < 0.0f ? -x : x;
  float big = 1.0f - 2.0f / (math::exp(2.0f * ax) + 1.0f);
  big = x < 0.0f ? -big : big;
  float x2 = x * x;
  float s = 3.592128036572481e-3f;
  s = s * x2 - 8.863235529902197e-3f;
  s = s * x2 + 2.1869488536155203e-2f;
  s = s * x2 - 5.396825396825397e-2f;
  s = s * x2 + 1.3333333333333333e-1f;
  s = s * x2 - 3.333333333333333e-1f;
  float small = x + x * x2 * s;
  return ax < 0.4f ? small : big;
}

FUSEDRNN_HD double tanh(double x) { return ::tanh(x); }

}  // namespace math
// The math of each cell: CellMath<kind>::type<acc_t> is its struct (LSTMCell<acc_t>, ...),
// declared by the cell's own header next to the struct, so that the step elements
// (kernels/step_elements.h) reach a cell through its kind and traits only.
template <CellKind kCell>
struct CellMath;

FUSEDRNN_ISA_END
}  // namespace fusedrnn
