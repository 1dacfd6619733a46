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
// (kernels/cpu/isa/*.cpp, with that ISA's target flags). Each copy lives in its own inline
// namespace, FUSEDRNN_ISA_NAMESPACE, set by the translation unit before it includes these headers,
// so that the linker can never take an AVX-512 copy of an inline function or template for a caller
// that runs on every CPU: the copies have different symbol names.
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

// Options of a step's elements or rows that the caller may fix at compile time
// (kernels/step_elements.h): kRuntime reads the step struct; kOff / kOn fix the answer. Zoneout
// (kZone) has a third value, kCellOnly: an LSTM-family step that zones c_t only (a projected
// LSTM, whose h_t is zoned after the projection).
constexpr int kRuntime = -1, kOff = 0, kOn = 1, kCellOnly = 2;

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

// exp for the cells' sigmoid and tanh (their only callers), ~1 ulp on the clamped range. The
// argument is clamped to [-50, 50] (float) / [-500, 500] (double), written as comparisons so
// that a NaN argument stays NaN. Beyond the clamp tanh is 1 and sigmoid 1 or its floor, 2e-22 /
// 7e-218: absolutely far below every tolerance (docs/design.md §4). The clamp is that narrow so
// that no value in reach is a denormal, which makes CPU arithmetic ~100x slower: gcc vectorises
// a select by computing its constant arm on every lane and blending, and with the clamp at exp's
// range (88 / 709) the cell loops computed f * c_{t-1} with f = 1 / (1 + exp(88)), a denormal,
// on every vector of every step (a microcode assist each; AVX2 steps ran ~2x slower, AVX-512
// masks those lanes off). tests/test_denormals.py checks that no step meets a denormal.
FUSEDRNN_HD float exp(float x) {
  x = x > 50.0f ? 50.0f : x;
  x = x < -50.0f ? -50.0f : x;
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

// exp for double on the CPU, written like the float one so that the step loops vectorise
// (::exp is a scalar libm call per element: an fp64 LSTM step spent most of its time there,
// slower than torch.nn's vectorised ATen ops). Clamped to [-500, 500] (see the float one);
// n = round(x / ln 2) by the 1.5 * 2^52 trick, whose low bits are n itself (read through the
// bits, as AVX2 has no double -> int64 conversion); r = x - n ln 2 in two parts (Cody-Waite,
// fdlibm's split); exp(r) on |r| <= ln2/2 by its Taylor polynomial to degree 13 (truncation
// < 5e-18 relative). A few ulp: the fp64 rule of docs/design.md §4 is 1e-10. CUDA keeps its
// own exp.
FUSEDRNN_HD double exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  x = x > 500.0 ? 500.0 : x;
  x = x < -500.0 ? -500.0 : x;
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double t = x * 1.4426950408889634 + shifter;
  const double n = t - shifter;
  double r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1 / 13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t tb, sb;
  std::memcpy(&tb, &t, sizeof tb);
  std::memcpy(&sb, &shifter, sizeof sb);
  const int64_t e = (tb - sb + 1023) << 52;  // 2^n
  double scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
#endif
}

FUSEDRNN_HD float sigmoid(float x) { return 1.0f / (1.0f + math::exp(-x)); }
FUSEDRNN_HD double sigmoid(double x) { return 1.0 / (1.0 + math::exp(-x)); }

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

// tanh for double on the CPU (see exp): for |x| >= 0.1, 1 - 2 / (exp(2|x|) + 1), whose
// cancellation costs at most a factor ~10 (~1e-15 relative); below, the odd Taylor series to
// x^13 (next term < 2e-17 relative).
FUSEDRNN_HD double tanh(double x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  double ax = x < 0.0 ? -x : x;
  double big = 1.0 - 2.0 / (math::exp(2.0 * ax) + 1.0);
  big = x < 0.0 ? -big : big;
  double x2 = x * x;
  double s = 21844.0 / 6081075.0;
  s = s * x2 - 1382.0 / 155925.0;
  s = s * x2 + 62.0 / 2835.0;
  s = s * x2 - 17.0 / 315.0;
  s = s * x2 + 2.0 / 15.0;
  s = s * x2 - 1.0 / 3.0;
  double small = x + x * x2 * s;
  return ax < 0.1 ? small : big;
#endif
}

}  // namespace math
// The math of each cell: CellMath<kind>::type<acc_t> is its struct (LSTMCell<acc_t>, ...),
// declared by the cell's own header next to the struct, so that the step elements
// (kernels/step_elements.h) reach a cell through its kind and traits only.
template <CellKind kCell>
struct CellMath;

FUSEDRNN_ISA_END
}  // namespace fusedrnn
