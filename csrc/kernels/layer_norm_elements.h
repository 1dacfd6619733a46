// One row b of a layer-normalised step p (kernels/layer_norm_step.h): the row's workspace
// pointers and its call of the row function of cells/layer_norm.h, on the `Row` that runs its
// passes. Shared verbatim by the CPU row loops (kernels/cpu/layer_norm_rows.h: SerialRow, rows
// of a task one after the other) and the CUDA kernels (kernels/cuda/layer_norm.cu: BlockRow, a
// thread block per row).
#pragma once

#include "cells/layer_norm.h"
#include "kernels/layer_norm_step.h"

namespace fusedrnn {
FUSEDRNN_ISA_BEGIN
namespace layer_norm {

// kKeep: a training step's (kernels/layer_norm_step.h, LNStep::keep), as the CUDA kernels take it
// always.
template <int kZone, bool kKeep = true, typename scalar_t, typename Row>
FUSEDRNN_HD void lstm_forward_of(const Row& row, const LNStep<scalar_t>& p, int64_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = 4 * p.H, r = p.r0 + b;
  const LSTMRow::Ptrs<acc_t> w{p.block(kXhat, r),
                               p.block(kHhat, r),
                               p.block(kGates, r),
                               p.block(kCPrev, r),
                               p.block(kChat, r),
                               p.block(kHPrev, r),
                               p.r_out ? p.block(kR, r) : nullptr,
                               p.block(kLSTMStats, r)};
  lstm_forward_row<kZone, kKeep, scalar_t, acc_t>(
      row, p.H, p.Hout, p.xp + b * G, p.hg + b * G, p.h_state + b * p.Hout, p.g_ih, p.g_hh, p.bias,
      p.g_c, p.b_c, p.c_state + b * p.H, w, p.r_out ? p.r_out + b * p.H : p.out + b * p.Hout,
      p.r_out ? nullptr : p.h_state + b * p.Hout, p.zc(b), p.zh(b));
}

template <int kZone, typename scalar_t, typename Row>
FUSEDRNN_HD void lstm_backward_of(const Row& row, const LNStep<scalar_t>& p, int64_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = 4 * p.H, r = p.r0 + b;
  const LSTMRow::Ptrs<acc_t> w{p.block(kXhat, r),
                               p.block(kHhat, r),
                               p.block(kGates, r),
                               p.block(kCPrev, r),
                               p.block(kChat, r),
                               p.block(kHPrev, r),
                               nullptr,
                               p.block(kLSTMStats, r)};
  lstm_backward_row<kZone, scalar_t, acc_t>(
      row, p.H, p.dh + b * p.H, p.g_ih, p.g_hh, p.g_c, p.b_c, p.dc_state + b * p.H, w,
      p.dx + (p.g0 + b) * G, p.dhg + (p.g0 + b) * G, p.row_sums(b), p.zc(b), p.zh(b));
}

template <int kZone, bool kKeep = true, typename scalar_t, typename Row>
FUSEDRNN_HD void gru_forward_of(const Row& row, const LNStep<scalar_t>& p, int64_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = 3 * p.H, r = p.r0 + b;
  const GRURow::Ptrs<acc_t> w{p.block(kGXhat, r), p.block(kGHhat, r), p.block(kGGates, r),
                              p.block(kGHPrev, r), p.block(kGRUStats, r)};
  gru_forward_row<kZone, kKeep, scalar_t, acc_t>(row, p.H, p.xp + b * G, p.hg + b * G, p.g_ih,
                                                 p.g_hh, p.b_ih, p.b_hh, p.h_state + b * p.H, w,
                                                 p.out + b * p.H, p.zh(b));
}

template <int kZone, typename scalar_t, typename Row>
FUSEDRNN_HD void gru_backward_of(const Row& row, const LNStep<scalar_t>& p, int64_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = 3 * p.H, r = p.r0 + b;
  const GRURow::Ptrs<acc_t> w{p.block(kGXhat, r), p.block(kGHhat, r), p.block(kGGates, r),
                              p.block(kGHPrev, r), p.block(kGRUStats, r)};
  gru_backward_row<kZone, scalar_t, acc_t>(row, p.H, p.g_ih, p.g_hh, p.b_hh, p.dh + b * p.H, w,
                                           p.dx + (p.g0 + b) * G, p.dhg + (p.g0 + b) * G,
                                           p.row_sums(b), p.zh(b));
}

}  // namespace layer_norm
FUSEDRNN_ISA_END
}  // namespace fusedrnn
