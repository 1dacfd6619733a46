// GRU cell, exactly torch.nn.GRU (gate order r, z, n; reset applied after the recurrent matmul):
//   r = sigma(x_r + h_r)   z = sigma(x_z + h_z)   n = tanh(x_n + r h_n)
//   h_t = (1 - z) n + z h_{t-1}
// x_* = x_t W_ih^T + b_ih and h_* = h_{t-1} W_hh^T + b_hh, biases included by the caller.
// Saved for backward: r, z, n and h_n.
#pragma once

#include "common.h"

namespace fusedrnn {
FUSEDRNN_ISA_BEGIN

template <typename acc_t>
struct GRUCell {
  static constexpr int kGates = 3;

  FUSEDRNN_HD static void forward(acc_t x_r, acc_t x_z, acc_t x_n, acc_t h_r, acc_t h_z, acc_t h_n,
                                  acc_t h_prev, acc_t& r, acc_t& z, acc_t& n, acc_t& h) {
    r = math::sigmoid(x_r + h_r);
    z = math::sigmoid(x_z + h_z);
    n = math::tanh(x_n + r * h_n);
    h = (acc_t(1) - z) * n + z * h_prev;
  }

  // dx_*: gradients of the input-side pre-activations; dh_*: of the recurrent ones (they differ
  // only in the n block, dh_n = dx_n * r). dh_prev excludes the term through W_hh.
  FUSEDRNN_HD static void backward(acc_t r, acc_t z, acc_t n, acc_t h_n, acc_t h_prev, acc_t dh,
                                   acc_t& dx_r, acc_t& dx_z, acc_t& dx_n, acc_t& dh_n_pre,
                                   acc_t& dh_prev) {
    const acc_t one(1);
    dx_n = dh * (one - z) * (one - n * n);
    dx_z = dh * (h_prev - n) * z * (one - z);
    dx_r = dx_n * h_n * r * (one - r);
    dh_n_pre = dx_n * r;
    dh_prev = dh * z;
  }
};

template <>
struct CellMath<CellKind::kGRU> {
  template <typename acc_t>
  using type = GRUCell<acc_t>;
};

FUSEDRNN_ISA_END
}  // namespace fusedrnn
