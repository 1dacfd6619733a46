// GEMMs of a few rows against a row-major weight, written once over a vector type and compiled
// per instruction set (included by kernels/cpu/isa/fused_table.h, in each ISA's <isa>_tiles.cpp).
//
// A step of a cell call or of a small-batch layer multiplies 1-4 rows by a whole weight matrix:
// the work is reading the weight (1 MB for H = 256), once, at the memory bandwidth the core
// has. These kernels stream the weight in its own row-major layout (nothing is packed, so
// nothing is prepared per call or kept between calls), every weight vector loaded once and used
// for every row:
// - gemm_nt: out (m x n) = [out +] a (m x k) W^T, W (n x k): the forward GEMMs (x W_ih^T,
//   h W_hh^T, c W_ch^T, r W_hr^T). R weight rows at a time, m x R dot products in registers.
// - gemm_nn: out (m x k) = [out +] a (m x n) W, W (n x k): the backward's dh = dgates W_hh and
//   dx = dgates W_ih. R weight rows at a time, out's rows (in L1) updated once per R rows.
// - gemm_tn: out (n x k) = [out +] a^T W, a (m x n), W (m x k): the weight gradients of a step
//   of m rows, dW = dgates^T x (a rank-m update), or of a short call's m <= kSmallRankRows rows
//   in all. Each output row written once, from m broadcast coefficients and the m rows of W (in
//   L1): the work is writing out.
// All three also run in bf16 (a, W and out bf16), on AVX2 (fused_table.h): every element widened
// to a float in the loads, 16 at a time where the ISA splits them (Vec::load_bf16_split: nt_split,
// nn_split), the sums in float, each output rounded once (nn: the rows are summed in a float
// buffer, not in out). Half the bytes of the weight to stream (tn: of out to write), and no copy
// of it converted to fp32 per step (tn: no fp32 result to convert).
#pragma once

#ifndef FUSEDRNN_ISA_NAMESPACE
#error "small_gemm.h is included by the per-ISA translation units only"
#endif

#include <cstdint>
#include <type_traits>

#include "kernels/cpu/fused_isa.h"
#include "kernels/cpu/isa/fused_tiles.h"  // Act<T>: the loads of float and bf16 elements

namespace fusedrnn {
namespace cpu {
namespace FUSEDRNN_ISA_NAMESPACE {

namespace small {

constexpr int kL = Vec::kLanes;
// The weight is read once, a block of R rows at a time: while a block is multiplied, the same
// columns of the next block's rows are prefetched, one 64-byte line per row and line of the
// block, so that the R streams are in cache when the next block starts (at H = 256 the rate of
// scripts/small_gemm_rate.py went from 24.1 to 19.8 us for m = 1 in one session, within the
// spread between sessions of this shared machine: not a verified gain, no loss).
template <typename T>
constexpr int64_t kLineElems = 64 / sizeof(T);

// The bits of bf16 elements, as the Vec loads and stores of bf16 take them.
inline const uint16_t* bits(const c10::BFloat16* p) { return Act<c10::BFloat16>::bits(p); }
inline uint16_t* bits(c10::BFloat16* p) { return Act<c10::BFloat16>::bits(p); }

// At the first vector of each line (`col` counted from the block's first column): the line at
// column `at` of each of the R rows from `next` (nullptr: no next block).
template <int R, typename T>
inline void prefetch_next(const T* next, int64_t ldw, int64_t col, int64_t at) {
  if (next == nullptr || (col & (kLineElems<T> - 1)) != 0) return;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) __builtin_prefetch(next + r * ldw + at, 0, 3);
}

// bf16 nt: s += the products of columns [q, q + 2 kL) of a's rows and w's R rows, from the
// even-indexed and the odd-indexed elements (V::load_bf16_split: the widening of 2 kL elements
// in two instructions, where load_bf16 takes two for kL). a's rows are split once, each weight
// row in turn, so that the registers hold M x R sums, 2 M row vectors and two weight vectors.
// V: the ISA's Vec (a template parameter: only ISAs that have the split instantiate this).
template <int M, int R, typename V>
inline void nt_split(const SmallGemmBf16& g, const c10::BFloat16* w, const c10::BFloat16* next,
                     int64_t q, typename V::Reg (&s)[M][R]) {
  typename V::Reg ae[M], ao[M];
#pragma GCC unroll 4
  for (int b = 0; b < M; ++b) V::load_bf16_split(bits(g.a + b * g.lda + q), ae[b], ao[b]);
  prefetch_next<R>(next, g.ldw, q, q);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    typename V::Reg we, wo;
    V::load_bf16_split(bits(w + r * g.ldw + q), we, wo);
#pragma GCC unroll 4
    for (int b = 0; b < M; ++b) {
      s[b][r] = V::fma(ae[b], we, s[b][r]);
      s[b][r] = V::fma(ao[b], wo, s[b][r]);
    }
  }
}

// m (<= kSmallGemmRows) rows, R weight rows per iteration.
template <int M, int R, typename T>
inline void nt_block(const SmallGemmOf<T>& g, int64_t j0, int64_t j1) {
  const int64_t k = g.k, kv = k / kL * kL;
  const Vec::Mask tail = Vec::first_lanes(k - kv);
  int64_t j = j0;
  for (; j + R <= j1; j += R) {
    Vec::Reg s[M][R];
#pragma GCC unroll 4
    for (int b = 0; b < M; ++b) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s[b][r] = Vec::zero();
    }
    const T* w = g.w + j * g.ldw;
    const T* next = j + 2 * R <= j1 ? w + R * g.ldw : nullptr;
    int64_t q = 0;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // 2 kL elements at a time, split into even and odd ones (nt_split), then kL at a time
      for (; q + 2 * kL <= kv; q += 2 * kL) nt_split<M, R, Vec>(g, w, next, q, s);
    }
    for (; q < kv; q += kL) {
      Vec::Reg wv[R];
      prefetch_next<R>(next, g.ldw, q, q);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = Act<T>::load(w + r * g.ldw + q);
#pragma GCC unroll 4
      for (int b = 0; b < M; ++b) {
        const Vec::Reg av = Act<T>::load(g.a + b * g.lda + q);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) s[b][r] = Vec::fma(av, wv[r], s[b][r]);
      }
    }
    if (kv < k) {
#pragma GCC unroll 4
      for (int b = 0; b < M; ++b) {
        const Vec::Reg av = Act<T>::load(g.a + b * g.lda + kv, k - kv, tail);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          s[b][r] = Vec::fma(av, Act<T>::load(w + r * g.ldw + kv, k - kv, tail), s[b][r]);
        }
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < M; ++b) {
      T* o = g.out + b * g.ldo + j;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float v = Vec::sum(s[b][r]);
        o[r] = static_cast<T>(g.accumulate ? static_cast<float>(o[r]) + v : v);
      }
    }
  }
  if constexpr (R > 1) {
    if (j < j1) nt_block<M, 1>(g, j, j1);
  }
}

// m rows of the nn product, columns [c0, c1) of a float `out` (row stride ldo; a multiple of kL
// wide but for the last), which holds the sum so far (zero_first: set to 0 first). a and W of g.
template <int M, int R, typename T>
inline void nn_block(const SmallGemmOf<T>& g, float* out, int64_t ldo, bool zero_first, int64_t c0,
                     int64_t c1) {
  const int64_t n = g.n;
  for (int b = 0; b < M; ++b) {
    float* o = out + b * ldo;
    if (zero_first) {
      for (int64_t c = c0; c < c1; ++c) o[c] = 0.0f;
    }
  }
  const int64_t cv = c0 + (c1 - c0) / kL * kL;
  const Vec::Mask tail = Vec::first_lanes(c1 - cv);
  int64_t j = 0;
  for (; j + R <= n; j += R) {
    Vec::Reg d[M][R];
#pragma GCC unroll 4
    for (int b = 0; b < M; ++b) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) d[b][r] = Act<T>::broadcast(g.a + b * g.lda + j + r);
    }
    const T* w = g.w + j * g.ldw;
    const T* next = j + 2 * R <= n ? w + R * g.ldw : nullptr;
    for (int64_t c = c0; c < cv; c += kL) {
      Vec::Reg wv[R];
      prefetch_next<R>(next, g.ldw, c - c0, c);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = Act<T>::load(w + r * g.ldw + c);
#pragma GCC unroll 4
      for (int b = 0; b < M; ++b) {
        float* o = out + b * ldo + c;
        Vec::Reg acc = Vec::load(o);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc = Vec::fma(d[b][r], wv[r], acc);
        Vec::store(o, acc);
      }
    }
    if (cv < c1) {
      Vec::Reg wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = Act<T>::load(w + r * g.ldw + cv, c1 - cv, tail);
#pragma GCC unroll 4
      for (int b = 0; b < M; ++b) {
        float* o = out + b * ldo + cv;
        Vec::Reg acc = Vec::load_masked(o, tail);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc = Vec::fma(d[b][r], wv[r], acc);
        Vec::store_masked(o, tail, acc);
      }
    }
  }
  // the last n % R weight rows, one at a time (out is already initialised)
  for (; j < n; ++j) {
    SmallGemmOf<T> one = g;
    one.a = g.a + j;
    one.w = g.w + j * g.ldw;
    one.n = 1;
    nn_block<M, 1>(one, out, ldo, false, c0, c1);
  }
}

// bf16 nn: buf (floats, row stride ldb) += a's M rows times W, over W's columns [0, c16) (c16 a
// multiple of 2 kL), which buf holds split per block of 2 kL columns: the even-indexed ones, then
// the odd-indexed ones, as V::load_bf16_split widens a weight row's 2 kL elements. V: the ISA's
// Vec (only ISAs that have the split instantiate this).
template <int M, int R, typename V>
inline void nn_split(const SmallGemmBf16& g, float* buf, int64_t ldb, int64_t c16) {
  using Reg = typename V::Reg;
  const int64_t n = g.n;
  int64_t j = 0;
  for (; j + R <= n; j += R) {
    Reg d[M][R];
#pragma GCC unroll 4
    for (int b = 0; b < M; ++b) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) d[b][r] = Act<c10::BFloat16>::broadcast(g.a + b * g.lda + j + r);
    }
    const c10::BFloat16* w = g.w + j * g.ldw;
    const c10::BFloat16* next = j + 2 * R <= n ? w + R * g.ldw : nullptr;
    for (int64_t c = 0; c < c16; c += 2 * kL) {
      prefetch_next<R>(next, g.ldw, c, c);
      Reg even[M], odd[M];
#pragma GCC unroll 4
      for (int b = 0; b < M; ++b) {
        even[b] = V::load(buf + b * ldb + c);
        odd[b] = V::load(buf + b * ldb + c + kL);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        Reg we, wo;
        V::load_bf16_split(bits(w + r * g.ldw + c), we, wo);
#pragma GCC unroll 4
        for (int b = 0; b < M; ++b) {
          even[b] = V::fma(d[b][r], we, even[b]);
          odd[b] = V::fma(d[b][r], wo, odd[b]);
        }
      }
#pragma GCC unroll 4
      for (int b = 0; b < M; ++b) {
        V::store(buf + b * ldb + c, even[b]);
        V::store(buf + b * ldb + c + kL, odd[b]);
      }
    }
  }
  for (; j < n; ++j) {  // the last n % R weight rows, one at a time
    SmallGemmBf16 one = g;
    one.a = g.a + j;
    one.w = g.w + j * g.ldw;
    one.n = 1;
    nn_split<M, 1, V>(one, buf, ldb, c16);
  }
}

// The bf16 nn product's columns [c0, c1): blocks of kNnBufferColumns columns summed in a float
// buffer (from out's values where g.accumulate), then rounded once into out. The buffer holds
// the blocks' whole 2 kL-column groups split (nn_split), the last columns in order (nn_block).
constexpr int64_t kNnBufferColumns = 256;

template <int M, int R, typename V = Vec>
inline void nn_block_bf16(const SmallGemmBf16& g, int64_t c0, int64_t c1) {
  alignas(64) float buf[M][kNnBufferColumns];
  for (int64_t cb = c0; cb < c1; cb += kNnBufferColumns) {
    const int64_t cols = c1 - cb < kNnBufferColumns ? c1 - cb : kNnBufferColumns;
    const int64_t c16 = cols / (2 * kL) * (2 * kL);
    // the buffer's place of column c
    auto slot = [c16](int64_t c) {
      const int64_t i = c % (2 * kL);
      return c < c16 ? c - i + (i % 2) * kL + i / 2 : c;
    };
    for (int b = 0; b < M; ++b) {
      const c10::BFloat16* o = g.out + b * g.ldo + cb;
      for (int64_t c = 0; c < cols; ++c) {
        buf[b][slot(c)] = g.accumulate ? static_cast<float>(o[c]) : 0.0f;
      }
    }
    SmallGemmBf16 block = g;
    block.w = g.w + cb;  // the weight's columns [cb, cb + cols) as columns [0, cols)
    nn_split<M, R, V>(block, &buf[0][0], kNnBufferColumns, c16);
    if (c16 < cols) nn_block<M, R>(block, &buf[0][0], kNnBufferColumns, false, c16, cols);
    for (int b = 0; b < M; ++b) {
      c10::BFloat16* o = g.out + b * g.ldo + cb;
      for (int64_t c = 0; c < cols; ++c) o[c] = static_cast<c10::BFloat16>(buf[b][slot(c)]);
    }
  }
}

// bf16 tn: columns [c, c + 2 kL) of the output row o = [o +] the sum of coef[b] times weight row
// b, from the even- and the odd-indexed elements of the weight rows (and of o, accumulating),
// rounded and stored in order (V::load_bf16_split, V::store_bf16_split: 16 elements widened in
// two instructions and rounded into one store, where the loads and stores of kL elements take
// about twice the instructions per element). V: the ISA's Vec (only ISAs that have the split
// instantiate this).
template <int M, typename V>
inline void tn_split(const SmallGemmBf16& g, const typename V::Reg (&coef)[M], c10::BFloat16* o,
                     int64_t c) {
  typename V::Reg even = V::zero(), odd = V::zero();
  if (g.accumulate) V::load_bf16_split(bits(o + c), even, odd);
#pragma GCC unroll 4
  for (int b = 0; b < M; ++b) {
    typename V::Reg we, wo;
    V::load_bf16_split(bits(g.w + b * g.ldw + c), we, wo);
    even = V::fma(coef[b], we, even);
    odd = V::fma(coef[b], wo, odd);
  }
  V::store_bf16_split(bits(o + c), even, odd);
}

// Output rows [i0, i1) of the tn product (rank M). In bf16 each output is rounded once, from the
// float sum of its M products (and of its old value, accumulating).
template <int M, typename T>
inline void tn_rows(const SmallGemmOf<T>& g, int64_t i0, int64_t i1) {
  const int64_t k = g.k, kv = k / kL * kL;
  const Vec::Mask tail = Vec::first_lanes(k - kv);
  for (int64_t i = i0; i < i1; ++i) {
    Vec::Reg coef[M];
#pragma GCC unroll 4
    for (int b = 0; b < M; ++b) coef[b] = Act<T>::broadcast(g.a + b * g.lda + i);
    T* o = g.out + i * g.ldo;
    int64_t c = 0;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // 2 kL columns at a time, split into even and odd ones (tn_split), then kL at a time
      for (; c + 2 * kL <= kv; c += 2 * kL) tn_split<M, Vec>(g, coef, o, c);
    }
    for (; c < kv; c += kL) {
      Vec::Reg acc = g.accumulate ? Act<T>::load(o + c) : Vec::zero();
#pragma GCC unroll 4
      for (int b = 0; b < M; ++b) acc = Vec::fma(coef[b], Act<T>::load(g.w + b * g.ldw + c), acc);
      Act<T>::store(o + c, kL, tail, acc);
    }
    if (kv < k) {
      Vec::Reg acc = g.accumulate ? Act<T>::load(o + kv, k - kv, tail) : Vec::zero();
#pragma GCC unroll 4
      for (int b = 0; b < M; ++b) {
        acc = Vec::fma(coef[b], Act<T>::load(g.w + b * g.ldw + kv, k - kv, tail), acc);
      }
      Act<T>::store(o + kv, k - kv, tail, acc);
    }
  }
}

// bf16 tn of many rows: columns [c, c + 4 kL) of the output row o, as tn_split on two groups of
// 2 kL columns at once (four independent sums of K products each).
template <typename V>
inline void tn_split_many(const SmallGemmBf16& g, const typename V::Reg* coef, c10::BFloat16* o,
                          int64_t c) {
  typename V::Reg e0 = V::zero(), o0 = V::zero(), e1 = V::zero(), o1 = V::zero();
  if (g.accumulate) {
    V::load_bf16_split(bits(o + c), e0, o0);
    V::load_bf16_split(bits(o + c + 2 * kL), e1, o1);
  }
  for (int64_t b = 0; b < g.m; ++b) {
    const c10::BFloat16* w = g.w + b * g.ldw + c;
    typename V::Reg we, wo;
    V::load_bf16_split(bits(w), we, wo);
    e0 = V::fma(coef[b], we, e0);
    o0 = V::fma(coef[b], wo, o0);
    V::load_bf16_split(bits(w + 2 * kL), we, wo);
    e1 = V::fma(coef[b], we, e1);
    o1 = V::fma(coef[b], wo, o1);
  }
  V::store_bf16_split(bits(o + c), e0, o0);
  V::store_bf16_split(bits(o + c + 2 * kL), e1, o1);
}

// Output rows [i0, i1) of the tn product of kSmallGemmRows < K = g.m <= kSmallRankRows rows (the
// weight gradients of a short call: every step's rows at once): each output vector summed over
// all K rows in registers and stored once (in bf16 rounded once), so that out is written once
// however many rows there are; four output vectors at a time (independent sums, where one would
// wait on each multiply-add in turn), the K coefficients of an output row broadcast once.
template <typename T>
inline void tn_rows_many(const SmallGemmOf<T>& g, int64_t i0, int64_t i1) {
  constexpr int kU = 4;
  const int64_t K = g.m, k = g.k, kv = k / kL * kL;
  const Vec::Mask tail = Vec::first_lanes(k - kv);
  Vec::Reg coef[kSmallRankRows];
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t b = 0; b < K; ++b) coef[b] = Act<T>::broadcast(g.a + b * g.lda + i);
    T* o = g.out + i * g.ldo;
    int64_t c = 0;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      for (; c + kU * kL <= kv; c += kU * kL) tn_split_many<Vec>(g, coef, o, c);
    }
    for (; c + kU * kL <= kv; c += kU * kL) {
      Vec::Reg acc[kU];
#pragma GCC unroll 4
      for (int u = 0; u < kU; ++u)
        acc[u] = g.accumulate ? Act<T>::load(o + c + u * kL) : Vec::zero();
      for (int64_t b = 0; b < K; ++b) {
        const T* w = g.w + b * g.ldw + c;
#pragma GCC unroll 4
        for (int u = 0; u < kU; ++u) acc[u] = Vec::fma(coef[b], Act<T>::load(w + u * kL), acc[u]);
      }
#pragma GCC unroll 4
      for (int u = 0; u < kU; ++u) Act<T>::store(o + c + u * kL, kL, tail, acc[u]);
    }
    for (; c < kv; c += kL) {
      Vec::Reg acc = g.accumulate ? Act<T>::load(o + c) : Vec::zero();
      for (int64_t b = 0; b < K; ++b)
        acc = Vec::fma(coef[b], Act<T>::load(g.w + b * g.ldw + c), acc);
      Act<T>::store(o + c, kL, tail, acc);
    }
    if (kv < k) {
      Vec::Reg acc = g.accumulate ? Act<T>::load(o + kv, k - kv, tail) : Vec::zero();
      for (int64_t b = 0; b < K; ++b) {
        acc = Vec::fma(coef[b], Act<T>::load(g.w + b * g.ldw + kv, k - kv, tail), acc);
      }
      Act<T>::store(o + kv, k - kv, tail, acc);
    }
  }
}

// Registers: M x R accumulators (nt) or M x R broadcasts (nn), R weight vectors, a row vector.
template <int M>
constexpr int rows_per_pass() {
  if constexpr (M == 1) return 8;
  return (Vec::kRegisters >= 32 || M <= 2) ? 4 : 2;
}

template <typename Fn>
void by_rows(int64_t m, Fn&& fn) {
  switch (m) {
    case 1:
      fn(std::integral_constant<int, 1>{});
      return;
    case 2:
      fn(std::integral_constant<int, 2>{});
      return;
    case 3:
      fn(std::integral_constant<int, 3>{});
      return;
    case 4:
      fn(std::integral_constant<int, 4>{});
      return;
    default:
      bad_dispatch("small gemm: more rows than kSmallGemmRows");
  }
}

}  // namespace small

// Output rows [i0, i1) of the tn product (rank g.m <= kSmallRankRows); every column.
template <typename T>
inline void small_gemm_tn(const SmallGemmOf<T>& g, int64_t i0, int64_t i1) {
  if (g.m > kSmallGemmRows) {
    if (g.m > kSmallRankRows) bad_dispatch("small gemm tn: more rows than kSmallRankRows");
    small::tn_rows_many(g, i0, i1);
    return;
  }
  small::by_rows(g.m, [&](auto m) { small::tn_rows<decltype(m)::value>(g, i0, i1); });
}

// Output columns [j0, j1) (weight rows) of the nt product; every row of g.
template <typename T>
inline void small_gemm_nt(const SmallGemmOf<T>& g, int64_t j0, int64_t j1) {
  small::by_rows(g.m, [&](auto m) {
    constexpr int kM = decltype(m)::value;
    small::nt_block<kM, small::rows_per_pass<kM>()>(g, j0, j1);
  });
}

// Output columns [c0, c1) of the nn product; every row of g.
inline void small_gemm_nn(const SmallGemm& g, int64_t c0, int64_t c1) {
  small::by_rows(g.m, [&](auto m) {
    constexpr int kM = decltype(m)::value;
    small::nn_block<kM, small::rows_per_pass<kM>()>(g, g.out, g.ldo, !g.accumulate, c0, c1);
  });
}

// (a template: instantiated only by the ISAs whose table has it, fused_table.h)
template <typename V = Vec>
inline void small_gemm_nn_bf16(const SmallGemmBf16& g, int64_t c0, int64_t c1) {
  small::by_rows(g.m, [&](auto m) {
    constexpr int kM = decltype(m)::value;
    small::nn_block_bf16<kM, small::rows_per_pass<kM>(), V>(g, c0, c1);
  });
}

}  // namespace FUSEDRNN_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fusedrnn
