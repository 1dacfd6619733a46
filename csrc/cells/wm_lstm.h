// Working-memory LSTM, "LSTM-WM" (Landi et al., Neural Networks 2021), design.md §1:
//   u_i = tanh(c_{t-1} W_ci^T)   u_f = tanh(c_{t-1} W_cf^T)
//   i = sigma(a_i + u_i)   f = sigma(a_f + u_f)   g = tanh(a_g)   c_t = f c_{t-1} + i g
//   u_o = tanh(c_t W_co^T)       o = sigma(a_o + u_o)             h_t = o tanh(c_t)
// A step is GEMM -> forward_ifg -> GEMM (c_t against [W_ci; W_cf; W_co]) -> forward_o.
// p_* are the cell-connection matmul results before their tanh. Saved for backward:
// i, f, g, o, c_t and u_i, u_f, u_o.
#pragma once

#include "common.h"

namespace fusedrnn {
FUSEDRNN_ISA_BEGIN

template <typename acc_t>
struct WorkingMemoryLSTMCell {
  static constexpr int kGates = 4;

  FUSEDRNN_HD static void forward_ifg(acc_t a_i, acc_t a_f, acc_t a_g, acc_t p_i, acc_t p_f,
                                      acc_t c_prev, acc_t& i, acc_t& f, acc_t& g, acc_t& c,
                                      acc_t& u_i, acc_t& u_f) {
    u_i = math::tanh(p_i);
    u_f = math::tanh(p_f);
    i = math::sigmoid(a_i + u_i);
    f = math::sigmoid(a_f + u_f);
    g = math::tanh(a_g);
    c = f * c_prev + i * g;
  }

  FUSEDRNN_HD static void forward_o(acc_t a_o, acc_t p_o, acc_t c, acc_t& o, acc_t& u_o, acc_t& h) {
    u_o = math::tanh(p_o);
    o = math::sigmoid(a_o + u_o);
    h = o * math::tanh(c);
  }

  // First half of the backward step: from dh_t, the o gate's gradients; dc gains the direct
  // term. The caller then adds dp_o W_co (and the next step's dp_i W_ci + dp_f W_cf) to dc.
  FUSEDRNN_HD static void backward_o(acc_t o, acc_t u_o, acc_t c, acc_t dh, acc_t& dc, acc_t& da_o,
                                     acc_t& dp_o) {
    const acc_t one(1);
    const acc_t tc = math::tanh(c);
    da_o = dh * tc * o * (one - o);
    dp_o = da_o * (one - u_o * u_o);
    dc = dc + dh * o * (one - tc * tc);
  }

  // Second half: dc is the complete gradient of c_t. dc_prev excludes the dp_i / dp_f terms,
  // which the caller adds by a GEMM.
  FUSEDRNN_HD static void backward_ifg(acc_t i, acc_t f, acc_t g, acc_t u_i, acc_t u_f,
                                       acc_t c_prev, acc_t dc, acc_t& da_i, acc_t& da_f,
                                       acc_t& da_g, acc_t& dp_i, acc_t& dp_f, acc_t& dc_prev) {
    const acc_t one(1);
    da_i = dc * g * i * (one - i);
    da_f = dc * c_prev * f * (one - f);
    da_g = dc * i * (one - g * g);
    dp_i = da_i * (one - u_i * u_i);
    dp_f = da_f * (one - u_f * u_f);
    dc_prev = dc * f;
  }
};

template <>
struct CellMath<CellKind::kWorkingMemory> {
  template <typename acc_t>
  using type = WorkingMemoryLSTMCell<acc_t>;
};

FUSEDRNN_ISA_END
}  // namespace fusedrnn
