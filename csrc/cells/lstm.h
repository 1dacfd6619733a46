// LSTM cell, exactly torch.nn.LSTM (gate order i, f, g, o). design.md §1.
//
// Pointwise part of one step for one (row, unit). The caller provides the pre-activations
//   a_* = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh   (one element of each gate block)
// and the previous cell state. Saved for backward: the activated gates i, f, g, o and c_t.
#pragma once

#include "common.h"

namespace fusedrnn {
FUSEDRNN_ISA_BEGIN

template <typename acc_t>
struct LSTMCell {
  static constexpr int kGates = 4;

  // h is o * tanh(c): the layer output before the optional projection.
  FUSEDRNN_HD static void forward(acc_t a_i, acc_t a_f, acc_t a_g, acc_t a_o, acc_t c_prev,
                                  acc_t& i, acc_t& f, acc_t& g, acc_t& o, acc_t& c, acc_t& h) {
    i = math::sigmoid(a_i);
    f = math::sigmoid(a_f);
    g = math::tanh(a_g);
    o = math::sigmoid(a_o);
    c = f * c_prev + i * g;
    h = o * math::tanh(c);
  }

  // dh: gradient of h_t (before projection); dc: gradient reaching c_t from later steps.
  // Returns gradients of the pre-activations and of c_{t-1}.
  FUSEDRNN_HD static void backward(acc_t i, acc_t f, acc_t g, acc_t o, acc_t c, acc_t c_prev,
                                   acc_t dh, acc_t dc, acc_t& da_i, acc_t& da_f, acc_t& da_g,
                                   acc_t& da_o, acc_t& dc_prev) {
    const acc_t one(1);
    const acc_t tc = math::tanh(c);
    dc = dc + dh * o * (one - tc * tc);
    da_o = dh * tc * o * (one - o);
    da_i = dc * g * i * (one - i);
    da_f = dc * c_prev * f * (one - f);
    da_g = dc * i * (one - g * g);
    dc_prev = dc * f;
  }
};

template <>
struct CellMath<CellKind::kLSTM> {
  template <typename acc_t>
  using type = LSTMCell<acc_t>;
};

FUSEDRNN_ISA_END
}  // namespace fusedrnn
