// One element (row b, unit j) of each fused step kernel: loads from the step structs of
// kernels/kernels.h, the cell math of cells/*.h, stores. Shared verbatim by the CPU loops
// (kernels/cpu/kernels_cpu.cpp) and the CUDA kernels (kernels/cuda/kernels.cu).
//
// A cell is reached through its kind only: its math is CellMath<kCell>::type (declared by its
// header), and what differs between the LSTM family's elements is a trait of cells/traits.h,
// never a kind: the operands of the cell connections (none, the diagonal peepholes, the full
// matrices' products) and whether the step runs in two phases around a GEMM of c_t.
#pragma once

#include <ATen/OpMathType.h>

#include <type_traits>

#include "kernels.h"
#define FUSEDRNN_CELL_MATH
#include "cells/traits.h"  // the cells' math headers (see the end of traits.h)

namespace fusedrnn {
FUSEDRNN_ISA_BEGIN

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// The math struct of a cell, checked against its row of the table.
template <CellKind kCell, typename acc_t>
struct MathOf {
  using type = typename CellMath<kCell>::template type<acc_t>;
  static_assert(type::kGates == traits(kCell).gates,
                "a cell's gate count must be that of cells/traits.h");
};
template <CellKind kCell, typename acc_t>
using math_of = typename MathOf<kCell, acc_t>::type;

template <typename scalar_t>
FUSEDRNN_HD acc_type<scalar_t> ld(const scalar_t* p, int64_t i) {
  return static_cast<acc_type<scalar_t>>(p[i]);
}

// Options of an element that the caller may fix at compile time, so that the loop over a row's
// units carries no branch (AVX2 code cannot vectorise one): kRuntime reads the step struct;
// kOff / kOn fix the answer. A caller passing kOff / kOn must know it holds for every element it
// runs: forward kSave = p.save_gates, kHState = p.h_state != nullptr; backward kDy =
// p.dy != nullptr, kPrev = kOn when every row is below p.m_prev (its previous state is the
// previous step's row), kOff when none is.
// kZone = kOn when the step zones its states (p.zone_h set), kCellOnly when an LSTM-family step
// zones c_t only (p.zone_c set, p.zone_h not: a projected LSTM, whose h_t is zoned after the
// projection, ZoneStep), kOff when it zones none. (The values: cells/common.h.)
// kDy has no run-time form: a step without an output gradient (dy null: every cell backward, a
// layer whose loss reads only h_n) must not even form a load from dy. Left to the compiler, the
// vectorised `if (has_dy) dh += dy[j]` became a masked load with every lane off from address 0,
// which real CPUs suppress and emulators (QEMU user mode) fault on.
template <int kValue>
using IntTag = std::integral_constant<int, kValue>;

// fn(IntTag<kOn>) or fn(IntTag<kOff>): an option fixed for a whole step (host code).
template <typename Fn>
inline void dispatch_on_off(bool on, const Fn& fn) {
  if (on) {
    fn(IntTag<kOn>{});
  } else {
    fn(IntTag<kOff>{});
  }
}

// Whether an LSTM-family cell's kernels zone: every one's on the step-kernel path (the GRU's
// always can). The fused tiles' forward zones the one-phase cells' steps and the working-memory
// cell's first phase (kTilesZone; a tile of its second phase's GEMM would need the cell's own
// c̃_t for u_o and the zoned c_t for the next step's u_i, u_f: its zoned steps run two GEMMs and
// the step kernel of that phase, recurrence/lstm.cpp); their backward, the one-phase cells'
// (a zoned working-memory backward runs GEMM + step kernel).
template <CellKind kCell>
constexpr bool kZoneable = traits(kCell).has_cell_state;
template <CellKind kCell, Phase kPhase>
constexpr bool kTilesZone = !traits(kCell).two_phase || kPhase == Phase::kIFG;

// The kZone of an LSTM-family step p, as an IntTag to fn (host code): kOn, kCellOnly or kOff.
// kCan false (a cell the caller runs without zoneout) compiles the kOff case only, kCellOnly
// false (no projection reaches the caller) not the kCellOnly case; a step they exclude is an
// internal error.
template <bool kCan, bool kCellOnly_ = kCan, typename Step, typename Fn>
inline void dispatch_zone(const Step& p, const Fn& fn) {
  if (p.zone_c == nullptr && p.zone_h == nullptr) return fn(IntTag<kOff>{});
  if constexpr (kCan) {
    if (p.zone_h != nullptr && p.zone_c != nullptr) return fn(IntTag<kOn>{});
    if constexpr (kCellOnly_) {
      if (p.zone_h == nullptr) return fn(IntTag<kCellOnly>{});
    }
  }
  bad_dispatch("dispatch_zone: a zoned step this kernel does not run");
}

// The row of the state before this step for row b: the previous step's saved row where that step
// ran row b (b < m_prev), else the initial state's. kPrev fixes which (kOn, kOff) where the caller
// knows it for a whole tile.
template <int kPrev = kRuntime, typename scalar_t>
FUSEDRNN_HD const scalar_t* prev_row(const scalar_t* prev, int64_t ld_prev, const scalar_t* init,
                                     int64_t m_prev, int64_t H, int64_t b) {
  if constexpr (kPrev == kOn) return prev + b * ld_prev;
  if constexpr (kPrev == kOff) return init + b * H;
  return b < m_prev ? prev + b * ld_prev : init + b * H;
}

// Element j of that row.
template <int kPrev = kRuntime, typename scalar_t>
FUSEDRNN_HD acc_type<scalar_t> prev_state(const scalar_t* prev, int64_t ld_prev,
                                          const scalar_t* init, int64_t m_prev, int64_t H,
                                          int64_t b, int64_t j) {
  return ld(prev_row<kPrev>(prev, ld_prev, init, m_prev, H, b), j);
}

// Zoneout's update of one state element (design.md §1.7): d * prev + (1 - d) * next, d the
// step's weight of the previous value (a 0 / 1 mask, or the rate in eval). Written so, not as
// next + d * (prev - next), so that d = 1 keeps prev and d = 0 takes next exactly.
template <typename acc_t>
FUSEDRNN_HD acc_t zoned(acc_t d, acc_t prev, acc_t next) {
  return d * prev + (acc_t(1) - d) * next;
}

// Whether a step zones its hidden state h_t (every cell's), and (LSTM family) its cell state.
template <int kZone, typename Step>
FUSEDRNN_HD bool zones(const Step& p) {
  return kZone == kRuntime ? p.zone_h != nullptr : kZone == kOn;
}
template <int kZone, typename Step>
FUSEDRNN_HD bool zones_c(const Step& p) {
  return kZone == kRuntime ? p.zone_c != nullptr : kZone != kOff;
}

// kHg false: p.hg is not read, p.gates holds the whole pre-activation (the fused CPU steps).
// Zoneout (p.zone_c / zone_h): the cell computes its own new state c̃_t (the peephole's o, the
// working-memory cell's u_o and h̃_t read it), then the carried states are zoned; the backward
// recomputes c̃_t from the saved gates and c_{t-1}.
template <CellKind kCell, Phase kPhase, bool kBias, bool kHg = true, int kSave = kRuntime,
          int kHState = kRuntime, int kZone = kRuntime, typename scalar_t>
FUSEDRNN_HD void lstm_forward_element(const LSTMForwardStep<scalar_t>& p, int64_t b, int64_t j) {
  using acc_t = acc_type<scalar_t>;
  const bool save = kSave == kRuntime ? p.save_gates : kSave == kOn;
  const bool h_state = kHState == kRuntime ? p.h_state != nullptr : kHState == kOn;
  const int64_t H = p.H;
  scalar_t* a = p.gates + b * p.ld_gates + j;
  const scalar_t* hg = kHg ? p.hg + b * 4 * H + j : nullptr;
  auto pre = [&](int k) {
    acc_t v = static_cast<acc_t>(a[k * H]);
    if constexpr (kHg) v += static_cast<acc_t>(hg[k * H]);
    if constexpr (kBias) v += ld(p.bias, k * H + j);
    return v;
  };
  using Cell = math_of<kCell, acc_t>;
  constexpr bool kTwoPhase = traits(kCell).two_phase;
  constexpr WeightCh kWeightCh = traits(kCell).weight_ch;
  static_assert(kTwoPhase == (kWeightCh == WeightCh::kFull),
                "two phases are the full cell connections' (a GEMM of c_t inside the step)");
  acc_t i, f, g, o, c, h;
  const int64_t s = b * H + j;
  if constexpr (!kTwoPhase && kWeightCh == WeightCh::kNone) {
    const acc_t c_prev = ld(p.c_state, s);
    Cell::forward(pre(0), pre(1), pre(2), pre(3), c_prev, i, f, g, o, c, h);
    if (zones_c<kZone>(p)) c = zoned(ld(p.zone_c + b * p.ld_zone_c, j), c_prev, c);
    // h_state holds h_{t-1} (no projection: else h_t is zoned after the projection's GEMM)
    // until the store below
    if (zones<kZone>(p)) h = zoned(ld(p.zone_h + b * p.ld_zone_h, j), ld(p.h_state, s), h);
  } else if constexpr (!kTwoPhase && kWeightCh == WeightCh::kDiagonal) {
    const acc_t c_prev = ld(p.c_state, s);
    Cell::forward(pre(0), pre(1), pre(2), pre(3), c_prev, ld(p.peephole, j), ld(p.peephole, H + j),
                  ld(p.peephole, 2 * H + j), i, f, g, o, c, h);
    // as the plain LSTM's
    if (zones_c<kZone>(p)) c = zoned(ld(p.zone_c + b * p.ld_zone_c, j), c_prev, c);
    if (zones<kZone>(p)) h = zoned(ld(p.zone_h + b * p.ld_zone_h, j), ld(p.h_state, s), h);
  } else if constexpr (kPhase == Phase::kIFG) {
    acc_t u_i, u_f;
    const scalar_t* pp = p.p + b * p.ld_p + j;
    const acc_t c_prev = ld(p.c_state, s);
    Cell::forward_ifg(pre(0), pre(1), pre(2), static_cast<acc_t>(pp[0]), static_cast<acc_t>(pp[H]),
                      c_prev, i, f, g, c, u_i, u_f);
    if (save) {
      a[0] = static_cast<scalar_t>(i);
      a[H] = static_cast<scalar_t>(f);
      a[2 * H] = static_cast<scalar_t>(g);
    }
    if (zones_c<kZone>(p)) {  // c̃_t for this step's o; the carried and saved state zoned
      p.c_own[s] = static_cast<scalar_t>(c);
      c = zoned(ld(p.zone_c + b * p.ld_zone_c, j), c_prev, c);
    }
    p.c_state[s] = static_cast<scalar_t>(c);
    p.c_save[b * p.ld_c_save + j] = static_cast<scalar_t>(c);
    scalar_t* u = p.u + b * p.ld_u + j;
    u[0] = static_cast<scalar_t>(u_i);
    u[H] = static_cast<scalar_t>(u_f);
    return;
  } else {  // two phases, phase kO: c_state already holds c_t (zoned: c_own c̃_t)
    acc_t u_o;
    c = zones_c<kZone>(p) ? ld(p.c_own, s) : ld(p.c_state, s);
    Cell::forward_o(pre(3), ld(p.p + b * p.ld_p, 2 * H + j), c, o, u_o, h);
    // h_state holds h_{t-1} (no projection) until the store below
    if (zones<kZone>(p)) h = zoned(ld(p.zone_h + b * p.ld_zone_h, j), ld(p.h_state, s), h);
    if (save) a[3 * H] = static_cast<scalar_t>(o);
    p.u[b * p.ld_u + 2 * H + j] = static_cast<scalar_t>(u_o);
    p.h_out[b * p.ld_h_out + j] = static_cast<scalar_t>(h);
    if (h_state) p.h_state[s] = static_cast<scalar_t>(h);
    return;
  }
  // Stores of the one-phase cells. Under `if constexpr` so that the two-phase instantiations,
  // which return above, do not contain this (unreachable) code: nvcc would warn that it reads
  // gates those phases never set.
  if constexpr (!kTwoPhase) {
    if (save) {
      a[0] = static_cast<scalar_t>(i);
      a[H] = static_cast<scalar_t>(f);
      a[2 * H] = static_cast<scalar_t>(g);
      a[3 * H] = static_cast<scalar_t>(o);
    }
    p.c_state[s] = static_cast<scalar_t>(c);
    p.c_save[b * p.ld_c_save + j] = static_cast<scalar_t>(c);
    p.h_out[b * p.ld_h_out + j] = static_cast<scalar_t>(h);
    if (h_state) p.h_state[s] = static_cast<scalar_t>(h);
  }
}

template <CellKind kCell, Phase kPhase, int kDy, int kPrev = kRuntime, int kZone = kRuntime,
          typename scalar_t>
FUSEDRNN_HD void lstm_backward_element(const LSTMBackwardStep<scalar_t>& p, int64_t b, int64_t j) {
  using acc_t = acc_type<scalar_t>;
  static_assert(kDy == kOn || kDy == kOff, "kDy is fixed at compile time (see kRuntime)");
  const int64_t H = p.H;
  const scalar_t* gt = p.gates + b * p.ld_gates + j;
  scalar_t* da = p.dgates + b * p.ld_dgates + j;
  const int64_t s = b * H + j;
  auto dh_total = [&]() {
    acc_t dh = ld(p.dh + b * p.ld_dh, j);
    if constexpr (kDy == kOn) dh += ld(p.dy + b * p.ld_dy, j);
    return dh;
  };
  using Cell = math_of<kCell, acc_t>;
  constexpr WeightCh kWeightCh = traits(kCell).weight_ch;
  if constexpr (traits(kCell).two_phase) {
    if constexpr (kPhase == Phase::kO) {
      acc_t dc = ld(p.dc_state, s), da_o, dp_o, dh = dh_total(), c = ld(p.c + b * p.ld_c, j);
      if (zones_c<kZone>(p)) {
        // the cell's own c̃_t (o's and u_o's input); the gradients of h_t and c_t split between
        // it (1 - d) and the previous state (d, carried to kIFG and to the GEMM of dh_{t-1})
        c = static_cast<acc_t>(gt[H]) *
                prev_state<kPrev>(p.c_prev, p.ld_c_prev, p.c_init, p.m_prev, H, b, j) +
            static_cast<acc_t>(gt[0]) * static_cast<acc_t>(gt[2 * H]);
        p.c_own[s] = static_cast<scalar_t>(c);
        const acc_t d_c = ld(p.zone_c + b * p.ld_zone_c, j);
        p.dc_carry[s] = static_cast<scalar_t>(d_c * dc);
        dc = (acc_t(1) - d_c) * dc;
      }
      if (zones<kZone>(p)) {
        const acc_t d_h = ld(p.zone_h + b * p.ld_zone_h, j);
        p.dh_carry[s] = static_cast<scalar_t>(d_h * dh);
        dh = (acc_t(1) - d_h) * dh;
      }
      Cell::backward_o(static_cast<acc_t>(gt[3 * H]), ld(p.u + b * p.ld_u, 2 * H + j), c, dh, dc,
                       da_o, dp_o);
      da[3 * H] = static_cast<scalar_t>(da_o);
      p.dp[b * p.ld_dp + 2 * H + j] = static_cast<scalar_t>(dp_o);
      p.dp_saved[b * p.ld_dp_saved + 2 * H + j] = static_cast<scalar_t>(dp_o);
      p.dc_state[s] = static_cast<scalar_t>(dc);
    } else {
      acc_t da_i, da_f, da_g, dp_i, dp_f, dc_prev;
      const scalar_t* u = p.u + b * p.ld_u + j;
      Cell::backward_ifg(static_cast<acc_t>(gt[0]), static_cast<acc_t>(gt[H]),
                         static_cast<acc_t>(gt[2 * H]), static_cast<acc_t>(u[0]),
                         static_cast<acc_t>(u[H]),
                         prev_state<kPrev>(p.c_prev, p.ld_c_prev, p.c_init, p.m_prev, H, b, j),
                         ld(p.dc_state, s), da_i, da_f, da_g, dp_i, dp_f, dc_prev);
      da[0] = static_cast<scalar_t>(da_i);
      da[H] = static_cast<scalar_t>(da_f);
      da[2 * H] = static_cast<scalar_t>(da_g);
      scalar_t* dp = p.dp + b * p.ld_dp + j;
      dp[0] = static_cast<scalar_t>(dp_i);
      dp[H] = static_cast<scalar_t>(dp_f);
      scalar_t* dps = p.dp_saved + b * p.ld_dp_saved + j;
      dps[0] = static_cast<scalar_t>(dp_i);
      dps[H] = static_cast<scalar_t>(dp_f);
      if (zones_c<kZone>(p)) dc_prev += ld(p.dc_carry, s);
      p.dc_state[s] = static_cast<scalar_t>(dc_prev);
    }
  } else {
    acc_t da_i, da_f, da_g, da_o, dc_prev;
    const acc_t i = static_cast<acc_t>(gt[0]), f = static_cast<acc_t>(gt[H]),
                g = static_cast<acc_t>(gt[2 * H]), o = static_cast<acc_t>(gt[3 * H]);
    acc_t c = ld(p.c + b * p.ld_c, j);
    const acc_t c_prev = prev_state<kPrev>(p.c_prev, p.ld_c_prev, p.c_init, p.m_prev, H, b, j);
    if constexpr (kWeightCh == WeightCh::kNone) {
      acc_t dh = dh_total(), dc = ld(p.dc_state, s);
      if (zones_c<kZone>(p)) {
        // the cell's own new state, before zoneout; the gradients of h_t and c_t split between
        // it (1 - d) and the previous state (d); h_t's not here under a projection (d_h 0)
        c = f * c_prev + i * g;
        const acc_t d_c = ld(p.zone_c + b * p.ld_zone_c, j);
        const acc_t d_h = zones<kZone>(p) ? ld(p.zone_h + b * p.ld_zone_h, j) : acc_t(0);
        Cell::backward(i, f, g, o, c, c_prev, (acc_t(1) - d_h) * dh, (acc_t(1) - d_c) * dc, da_i,
                       da_f, da_g, da_o, dc_prev);
        dc_prev += d_c * dc;
        if (zones<kZone>(p)) p.dh_carry[s] = static_cast<scalar_t>(d_h * dh);
      } else {
        Cell::backward(i, f, g, o, c, c_prev, dh, dc, da_i, da_f, da_g, da_o, dc_prev);
      }
    } else {
      static_assert(kWeightCh == WeightCh::kDiagonal, "one phase: no or diagonal connections");
      const acc_t w_ci = ld(p.peephole, j), w_cf = ld(p.peephole, H + j),
                  w_co = ld(p.peephole, 2 * H + j);
      acc_t dh = dh_total(), dc = ld(p.dc_state, s);
      if (zones_c<kZone>(p)) {  // as the plain LSTM's; c̃_t kept for the gradient of w_co
        c = f * c_prev + i * g;
        p.c_own[s] = static_cast<scalar_t>(c);
        const acc_t d_c = ld(p.zone_c + b * p.ld_zone_c, j);
        const acc_t d_h = zones<kZone>(p) ? ld(p.zone_h + b * p.ld_zone_h, j) : acc_t(0);
        Cell::backward(i, f, g, o, c, c_prev, w_ci, w_cf, w_co, (acc_t(1) - d_h) * dh,
                       (acc_t(1) - d_c) * dc, da_i, da_f, da_g, da_o, dc_prev);
        dc_prev += d_c * dc;
        if (zones<kZone>(p)) p.dh_carry[s] = static_cast<scalar_t>(d_h * dh);
      } else {
        Cell::backward(i, f, g, o, c, c_prev, w_ci, w_cf, w_co, dh, dc, da_i, da_f, da_g, da_o,
                       dc_prev);
      }
    }
    da[0] = static_cast<scalar_t>(da_i);
    da[H] = static_cast<scalar_t>(da_f);
    da[2 * H] = static_cast<scalar_t>(da_g);
    da[3 * H] = static_cast<scalar_t>(da_o);
    p.dc_state[s] = static_cast<scalar_t>(dc_prev);
  }
}

template <bool kBias, int kZone = kRuntime, typename scalar_t>
FUSEDRNN_HD void gru_forward_element(const GRUForwardStep<scalar_t>& p, int64_t b, int64_t j) {
  using acc_t = acc_type<scalar_t>;
  const int64_t H = p.H;
  scalar_t* a = p.gates + b * p.ld_gates + j;
  const scalar_t* hg = p.hg + b * p.ld_hg + j;
  acc_t x[3], hh[3];
  for (int k = 0; k < 3; ++k) {
    x[k] = static_cast<acc_t>(a[k * H]);
    hh[k] = static_cast<acc_t>(hg[k * H]);
    if constexpr (kBias) {
      x[k] += ld(p.bias_ih, k * H + j);
      hh[k] += ld(p.bias_hh, k * H + j);
    }
  }
  const int64_t s = b * H + j;
  acc_t r, z, n, h;
  const acc_t h_prev = ld(p.h_state, s);
  GRUCell<acc_t>::forward(x[0], x[1], x[2], hh[0], hh[1], hh[2], h_prev, r, z, n, h);
  if (zones<kZone>(p)) h = zoned(ld(p.zone_h + b * p.ld_zone_h, j), h_prev, h);
  a[0] = static_cast<scalar_t>(r);
  a[H] = static_cast<scalar_t>(z);
  a[2 * H] = static_cast<scalar_t>(n);
  a[3 * H] = static_cast<scalar_t>(hh[2]);
  p.h_state[s] = static_cast<scalar_t>(h);
  p.h_out[b * p.ld_h_out + j] = static_cast<scalar_t>(h);
}

template <int kDy, int kPrev = kRuntime, int kZone = kRuntime, typename scalar_t>
FUSEDRNN_HD void gru_backward_element(const GRUBackwardStep<scalar_t>& p, int64_t b, int64_t j) {
  using acc_t = acc_type<scalar_t>;
  static_assert(kDy == kOn || kDy == kOff, "kDy is fixed at compile time (see kRuntime)");
  const int64_t H = p.H;
  const scalar_t* gt = p.gates + b * p.ld_gates + j;
  const int64_t s = b * H + j;
  acc_t dh = ld(p.dh_state, s);
  if constexpr (kDy == kOn) dh += ld(p.dy + b * p.ld_dy, j);
  acc_t dx_r, dx_z, dx_n, dh_n, dh_prev, d = 0;
  if (zones<kZone>(p)) d = ld(p.zone_h + b * p.ld_zone_h, j);
  GRUCell<acc_t>::backward(static_cast<acc_t>(gt[0]), static_cast<acc_t>(gt[H]),
                           static_cast<acc_t>(gt[2 * H]), static_cast<acc_t>(gt[3 * H]),
                           prev_state<kPrev>(p.h_prev, p.ld_h_prev, p.h_init, p.m_prev, H, b, j),
                           zones<kZone>(p) ? (acc_t(1) - d) * dh : dh, dx_r, dx_z, dx_n, dh_n,
                           dh_prev);
  if (zones<kZone>(p)) dh_prev += d * dh;
  scalar_t* dx = p.dx + b * p.ld_dx + j;
  scalar_t* dhg = p.dhg + b * p.ld_dhg + j;
  dx[0] = static_cast<scalar_t>(dx_r);
  dx[H] = static_cast<scalar_t>(dx_z);
  dx[2 * H] = static_cast<scalar_t>(dx_n);
  dhg[0] = static_cast<scalar_t>(dx_r);
  dhg[H] = static_cast<scalar_t>(dx_z);
  dhg[2 * H] = static_cast<scalar_t>(dh_n);
  p.dh_state[s] = static_cast<scalar_t>(dh_prev);
}

// Zoneout of a projected LSTM's h_t after the projection (ZoneStep).
template <typename scalar_t, typename weight_t>
FUSEDRNN_HD void zone_forward_element(const ZoneStep<scalar_t, weight_t>& p, int64_t b, int64_t j) {
  using acc_t = acc_type<scalar_t>;
  const int64_t s = b * p.H + j;
  const acc_t d = static_cast<acc_t>(ld(p.zone + b * p.ld_zone, j));
  const acc_t h = zoned(d, ld(p.state, s), ld(p.out, s));
  p.out[s] = static_cast<scalar_t>(h);
  p.state[s] = static_cast<scalar_t>(h);
}

template <int kDy, typename scalar_t, typename weight_t>
FUSEDRNN_HD void zone_backward_element(const ZoneStep<scalar_t, weight_t>& p, int64_t b,
                                       int64_t j) {
  using acc_t = acc_type<scalar_t>;
  static_assert(kDy == kOn || kDy == kOff, "kDy is fixed at compile time (see kRuntime)");
  const int64_t s = b * p.H + j;
  acc_t g = ld(p.state, s);
  if constexpr (kDy == kOn) g += ld(p.dy, s);
  const acc_t d = static_cast<acc_t>(ld(p.zone + b * p.ld_zone, j));
  p.out[s] = static_cast<scalar_t>((acc_t(1) - d) * g);
  p.state[s] = static_cast<scalar_t>(d * g);
}

FUSEDRNN_ISA_END
}  // namespace fusedrnn
