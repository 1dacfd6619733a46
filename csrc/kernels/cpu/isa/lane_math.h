// The cells' math on whole vectors: Lanes<V>, a float vector of the ISA's Vec V with the
// arithmetic operators, and math::exp / sigmoid / tanh for it, so that a cell's own struct
// (cells/*.h, e.g. GRUCell<acc_t>) runs with acc_t = Lanes<Vec>: the cell is still described once,
// and the step kernels of fused_tiles.h that use it (bf16: the GRU's forward and backward, the
// one-phase LSTM cells' backward) call it on 16 units at a time.
//
// Why not leave it to the compiler, as the other kernels are: gcc vectorises a bf16 element loop
// (16-bit loads and stores, float math) only with vectors of the 16-bit elements' width, rounds
// each bf16 store with the integer sequence of c10::BFloat16's conversion (~8 instructions), and
// scales exp's result through integer shifts; here the loop is over whole float vectors,
// Vec::store_bf16 is the conversion instruction where the CPU has AVX512_BF16, and exp scales by
// vscalefps. The functions follow the float ones of cells/common.h step for step (the same clamp,
// reduction, polynomials, divisions and branches), so they agree with them to an ulp or so. (The
// divisions stay divisions: a reciprocal estimate with a Newton step, tried, was slower on Zen 4,
// whose divider runs beside the FMA units these kernels keep busy.)
//
// Included by fused_tiles.h before kernels/step_elements.h: the cells call math::sigmoid(x)
// qualified, which finds only the overloads declared before the cell's struct is defined. (A
// cell instantiated with Lanes<V> without them would not compile: no silent fallback.) Only the
// ISAs whose Vec has the element-wise operations (Vec::kLaneMath: vec_avx512.h) instantiate them.
#pragma once

#ifndef FUSEDRNN_ISA_NAMESPACE
#error "lane_math.h is included by the per-ISA translation units only"
#endif

#include "cells/common.h"

namespace fusedrnn {
FUSEDRNN_ISA_BEGIN

template <typename V>
struct Lanes {
  using Reg = typename V::Reg;
  Reg r;
  Lanes() = default;
  Lanes(Reg v) : r(v) {}  // NOLINT(google-explicit-constructor): the operators' results
  explicit Lanes(float x) : r(V::set1(x)) {}
};

// (Templates of this namespace, found by argument-dependent lookup; not friends defined in the
// class, which gcc compiles outside the unit's target and warns of their vector ABI.)
template <typename V>
inline __attribute__((always_inline)) Lanes<V> operator+(Lanes<V> a, Lanes<V> b) {
  return V::add(a.r, b.r);
}
template <typename V>
inline __attribute__((always_inline)) Lanes<V> operator-(Lanes<V> a, Lanes<V> b) {
  return V::sub(a.r, b.r);
}
template <typename V>
inline __attribute__((always_inline)) Lanes<V> operator*(Lanes<V> a, Lanes<V> b) {
  return V::mul(a.r, b.r);
}
template <typename V>
inline __attribute__((always_inline)) Lanes<V> operator-(Lanes<V> a) {
  return V::sub(V::zero(), a.r);
}

namespace math {

// cells/common.h's float exp: the clamp to [-50, 50] (NaN kept: min / max return their second
// operand), n = round(x / ln 2), r = x - n ln 2 in two parts, the degree-7 Taylor polynomial, and
// the scaling by 2^n.
template <typename V>
inline __attribute__((always_inline)) Lanes<V> exp(Lanes<V> x) {
  using Reg = typename V::Reg;
  const Reg v = V::max(V::set1(-50.0f), V::min(V::set1(50.0f), x.r));
  const Reg n = V::round(V::mul(v, V::set1(1.44269504088896341f)));
  Reg r = V::fma(n, V::set1(-0.693359375f), v);
  r = V::fma(n, V::set1(2.12194440e-4f), r);
  Reg p = V::set1(1.0f / 5040.0f);
  p = V::fma(p, r, V::set1(1.0f / 720.0f));
  p = V::fma(p, r, V::set1(1.0f / 120.0f));
  p = V::fma(p, r, V::set1(1.0f / 24.0f));
  p = V::fma(p, r, V::set1(1.0f / 6.0f));
  p = V::fma(p, r, V::set1(0.5f));
  p = V::fma(p, r, V::set1(1.0f));
  p = V::fma(p, r, V::set1(1.0f));
  return V::scale2(p, n);
}

template <typename V>
inline __attribute__((always_inline)) Lanes<V> sigmoid(Lanes<V> x) {
  return V::div(V::set1(1.0f), V::add(V::set1(1.0f), math::exp(-x).r));
}

// cells/common.h's float tanh: 1 - 2 / (exp(2|x|) + 1) with x's sign for |x| >= 0.4, the odd
// Taylor series below.
template <typename V>
inline __attribute__((always_inline)) Lanes<V> tanh(Lanes<V> x) {
  using Reg = typename V::Reg;
  const Reg ax = V::abs(x.r);
  const Reg e = math::exp(Lanes<V>(V::add(ax, ax))).r;
  const Reg q = V::div(V::set1(2.0f), V::add(e, V::set1(1.0f)));
  const Reg big = V::with_sign(V::sub(V::set1(1.0f), q), x.r);
  const Reg x2 = V::mul(x.r, x.r);
  Reg s = V::set1(3.592128036572481e-3f);
  s = V::fma(s, x2, V::set1(-8.863235529902197e-3f));
  s = V::fma(s, x2, V::set1(2.1869488536155203e-2f));
  s = V::fma(s, x2, V::set1(-5.396825396825397e-2f));
  s = V::fma(s, x2, V::set1(1.3333333333333333e-1f));
  s = V::fma(s, x2, V::set1(-3.333333333333333e-1f));
  const Reg small = V::fma(V::mul(x.r, x2), s, x.r);
  return V::select_lt(ax, V::set1(0.4f), small, big);
}

}  // namespace math

FUSEDRNN_ISA_END
}  // namespace fusedrnn
