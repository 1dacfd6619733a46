// Peephole LSTM (Gers & Schmidhuber 2000), diagonal peepholes w_ci, w_cf, w_co (design.md §1):
//   i = sigma(a_i + w_ci c_{t-1})   f = sigma(a_f + w_cf c_{t-1})   g = tanh(a_g)
//   c_t = f c_{t-1} + i g           o = sigma(a_o + w_co c_t)       h_t = o tanh(c_t)
// The output gate sees the NEW cell state. Saved for backward: i, f, g, o, c_t (as LSTM).
#pragma once

#include "common.h"

namespace fusedrnn {
FUSEDRNN_ISA_BEGIN

template <typename acc_t>
struct PeepholeLSTMCell {
  static constexpr int kGates = 4;

  FUSEDRNN_HD static void forward(acc_t a_i, acc_t a_f, acc_t a_g, acc_t a_o, acc_t c_prev,
                                  acc_t w_ci, acc_t w_cf, acc_t w_co, acc_t& i, acc_t& f, acc_t& g,
                                  acc_t& o, acc_t& c, acc_t& h) {
    i = math::sigmoid(a_i + w_ci * c_prev);
    f = math::sigmoid(a_f + w_cf * c_prev);
    g = math::tanh(a_g);
    c = f * c_prev + i * g;
    o = math::sigmoid(a_o + w_co * c);
    h = o * math::tanh(c);
  }

  // The o gate's peephole adds da_o * w_co to dc_t before dc_t is used (design.md §1).
  FUSEDRNN_HD static void backward(acc_t i, acc_t f, acc_t g, acc_t o, acc_t c, acc_t c_prev,
                                   acc_t w_ci, acc_t w_cf, acc_t w_co, acc_t dh, acc_t dc,
                                   acc_t& da_i, acc_t& da_f, acc_t& da_g, acc_t& da_o,
                                   acc_t& dc_prev) {
    const acc_t one(1);
    const acc_t tc = math::tanh(c);
    da_o = dh * tc * o * (one - o);
    dc = dc + dh * o * (one - tc * tc) + da_o * w_co;
    da_i = dc * g * i * (one - i);
    da_f = dc * c_prev * f * (one - f);
    da_g = dc * i * (one - g * g);
    dc_prev = dc * f + da_i * w_ci + da_f * w_cf;
  }
};

template <>
struct CellMath<CellKind::kPeephole> {
  template <typename acc_t>
  using type = PeepholeLSTMCell<acc_t>;
};

FUSEDRNN_ISA_END
}  // namespace fusedrnn
