// The fused pointwise step kernels, as plain structs of sizes, pointers and row strides, with
// one launcher per kernel and device. The recurrence loops (recurrence/lstm.cpp, gru.cpp) fill a
// struct per step and call the CPU or the CUDA launcher; both run the per-element math of
// csrc/cells/*.h.
//
// Conventions: every pointer points at row 0 of the rows this step processes; `n` rows are
// processed; `H` is the hidden size; `ld_*` is the row stride (in elements) of that array.
// A nullptr marks an absent optional operand. The gate blocks of a row are laid out as torch's
// weights are: LSTM family [i | f | g | o], GRU [r | z | n], H columns each.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "cells/traits.h"

namespace fusedrnn {

// Raises the library's internal error for a (cell, phase) that has no kernel. Defined once, in
// portable code (kernels/cpu/kernels_cpu.cpp): this header is also compiled into the per-ISA
// translation units, which must not instantiate ATen's inline error helpers.
[[noreturn]] void bad_dispatch(const char* what);

// LSTM and peephole LSTM forward step; working-memory LSTM uses the same struct in two phases.
template <typename scalar_t>
struct LSTMForwardStep {
  int64_t n = 0, H = 0;
  scalar_t* gates = nullptr;  // [n, 4H] in: x W_ih^T; out: i, f, g, o
  int64_t ld_gates = 0;
  const scalar_t* hg = nullptr;        // [n, 4H] (ld 4H) h_{t-1} W_hh^T (unread by the fused
                                       // CPU steps: `gates` holds the whole pre-activation)
  const scalar_t* bias = nullptr;      // [4H] b_ih + b_hh, or nullptr
  bool save_gates = true;              // store i, f, g, o back into `gates` (for backward)
  const scalar_t* peephole = nullptr;  // [3, H] w_ci, w_cf, w_co (peephole cell only)
  scalar_t* c_state = nullptr;         // [n, H] (ld H) in: c_{t-1}; out: c_t
  scalar_t* c_save = nullptr;          // [n, H] c_t kept for backward
  int64_t ld_c_save = 0;
  scalar_t* h_out = nullptr;  // [n, H] o * tanh(c_t) (layer output, or r_t with proj)
  int64_t ld_h_out = 0;
  scalar_t* h_state = nullptr;  // [n, H] (ld H) second copy of h_t, or nullptr
  const scalar_t* p = nullptr;  // WM: [n, 3H] c W_ch^T for [i | f | o]
  int64_t ld_p = 0;
  scalar_t* u = nullptr;  // WM: [n, 3H] saved tanh(p) for [i | f | o]
  int64_t ld_u = 0;
  // Zoneout: the weights d of the previous state in c_t and h_t (design.md §1.7), [n, H] each:
  // 0 / 1 masks in training, the rate p in eval (row stride 0: one row for every row). Both
  // set, both nullptr (no zoneout), or zone_c only: a projected LSTM, whose step zones c_t and
  // writes the cell's own r_t, and whose h_t is zoned after the projection's GEMM (ZoneStep).
  const scalar_t* zone_c = nullptr;
  int64_t ld_zone_c = 0;
  const scalar_t* zone_h = nullptr;
  int64_t ld_zone_h = 0;
  // WM under zoneout: [n, H] (ld H) the cell's own new state c̃_t, written by kIFG, read by the
  // GEMM of u_o and by kO (c_state and c_save get the zoned c_t, which the next step reads).
  scalar_t* c_own = nullptr;
};

template <typename scalar_t>
struct LSTMBackwardStep {
  int64_t n = 0, H = 0;
  const scalar_t* gates = nullptr;  // [n, 4H] saved i, f, g, o
  int64_t ld_gates = 0;
  const scalar_t* c = nullptr;  // [n, H] saved c_t
  int64_t ld_c = 0;
  const scalar_t* c_prev = nullptr;  // [m_prev, H] c_{t-1} of rows [0, m_prev): the previous
  int64_t ld_c_prev = 0;             // step's saved c_t rows
  const scalar_t* c_init = nullptr;  // [n, H] (ld H) initial state; c_{t-1} of rows >= m_prev
  int64_t m_prev = 0;
  const scalar_t* peephole = nullptr;  // [3, H] peephole weights (peephole cell only)
  const scalar_t* dh = nullptr;        // [n, H] gradient of h_t from later steps / projection
  int64_t ld_dh = 0;
  const scalar_t* dy = nullptr;  // [n, H] gradient of this step's output, or nullptr
  int64_t ld_dy = 0;
  scalar_t* dc_state = nullptr;  // [n, H] (ld H) in: dL/dc_t from later steps; out: dc_{t-1}
  scalar_t* dgates = nullptr;    // [n, 4H] out: gradients of the pre-activations
  int64_t ld_dgates = 0;
  const scalar_t* u = nullptr;  // WM: [n, 3H] saved tanh outputs
  int64_t ld_u = 0;
  scalar_t* dp = nullptr;  // WM: [n, 3H] out: gradients of p for [i | f | o]
  int64_t ld_dp = 0;
  scalar_t* dp_saved = nullptr;  // WM: [n, 3H] second copy of dp (kept for weight grads)
  int64_t ld_dp_saved = 0;
  // Zoneout: the forward's weights (LSTMForwardStep). With zone_c the kernel recomputes the
  // cell's new state f * c_{t-1} + i * g from the gates (`c` holds the zoned c_t); with zone_h
  // too it writes the direct part of dh_{t-1}, d_h * dL/dh_t, into dh_carry [n, H] (ld H), and
  // the GEMM of dh_{t-1}'s W_hh part accumulates onto it (zone_c only: a projected LSTM, whose
  // dh is already the gradient of the cell's own r_t, ZoneStep).
  const scalar_t* zone_c = nullptr;
  int64_t ld_zone_c = 0;
  const scalar_t* zone_h = nullptr;
  int64_t ld_zone_h = 0;
  scalar_t* dh_carry = nullptr;
  // WM under zoneout: kO writes the direct part of dc_{t-1}, d_c * dL/dc_t, into dc_carry [n, H]
  // (ld H), which kIFG adds to its dc_{t-1}; and the recomputed c̃_t into c_own [n, H] (ld H),
  // which the gradient of W_co reads (u_o = tanh(c̃_t W_co^T)). The peephole LSTM under zoneout
  // writes c_own too (o reads w_co ⊙ c̃_t). dc_state in kO: dL/dc_t with the
  // next step's W_ci, W_cf part already added; the caller adds dp_o W_co between the phases.
  scalar_t* dc_carry = nullptr;
  scalar_t* c_own = nullptr;
};

template <typename scalar_t>
struct GRUForwardStep {
  int64_t n = 0, H = 0;
  scalar_t* gates = nullptr;  // [n, 4H] in: x W_ih^T in the first 3H; out: r,z,n,h_n
  int64_t ld_gates = 0;
  const scalar_t* hg = nullptr;  // [n, 3H] h_{t-1} W_hh^T
  int64_t ld_hg = 0;
  const scalar_t* bias_ih = nullptr;  // [3H] or nullptr
  const scalar_t* bias_hh = nullptr;  // [3H] or nullptr
  scalar_t* h_state = nullptr;        // [n, H] (ld H) in: h_{t-1}; out: h_t
  scalar_t* h_out = nullptr;          // [n, H] layer output rows
  int64_t ld_h_out = 0;
  const scalar_t* zone_h = nullptr;  // zoneout: [n, H] weights of h_{t-1} in h_t (as the
  int64_t ld_zone_h = 0;             // LSTM's), or nullptr
};

template <typename scalar_t>
struct GRUBackwardStep {
  int64_t n = 0, H = 0;
  const scalar_t* gates = nullptr;  // [n, 4H] saved r, z, n, h_n
  int64_t ld_gates = 0;
  const scalar_t* h_prev = nullptr;  // [m_prev, H] h_{t-1} of rows [0, m_prev) (previous step's
  int64_t ld_h_prev = 0;             // output rows)
  const scalar_t* h_init = nullptr;  // [n, H] (ld H) initial state; h_{t-1} of rows >= m_prev
  int64_t m_prev = 0;
  const scalar_t* dy = nullptr;  // [n, H] gradient of this step's output, or nullptr
  int64_t ld_dy = 0;
  scalar_t* dh_state = nullptr;  // [n, H] (ld H) in: dL/dh_t from later steps; out: the
                                 // direct part of dh_{t-1} (the W_hh part is a GEMM)
  scalar_t* dx = nullptr;        // [n, 3H] out: gradients of x-side pre-activations
  int64_t ld_dx = 0;
  scalar_t* dhg = nullptr;  // [n, 3H] out: gradients of h-side pre-activations
  int64_t ld_dhg = 0;
  const scalar_t* zone_h = nullptr;  // zoneout: the forward's weights, or nullptr; the direct
  int64_t ld_zone_h = 0;             // part of dh_{t-1} then includes d * dL/dh_t
};

// Zoneout of a projected LSTM's hidden state (design.md §1.7), which the projection's GEMM
// computes after the step kernel: rows [0, n) of H (the projection size) columns, every array
// with row stride H. Forward: h_t = d h_{t-1} + (1 - d) h̃_t, `out` holding h̃_t (the GEMM's
// output rows) and `state` h_{t-1}, both getting h_t. Backward: with g = state + dy (dL/dh_t),
// `out` gets (1 - d) g, the gradient of h̃_t, and `state` d g, the direct part of dh_{t-1}.
// The weights are of the layer's dtype, the arrays of it or (a backward's buffers) of its
// op-math type.
template <typename scalar_t, typename weight_t = scalar_t>
struct ZoneStep {
  int64_t n = 0, H = 0;
  const weight_t* zone = nullptr;  // [n, H] the weights d (ld_zone; 0: one row for every row)
  int64_t ld_zone = 0;
  scalar_t* out = nullptr;
  scalar_t* state = nullptr;
  const scalar_t* dy = nullptr;  // backward: [n, H] gradient of this step's output, or nullptr
};

// Phases of a step. The WM cell runs its forward as kIFG then kO, its backward as kO then kIFG.
enum class Phase : int { kWhole = 0, kIFG = 1, kO = 2 };

// Run-time cell / phase / flag to compile-time tags, for the launchers of both devices: `fn` is
// called with std::integral_constant tags (read as decltype(tag)::value), so that the kernels
// are templated on them and their loops carry no run-time branches.
template <CellKind kCell>
using CellTag = std::integral_constant<CellKind, kCell>;
template <Phase kPhase>
using PhaseTag = std::integral_constant<Phase, kPhase>;

// The LSTM-family (cell, phase) pairs that have a step kernel, from cells/traits.h: a
// one-phase cell runs whole steps (kWhole), a two-phase one (working memory) kIFG or kO.
template <typename Fn, int... kIndex>
void dispatch_lstm_family_impl(CellKind cell, Phase phase, Fn&& fn,
                               std::integer_sequence<int, kIndex...>) {
  bool found = false;
  auto one = [&](auto tag) {
    constexpr CellKind kCell = decltype(tag)::value;
    if constexpr (traits(kCell).has_cell_state) {
      if (found || cell != kCell) return;
      found = true;
      if constexpr (traits(kCell).two_phase) {
        if (phase == Phase::kIFG) {
          fn(tag, PhaseTag<Phase::kIFG>{});
        } else {
          fn(tag, PhaseTag<Phase::kO>{});
        }
      } else {
        fn(tag, PhaseTag<Phase::kWhole>{});
      }
    }
  };
  (one(CellTag<static_cast<CellKind>(kIndex)>{}), ...);
  if (!found) bad_dispatch("dispatch_lstm_family: not an LSTM-family cell");
}

template <typename Fn>
void dispatch_lstm_family(CellKind cell, Phase phase, Fn&& fn) {
  dispatch_lstm_family_impl(cell, phase, fn, std::make_integer_sequence<int, kNumCells>{});
}

template <typename Fn>
void dispatch_bool(bool value, Fn&& fn) {
  if (value) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

namespace cpu {
template <typename scalar_t>
void lstm_forward_step(CellKind cell, Phase phase, const LSTMForwardStep<scalar_t>& p);
template <typename scalar_t>
void lstm_backward_step(CellKind cell, Phase phase, const LSTMBackwardStep<scalar_t>& p);
template <typename scalar_t>
void gru_forward_step(const GRUForwardStep<scalar_t>& p);
template <typename scalar_t>
void gru_backward_step(const GRUBackwardStep<scalar_t>& p);
template <typename scalar_t, typename weight_t>
void zone_forward_step(const ZoneStep<scalar_t, weight_t>& p);
template <typename scalar_t, typename weight_t>
void zone_backward_step(const ZoneStep<scalar_t, weight_t>& p);
}  // namespace cpu

namespace cuda {
// `stream` is the cudaStream_t to launch on, passed as void* to keep CUDA headers out of here.
template <typename scalar_t>
void lstm_forward_step(CellKind cell, Phase phase, const LSTMForwardStep<scalar_t>& p,
                       void* stream);
template <typename scalar_t>
void lstm_backward_step(CellKind cell, Phase phase, const LSTMBackwardStep<scalar_t>& p,
                        void* stream);
template <typename scalar_t>
void gru_forward_step(const GRUForwardStep<scalar_t>& p, void* stream);
template <typename scalar_t>
void gru_backward_step(const GRUBackwardStep<scalar_t>& p, void* stream);
template <typename scalar_t, typename weight_t>
void zone_forward_step(const ZoneStep<scalar_t, weight_t>& p, void* stream);
template <typename scalar_t, typename weight_t>
void zone_backward_step(const ZoneStep<scalar_t, weight_t>& p, void* stream);
// The elementwise work of a step on raw pointers (execution/step_device.h): out[i] = a[i] + b[i]
// for i < count, and a device-to-device copy of `bytes` bytes, both on `stream`.
template <typename scalar_t>
void add_elements(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t count, void* stream);
void copy_bytes(void* dst, const void* src, int64_t bytes, void* stream);
}  // namespace cuda

}  // namespace fusedrnn
