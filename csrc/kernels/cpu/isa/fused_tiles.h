// The fused CPU steps, written once over a vector type and compiled once per instruction set:
// kernels/cpu/isa/unit_avx2.h, unit_avx512.h and unit_avx512_bf16.h each define
// FUSEDRNN_ISA_NAMESPACE, switch on their target, define `Vec` (the ISA's float vector: lanes,
// loads, stores, fma, masks, bf16 conversions) and the tile heights, and then include this file,
// which defines that ISA's FusedStepKernels table.
//
// The steps run in fp32 and in bf16. bf16 steps accumulate in float and run the cell math in
// float (step_elements.h); their GEMM reads the bf16 rows of x_t and h_{t-1} and stores the
// pre-activations as bf16. With AVX512_BF16 (Vec::kBf16Dot) the weights are packed as bf16 pairs
// and multiplied by the dot-product instruction (two products per float lane); elsewhere they
// are packed as floats and the bf16 rows converted as they are broadcast.
//
// A step's GEMM is computed tile by tile, MR rows by NV vectors, from weights packed into panels
// (fused_step.h); each tile is handed at once to the step kernel of kernels/step_elements.h (the
// same per-element code as the unfused path and the CUDA kernels), while it is still in L1. This
// removes the separate pointwise pass over the pre-activations and a GEMM call per step.
//
// Everything here lives in namespace fusedrnn::cpu::FUSEDRNN_ISA_NAMESPACE, and nothing from
// ATen is included (fused_isa.h).
#pragma once

#ifndef FUSEDRNN_ISA_NAMESPACE
#error "fused_tiles.h is included by the per-ISA translation units only"
#endif

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kernels/cpu/fused_isa.h"
#include "kernels/cpu/isa/lane_math.h"  // before the cells' structs (see there)
#include "kernels/step_elements.h"

namespace fusedrnn {
namespace cpu {
namespace FUSEDRNN_ISA_NAMESPACE {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

constexpr int kL = Vec::kLanes;

// The element types of the tiles' activations T (the GEMM's rows `a` and its output `out`):
// float, or c10::BFloat16 converted to and from float in the loads and stores (the accumulation
// and the cell math are in float). `count` lanes of a vector exist (mask: the same lanes).
template <typename T>
struct Act;

template <>
struct Act<float> {
  static Vec::Reg broadcast(const float* p) { return Vec::broadcast(p); }
  static Vec::Reg load(const float* p) { return Vec::load(p); }  // a whole vector
  static Vec::Reg load(const float* p, int64_t, Vec::Mask mask) {
    return Vec::load_masked(p, mask);
  }
  static void store(float* p, int64_t count, Vec::Mask mask, Vec::Reg v) {
    if (count == kL) {
      Vec::store(p, v);
    } else {
      Vec::store_masked(p, mask, v);
    }
  }
};

template <>
struct Act<c10::BFloat16> {
  using T = c10::BFloat16;
  static const uint16_t* bits(const T* p) { return reinterpret_cast<const uint16_t*>(p); }
  static uint16_t* bits(T* p) { return reinterpret_cast<uint16_t*>(p); }
  static Vec::Reg broadcast(const T* p) {
    const float f = static_cast<float>(*p);
    return Vec::broadcast(&f);
  }
  static Vec::Reg load(const T* p) { return Vec::load_bf16(bits(p)); }  // a whole vector
  // A partial vector goes through a float buffer, element by element (the last vector of a
  // panel whose units do not fill it).
  static Vec::Reg load(const T* p, int64_t count, Vec::Mask) {
    if (count == kL) return load(p);
    alignas(64) float buf[kL] = {};
    for (int64_t l = 0; l < count; ++l) buf[l] = static_cast<float>(p[l]);
    return Vec::load(buf);
  }
  static void store(T* p, int64_t count, Vec::Mask, Vec::Reg v) {
    if (count == kL) {
      Vec::store_bf16(bits(p), v);
      return;
    }
    alignas(64) float buf[kL];
    Vec::store(buf, v);
    for (int64_t l = 0; l < count; ++l) p[l] = static_cast<T>(buf[l]);
  }
};

// A GEMM operand resolved for one panel: `a` of the step's type T, K rows of the panels (pairs
// of bf16 where Vec::kBf16Dot and T is bf16, else floats), ka columns of a.
template <typename T>
struct PanelSource {
  const T* a;
  int64_t lda;
  const float* panel;
  int64_t K;
  int64_t ka;
};

// Whether the tiles of T read bf16 pairs (the dot-product instructions) rather than floats.
template <typename T>
constexpr bool kPairs = std::is_same_v<T, c10::BFloat16> && Vec::kBf16Dot;

// acc += rows [0, MR) of a (bf16, ka columns) times the K pair rows of a panel pass of NV
// vectors: per pair row, each row's two elements broadcast as one 32-bit value and a dot
// product of pairs per vector (V: the ISA's Vec; a template parameter, so that only ISAs with
// the instructions instantiate it). With odd ka, the last element is paired with a zero.
template <int NV, int MR, typename V>
inline void accumulate_pairs(const c10::BFloat16* a, int64_t lda, const float* panel, int64_t K,
                             int64_t ka, typename V::Reg (&acc)[MR][NV]) {
  const uint16_t* ab = reinterpret_cast<const uint16_t*>(a);
  const int64_t whole = ka / 2;
#pragma GCC unroll 2
  for (int64_t k = 0; k < whole; ++k) {
    const float* b = panel + k * (NV * kL);
    typename V::Reg bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + v * kL);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename V::Pair av = V::broadcast_pair(ab + r * lda + 2 * k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::dot_pairs(acc[r][v], av, bv[v]);
    }
  }
  if (whole < K) {
    const float* b = panel + whole * (NV * kL);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename V::Pair av = V::broadcast_low(ab + r * lda + 2 * whole);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::dot_pairs(acc[r][v], av, V::load(b + v * kL));
    }
  }
}

// One pass over an output tile: MR rows x NV vectors, summed over the sources, from the pass's
// part of the panels (K rows of NV vectors, fused_step.h). Vector v of row r is stored at out + r *
// ldo + v * col_stride, its first count[v] lanes (the units that exist).
template <int NV, int MR, bool kAcc, typename TA, typename T>
inline void gemm_pass(const PanelSource<TA>* src, int nsrc, int64_t row0, T* out, int64_t ldo,
                      int64_t col_stride, const int64_t* count, const Vec::Mask* mask) {
  Vec::Reg acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec::zero();
  }
  for (int q = 0; q < nsrc; ++q) {
    const TA* a = src[q].a + row0 * src[q].lda;
    const int64_t lda = src[q].lda, K = src[q].K;
    const float* panel = src[q].panel;
    if constexpr (kPairs<TA>) {
      accumulate_pairs<NV, MR, Vec>(a, lda, panel, K, src[q].ka, acc);
    } else {
#pragma GCC unroll 2
      for (int64_t k = 0; k < K; ++k) {
        const float* b = panel + k * (NV * kL);
        Vec::Reg bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bv[v] = Vec::load(b + v * kL);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const Vec::Reg av = Act<TA>::broadcast(a + r * lda + k);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = Vec::fma(av, bv[v], acc[r][v]);
        }
      }
    }
  }
  if constexpr (kAcc) {  // out += the product
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (count[v] == 0) continue;
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        acc[r][v] =
            Vec::add(acc[r][v], Act<T>::load(out + r * ldo + v * col_stride, count[v], mask[v]));
      }
    }
  }
  // Whole-vector stores where the vector is full: the loads of the step kernel that follow at
  // once are then served from the store buffer.
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    if (count[v] == 0) continue;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      Act<T>::store(out + r * ldo + v * col_stride, count[v], mask[v], acc[r][v]);
    }
  }
}

// One output tile of MR rows x NV vectors (all the gates of the panel's units), in passes of at
// most kPass vectors: AVX2's 16 registers hold 5 rows x 2 vectors of accumulators, so its
// 4-vector tiles take two passes over the (L1-resident) rows of the sources. Each pass reads its
// own contiguous part of the panel.
template <int NV, int kPass, int MR, bool kAcc, typename TA, typename T>
inline void gemm_tile(const PanelSource<TA>* src, int nsrc, int64_t row0, T* out, int64_t ldo,
                      int64_t col_stride, const int64_t* count, const Vec::Mask* mask) {
  constexpr int kNow = NV < kPass ? NV : kPass;
  gemm_pass<kNow, MR, kAcc>(src, nsrc, row0, out, ldo, col_stride, count, mask);
  if constexpr (NV > kNow) {
    PanelSource<TA> rest[2];
    for (int q = 0; q < nsrc; ++q) {
      rest[q] = src[q];
      rest[q].panel += kNow * src[q].K * kL;
    }
    gemm_tile<NV - kNow, kPass, MR, kAcc>(rest, nsrc, row0, out + kNow * col_stride, ldo,
                                          col_stride, count + kNow, mask + kNow);
  }
}

// A tile of `rows` < MR rows, by recursion on the tile height (each height is its own kernel).
template <int NV, int kPass, int MR, bool kAcc, typename TA, typename T>
inline void gemm_tail(int rows, const PanelSource<TA>* src, int nsrc, int64_t row0, T* out,
                      int64_t ldo, int64_t col_stride, const int64_t* count,
                      const Vec::Mask* mask) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      gemm_tile<NV, kPass, MR, kAcc>(src, nsrc, row0, out, ldo, col_stride, count, mask);
    } else {
      gemm_tail<NV, kPass, MR - 1, kAcc>(rows, src, nsrc, row0, out, ldo, col_stride, count, mask);
    }
  }
}

// The floats of a tile's widened bf16 rows (gemm_panels): MR rows of every source, 64 KB of
// the stack, i.e. sources of up to 3276 columns in all at AVX2's 5-row tiles.
constexpr int64_t kWidenFloats = 16384;

// rows x ka bf16 elements (row stride lda) to floats, row stride ka.
inline void widen_rows(const c10::BFloat16* a, int64_t lda, int64_t rows, int64_t ka, float* w) {
  for (int64_t r = 0; r < rows; ++r) {
    const c10::BFloat16* row = a + r * lda;
    float* wr = w + r * ka;
    int64_t k = 0;
    for (; k + kL <= ka; k += kL) {
      Vec::store(wr + k, Act<c10::BFloat16>::load(row + k));
    }
    for (; k < ka; ++k) wr[k] = static_cast<float>(row[k]);
  }
}

// Panels [p0, p1) of out = (kAcc: +=) the GEMM g, for rows [0, g.rows), kGroup consecutive
// panels at a time: per tile height, the tiles of the group's panels, then epi(r0, rows, j0,
// units) on the group's units (consecutive); tail(j0, units) after the group's last tiles.
// Groups of more than one panel are for bf16 steps of gated panels (kEpiUnits): their kernel's
// loop mixes 16-bit and 32-bit elements, which gcc vectorises with vectors of the 16-bit
// elements' width only when the loop has that many iterations (32 at 512 bits, 16 at 256): over
// one 16-unit AVX-512 panel it would run the cell math on 256-bit vectors (8 lanes), over one
// 8-unit AVX2 panel on 128-bit ones.
template <int NV, bool kAcc, int kGroup = 1, typename T, typename Epi, typename Tail>
void gemm_panels(const PanelGemm& g, T* out, int64_t ldo, int64_t p0, int64_t p1, const Epi& epi,
                 const Tail& tail) {
  constexpr int MR = NV == 4 ? Vec::kRows4 : Vec::kRows3;
  constexpr int kPass = NV == 4 ? Vec::kPass4 : Vec::kPass3;
  static_assert(NV == 3 || NV == 4, "panels hold 3 or 4 vectors");
  if (g.nv != NV || g.lanes != kL || g.pass_vectors != kPass || g.nsrc < 1 || g.nsrc > 2 ||
      g.pairs != kPairs<T>) {
    bad_dispatch("fused step: operands packed for another kernel");
  }
  const int64_t n = g.rows, panel_floats = NV * kL;  // per row k of a panel
  // bf16 rows where the ISA has no bf16 dot product and a tile takes more than one pass (AVX2's
  // 4-vector tiles): each tile height's rows of the sources are widened to floats once for the
  // group's panels, so that the passes' inner loops broadcast a float from memory (one
  // instruction) instead of widening an element at each broadcast (a 16-bit load, a shift, a
  // move to a vector register and the broadcast), once per pass. A one-pass tile broadcasts each
  // element once, and there the widening in the broadcast is hidden behind the tile's FMAs: a
  // buffer only adds its stores and loads (measured on Zen 1: the layer-normalised GRU's bf16
  // forward 4-18% slower with it). Where the rows do not fit the buffer, they are widened in the
  // broadcasts.
  constexpr bool kWiden = std::is_same_v<T, c10::BFloat16> && !kPairs<T> && NV > kPass;
  [[maybe_unused]] alignas(64) float wide[kWiden ? kWidenFloats : 1];
  int64_t widened = 0;
  for (int q = 0; q < g.nsrc; ++q) widened += MR * g.src[q].ka;
  [[maybe_unused]] const bool widen = kWiden && widened <= kWidenFloats;
  for (int64_t pb0 = p0; pb0 < p1; pb0 += kGroup) {
    const int64_t group = imin(kGroup, p1 - pb0);
    const int64_t j0 = pb0 * g.unit_block;
    int64_t all_units = 0;
    int64_t count[kGroup][NV] = {};
    Vec::Mask mask[kGroup][NV] = {};
    PanelSource<T> src[kGroup][2] = {};
    for (int64_t e = 0; e < group; ++e) {
      const int64_t pb = pb0 + e;
      const int64_t units = imin(g.unit_block, g.units - pb * g.unit_block);
      all_units += units;
      for (int v = 0; v < NV; ++v) {
        count[e][v] = imax(0, imin(kL, g.gates == 1 ? units - v * kL : units));
        mask[e][v] = Vec::first_lanes(count[e][v]);
      }
      for (int q = 0; q < g.nsrc; ++q) {
        src[e][q] = {static_cast<const T*>(g.src[q].a), g.src[q].lda,
                     g.src[q].panels + pb * g.src[q].K * panel_floats, g.src[q].K, g.src[q].ka};
      }
    }
    // The tiles of rows [r, r + rows) of every panel of the group, from the sources as they are
    // or from their rows widened to floats (row0 0: the widened rows start at the buffer).
    auto tiles = [&](int64_t r, int64_t rows, const auto& s, int64_t row0) {
      for (int64_t e = 0; e < group; ++e) {
        T* const o = out + r * ldo + j0 + e * g.unit_block;
        if (rows == MR) {
          gemm_tile<NV, kPass, MR, kAcc>(s[e], g.nsrc, row0, o, ldo, g.col_stride, count[e],
                                         mask[e]);
        } else {
          gemm_tail<NV, kPass, MR - 1, kAcc>(static_cast<int>(rows), s[e], g.nsrc, row0, o, ldo,
                                             g.col_stride, count[e], mask[e]);
        }
      }
      epi(r, rows, j0, all_units);
    };
    for (int64_t r = 0; r < n; r += MR) {
      const int64_t rows = imin(MR, n - r);
      if constexpr (kWiden) {
        if (widen) {
          PanelSource<float> wsrc[kGroup][2] = {};
          float* w = wide;
          for (int q = 0; q < g.nsrc; ++q) {
            widen_rows(src[0][q].a + r * src[0][q].lda, src[0][q].lda, rows, src[0][q].ka, w);
            for (int64_t e = 0; e < group; ++e) {
              wsrc[e][q] = {w, src[e][q].ka, src[e][q].panel, src[e][q].K, src[e][q].ka};
            }
            w += MR * src[0][q].ka;
          }
          tiles(r, rows, wsrc, 0);
          continue;
        }
      }
      tiles(r, rows, src, r);
    }
    tail(j0, all_units);
  }
}

// The panels per step-kernel call of gated panels (a panel: kL units of every gate), and the
// units of a whole call: 32 units for bf16 (see gemm_panels), one panel for float.
template <typename T>
constexpr int kEpiGroup = std::is_same_v<T, c10::BFloat16> && kL < 32 ? 32 / kL : 1;
template <typename T>
constexpr int64_t kEpiUnits = kEpiGroup<T> * kL;

// fn(b, j) over rows [r0, r0 + rows) and units [j0, j0 + units); a whole block of kBlock units
// as a fixed-length loop, which the compiler turns into whole-vector code (no masks, no
// remainder).
template <int64_t kBlock, typename Fn>
__attribute__((always_inline)) inline void for_tile(int64_t r0, int64_t rows, int64_t j0,
                                                    int64_t units, const Fn& fn) {
  if (units == kBlock) {
    for (int64_t b = r0; b < r0 + rows; ++b) {
      // (not unrolled: a loop of exactly one AVX2 vector's length would otherwise be unrolled
      // into scalar code before the vectoriser sees it)
#pragma GCC ivdep
#pragma GCC unroll 1
      for (int64_t l = 0; l < kBlock; ++l) fn(b, j0 + l);
    }
  } else {
    for (int64_t b = r0; b < r0 + rows; ++b) {
#pragma GCC ivdep
      for (int64_t j = j0; j < j0 + units; ++j) fn(b, j);
    }
  }
}

inline void no_tail(int64_t, int64_t) {}

// Whether a step of cell kCell in T runs its lane element on whole vectors (lstm_backward_lanes,
// gru_forward_lanes, gru_backward_lanes): bf16 steps of the one-phase cells, where the Vec has the
// lane math (lane_math.h). (The LSTM family's forward keeps the compiler-vectorised element: its
// lane version measured ~3% slower on Zen 4.)
template <typename T, CellKind kCell>
constexpr bool kLaneCell =
    std::is_same_v<T, c10::BFloat16> && Vec::kLaneMath && !traits(kCell).two_phase;

__attribute__((always_inline)) inline Lanes<Vec> load_lanes(const c10::BFloat16* q) {
  return Vec::load_bf16(reinterpret_cast<const uint16_t*>(q));
}
__attribute__((always_inline)) inline void store_lanes(c10::BFloat16* q, Lanes<Vec> v) {
  Vec::store_bf16(reinterpret_cast<uint16_t*>(q), v.r);
}

template <typename T>
void lstm_forward(CellKind cell, Phase phase, const LSTMForwardStep<T>& p, T* out, int64_t ldo,
                  const PanelGemm& g, int64_t p0, int64_t p1) {
  dispatch_lstm_family(cell, phase, [&](auto c, auto ph) {
    constexpr CellKind kCell = decltype(c)::value;
    constexpr Phase kPhase = decltype(ph)::value;
    dispatch_bool(p.bias != nullptr, [&](auto bias) {
      dispatch_on_off(p.save_gates, [&](auto save) {
        dispatch_on_off(p.h_state != nullptr, [&](auto h_state) {
          // c_t only (kCellOnly): a projected step, which has no h_state
          constexpr bool kCellOnly_ = decltype(h_state)::value == kOff;
          dispatch_zone<kTilesZone<kCell, kPhase>, kCellOnly_>(p, [&](auto zone) {
            auto epi = [&](int64_t r0, int64_t rows, int64_t j0, int64_t units) {
              const LSTMForwardStep<T> q = p;  // a local copy: stores cannot alias its pointers
              for_tile<kEpiUnits<T>>(
                  r0, rows, j0, units, [&](int64_t b, int64_t j) __attribute__((always_inline)) {
                    lstm_forward_element<kCell, kPhase, decltype(bias)::value, /*kHg=*/false,
                                         decltype(save)::value, decltype(h_state)::value,
                                         decltype(zone)::value>(q, b, j);
                  });
            };
            if constexpr (traits(kCell).two_phase && kPhase == Phase::kO) {
              gemm_panels<3, false, kEpiGroup<T>>(g, out, ldo, p0, p1, epi, no_tail);
            } else {
              gemm_panels<4, false, kEpiGroup<T>>(g, out, ldo, p0, p1, epi, no_tail);
            }
          });
        });
      });
    });
  });
}

// lstm_backward_element of a one-phase cell (kernels/step_elements.h) on the kL units
// [j, j + kL) of row b at once, the cell's math on Lanes<Vec>: the same loads, cell, zoneout and
// stores, vector by vector. kZone: kOn or kOff (the tiles do not run a projected step's
// backward).
template <CellKind kCell, int kDy, int kPrev, int kZone>
__attribute__((always_inline)) inline void lstm_backward_lanes(
    const LSTMBackwardStep<c10::BFloat16>& p, int64_t b, int64_t j) {
  static_assert(kZone == kOn || kZone == kOff, "the tiles' backward zones both states or none");
  using F = Lanes<Vec>;
  using Cell = math_of<kCell, F>;
  using T = c10::BFloat16;
  const auto ld = load_lanes;
  const auto st = store_lanes;
  const int64_t H = p.H, s = b * H + j;
  const T* gt = p.gates + b * p.ld_gates + j;
  const F i = ld(gt), f = ld(gt + H), g = ld(gt + 2 * H), o = ld(gt + 3 * H);
  F c = ld(p.c + b * p.ld_c + j);
  const F c_prev = ld(prev_row<kPrev>(p.c_prev, p.ld_c_prev, p.c_init, p.m_prev, H, b) + j);
  F dh = ld(p.dh + b * p.ld_dh + j);
  if constexpr (kDy == kOn) dh = dh + ld(p.dy + b * p.ld_dy + j);
  const F dc = ld(p.dc_state + s);
  F da_i, da_f, da_g, da_o, dc_prev;
  auto backward = [&](F dh_cell, F dc_cell) {
    if constexpr (traits(kCell).weight_ch == WeightCh::kNone) {
      Cell::backward(i, f, g, o, c, c_prev, dh_cell, dc_cell, da_i, da_f, da_g, da_o, dc_prev);
    } else {
      Cell::backward(i, f, g, o, c, c_prev, ld(p.peephole + j), ld(p.peephole + H + j),
                     ld(p.peephole + 2 * H + j), dh_cell, dc_cell, da_i, da_f, da_g, da_o, dc_prev);
    }
  };
  if constexpr (kZone == kOn) {
    // the cell's own new state, before zoneout (the peephole's o read it: kept for w_co's
    // gradient); the gradients of h_t and c_t split between it (1 - d) and the previous state
    c = f * c_prev + i * g;
    if constexpr (traits(kCell).weight_ch != WeightCh::kNone) st(p.c_own + s, c);
    const F d_c = ld(p.zone_c + b * p.ld_zone_c + j), d_h = ld(p.zone_h + b * p.ld_zone_h + j);
    backward((F(1.0f) - d_h) * dh, (F(1.0f) - d_c) * dc);
    dc_prev = dc_prev + d_c * dc;
    st(p.dh_carry + s, d_h * dh);
  } else {
    backward(dh, dc);
  }
  T* da = p.dgates + b * p.ld_dgates + j;
  st(da, da_i);
  st(da + H, da_f);
  st(da + 2 * H, da_g);
  st(da + 3 * H, da_o);
  st(p.dc_state + s, dc_prev);
}

// A backward step: out[0:g.rows] (=, or += with kAcc) the GEMM tile by tile, then
// element(dy, prev, q, b, j) on each tile's rows below p.n; then, per panel, on rows
// [g.rows, p.n), whose input the GEMM does not produce (it is already in place). dy and prev are
// the kDy / kPrev tags of kernels/step_elements.h, fixed per step and per tile.
template <bool kAcc, typename T, typename Step, typename Element,
          typename LaneElement = std::nullptr_t>
void backward_panels(const Step& p, T* out, int64_t ldo, const PanelGemm& g, int64_t p0, int64_t p1,
                     const Element& element, const LaneElement& lanes = nullptr) {
  constexpr int64_t kBlock = 4 * kL;  // plain panels: 4 vectors of consecutive units
  dispatch_on_off(p.dy != nullptr, [&](auto dy) {
    // rows [r0, r0 + rows) of units [j0, j0 + units)
    auto run = [&](int64_t r0, int64_t rows, int64_t j0, int64_t units) {
      const Step q = p;  // a local copy: stores cannot alias its pointers
      auto tile = [&](auto prev) {
        // whole panels by the lane element where there is one: (dy, prev, q, b, j) on kL units
        if constexpr (!std::is_same_v<LaneElement, std::nullptr_t>) {
          if (units == kBlock) {
            for (int64_t b = r0; b < r0 + rows; ++b) {
#pragma GCC unroll 4
              for (int64_t j = j0; j < j0 + kBlock; j += kL) lanes(dy, prev, q, b, j);
            }
            return;
          }
        }
        for_tile<kBlock>(r0, rows, j0, units,
                         [&](int64_t b, int64_t j)
                             __attribute__((always_inline)) { element(dy, prev, q, b, j); });
      };
      if (r0 + rows <= p.m_prev) {
        tile(IntTag<kOn>{});
      } else if (r0 >= p.m_prev) {
        tile(IntTag<kOff>{});
      } else {
        tile(IntTag<kRuntime>{});
      }
    };
    auto epi = [&](int64_t r0, int64_t rows, int64_t j0, int64_t units) {
      rows = imin(rows, p.n - r0);  // GEMM rows past the step's are gradients of h0 only
      if (rows > 0) run(r0, rows, j0, units);
    };
    auto tail = [&](int64_t j0, int64_t units) {
      if (p.n > g.rows) run(g.rows, p.n - g.rows, j0, units);
    };
    if (g.rows > 0) {
      gemm_panels<4, kAcc>(g, out, ldo, p0, p1, epi, tail);
    } else {
      for (int64_t pb = p0; pb < p1; ++pb) {
        const int64_t j0 = pb * g.unit_block;
        tail(j0, imin(g.unit_block, g.units - j0));
      }
    }
  });
}

template <typename T>
void lstm_backward(CellKind cell, Phase phase, const LSTMBackwardStep<T>& p, T* out, int64_t ldo,
                   const PanelGemm& g, int64_t p0, int64_t p1) {
  dispatch_lstm_family(cell, phase, [&](auto c, auto ph) {
    constexpr CellKind kCell = decltype(c)::value;
    constexpr Phase kPhase = decltype(ph)::value;
    // The GEMM writes what the phase's kernel reads: dh (=) before kWhole / kO, dc (+=) before
    // the WM kIFG phase; under zoneout dh (+=) onto the direct part the previous processed
    // step's kernel wrote (dh_carry).
    constexpr bool kIntoDc = traits(kCell).two_phase && kPhase == Phase::kIFG;
    // (a projected step's backward, zoning c_t only, is not tiled, nor a zoned working-memory
    // step's)
    dispatch_zone<!traits(kCell).two_phase, false>(p, [&](auto zone) {
      constexpr int kZone = decltype(zone)::value;
      auto element = [&](auto dy, auto prev, const LSTMBackwardStep<T>& q, int64_t b,
                         int64_t j) __attribute__((always_inline)) {
        lstm_backward_element<kCell, kPhase, decltype(dy)::value, decltype(prev)::value, kZone>(
            q, b, j);
      };
      if constexpr (kLaneCell<T, kCell>) {
        auto lanes = [&](auto dy, auto prev, const LSTMBackwardStep<T>& q, int64_t b,
                         int64_t j) __attribute__((always_inline)) {
          lstm_backward_lanes<kCell, decltype(dy)::value, decltype(prev)::value, kZone>(q, b, j);
        };
        backward_panels<kIntoDc || kZone == kOn>(p, out, ldo, g, p0, p1, element, lanes);
      } else {
        backward_panels<kIntoDc || kZone == kOn>(p, out, ldo, g, p0, p1, element);
      }
    });
  });
}

// gru_forward_element (kernels/step_elements.h) on the kL units [j, j + kL) of row b at once,
// as lstm_backward_lanes.
template <bool kBias, int kZone>
__attribute__((always_inline)) inline void gru_forward_lanes(const GRUForwardStep<c10::BFloat16>& p,
                                                             int64_t b, int64_t j) {
  using F = Lanes<Vec>;
  using T = c10::BFloat16;
  const auto ld = load_lanes;
  const auto st = store_lanes;
  const int64_t H = p.H, s = b * H + j;
  T* a = p.gates + b * p.ld_gates + j;
  const T* hg = p.hg + b * p.ld_hg + j;
  F x[3], hh[3];
  for (int k = 0; k < 3; ++k) {
    x[k] = ld(a + k * H);
    hh[k] = ld(hg + k * H);
    if constexpr (kBias) {
      x[k] = x[k] + ld(p.bias_ih + k * H + j);
      hh[k] = hh[k] + ld(p.bias_hh + k * H + j);
    }
  }
  F r, z, n, h;
  const F h_prev = ld(p.h_state + s);
  math_of<CellKind::kGRU, F>::forward(x[0], x[1], x[2], hh[0], hh[1], hh[2], h_prev, r, z, n, h);
  if (zones<kZone>(p)) h = zoned(ld(p.zone_h + b * p.ld_zone_h + j), h_prev, h);
  st(a, r);
  st(a + H, z);
  st(a + 2 * H, n);
  st(a + 3 * H, hh[2]);
  st(p.h_state + s, h);
  st(p.h_out + b * p.ld_h_out + j, h);
}

// gru_backward_element on the kL units [j, j + kL) of row b at once, as lstm_backward_lanes.
template <int kDy, int kPrev, int kZone>
__attribute__((always_inline)) inline void gru_backward_lanes(
    const GRUBackwardStep<c10::BFloat16>& p, int64_t b, int64_t j) {
  using F = Lanes<Vec>;
  using T = c10::BFloat16;
  const auto ld = load_lanes;
  const auto st = store_lanes;
  const int64_t H = p.H, s = b * H + j;
  const T* gt = p.gates + b * p.ld_gates + j;
  F dh = ld(p.dh_state + s);
  if constexpr (kDy == kOn) dh = dh + ld(p.dy + b * p.ld_dy + j);
  const F h_prev = ld(prev_row<kPrev>(p.h_prev, p.ld_h_prev, p.h_init, p.m_prev, H, b) + j);
  // zoned: the cell's h̃_t takes (1 - d) of dh, the previous state d of it
  F d, dh_cell = dh;
  if constexpr (kZone == kOn) {
    d = ld(p.zone_h + b * p.ld_zone_h + j);
    dh_cell = (F(1.0f) - d) * dh;
  }
  F dx_r, dx_z, dx_n, dh_n, dh_prev;
  math_of<CellKind::kGRU, F>::backward(ld(gt), ld(gt + H), ld(gt + 2 * H), ld(gt + 3 * H), h_prev,
                                       dh_cell, dx_r, dx_z, dx_n, dh_n, dh_prev);
  if constexpr (kZone == kOn) dh_prev = dh_prev + d * dh;
  T* dx = p.dx + b * p.ld_dx + j;
  T* dhg = p.dhg + b * p.ld_dhg + j;
  st(dx, dx_r);
  st(dx + H, dx_z);
  st(dx + 2 * H, dx_n);
  st(dhg, dx_r);
  st(dhg + H, dx_z);
  st(dhg + 2 * H, dh_n);
  st(p.dh_state + s, dh_prev);
}

template <typename T>
void gru_forward(const GRUForwardStep<T>& p, const PanelGemm& g, int64_t p0, int64_t p1) {
  dispatch_bool(p.bias_ih != nullptr, [&](auto bias) {
    dispatch_on_off(p.zone_h != nullptr, [&](auto zone) {
      constexpr bool kBias = decltype(bias)::value;
      constexpr int kZone = decltype(zone)::value;
      auto epi = [&](int64_t r0, int64_t rows, int64_t j0, int64_t units) {
        const GRUForwardStep<T> q = p;
        if constexpr (kLaneCell<T, CellKind::kGRU>) {
          if (units == kEpiUnits<T>) {
            for (int64_t b = r0; b < r0 + rows; ++b) {
#pragma GCC unroll 4
              for (int64_t j = j0; j < j0 + units; j += kL) {
                gru_forward_lanes<kBias, kZone>(q, b, j);
              }
            }
            return;
          }
        }
        for_tile<kEpiUnits<T>>(r0, rows, j0, units,
                               [&](int64_t b, int64_t j) __attribute__((always_inline)) {
                                 gru_forward_element<kBias, kZone>(q, b, j);
                               });
      };
      gemm_panels<3, false, kEpiGroup<T>>(g, const_cast<T*>(p.hg), p.ld_hg, p0, p1, epi, no_tail);
    });
  });
}

template <typename T>
void gru_backward(const GRUBackwardStep<T>& p, const PanelGemm& g, int64_t p0, int64_t p1) {
  dispatch_on_off(p.zone_h != nullptr, [&](auto zone) {
    constexpr int kZone = decltype(zone)::value;
    auto element = [&](auto dy, auto prev, const GRUBackwardStep<T>& q, int64_t b,
                       int64_t j) __attribute__((always_inline)) {
      gru_backward_element<decltype(dy)::value, decltype(prev)::value, kZone>(q, b, j);
    };
    if constexpr (kLaneCell<T, CellKind::kGRU>) {
      auto lanes = [&](auto dy, auto prev, const GRUBackwardStep<T>& q, int64_t b,
                       int64_t j) __attribute__((always_inline)) {
        gru_backward_lanes<decltype(dy)::value, decltype(prev)::value, kZone>(q, b, j);
      };
      backward_panels<true>(p, p.dh_state, p.H, g, p0, p1, element, lanes);
    } else {
      backward_panels<true>(p, p.dh_state, p.H, g, p0, p1, element);
    }
  });
}

// The GEMM of panels [p0, p1) alone: out = (accumulate: +=) the product, no step kernel.
template <typename T>
void panel_gemm_only(const PanelGemm& g, T* out, int64_t ldo, bool accumulate, int64_t p0,
                     int64_t p1) {
  auto none = [](int64_t, int64_t, int64_t, int64_t) {};
  dispatch_bool(accumulate, [&](auto acc) {
    if (g.nv == 3) {
      gemm_panels<3, decltype(acc)::value>(g, out, ldo, p0, p1, none, no_tail);
    } else {
      gemm_panels<4, decltype(acc)::value>(g, out, ldo, p0, p1, none, no_tail);
    }
  });
}

}  // namespace FUSEDRNN_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fusedrnn

// The LSTM steps take most of the compile time of an ISA's tiles (every cell, phase and option
// their dispatch fixes at compile time): each ISA instantiates them in units of their own,
// <isa>_lstm_forward_f32.cpp, <isa>_lstm_forward_bf16.cpp and <isa>_lstm_backward.cpp
// (`template`), which a parallel build compiles side by side, and its table unit <isa>_tiles.cpp
// declares them (`extern template`, fused_table.h). Used inside namespace
// fusedrnn::cpu::FUSEDRNN_ISA_NAMESPACE.
#define FUSEDRNN_LSTM_FORWARD_TILES(kw, T)                                         \
  kw void lstm_forward<T>(CellKind, Phase, const LSTMForwardStep<T>&, T*, int64_t, \
                          const PanelGemm&, int64_t, int64_t)
#define FUSEDRNN_LSTM_BACKWARD_TILES(kw, T)                                          \
  kw void lstm_backward<T>(CellKind, Phase, const LSTMBackwardStep<T>&, T*, int64_t, \
                           const PanelGemm&, int64_t, int64_t)
