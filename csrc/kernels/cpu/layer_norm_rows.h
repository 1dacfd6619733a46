// The row loops of the layer-normalised cells' steps over the rows [b0, b1) of a step, and their
// table `kLayerNormKernels`. Included once per instruction set, in namespace
// fusedrnn::cpu::FUSEDRNN_ISA_NAMESPACE (recurrence/layer_norm.cpp: portable;
// isa/layer_norm_avx2.cpp, isa/layer_norm_avx512.cpp), as step_loops.h is.
#pragma once

#include <type_traits>

#include "cells/layer_norm.h"
#include "layer_norm_table.h"

namespace fusedrnn {
namespace cpu {
namespace FUSEDRNN_ISA_NAMESPACE {

// Zoneout is fixed per step at compile time in the row functions (cells/layer_norm.h, kZone):
// each loop below runs with kZone = whether the step zones its states (p.zone_h set).
template <typename scalar_t, typename Fn>
void with_zone(const LNStep<scalar_t>& p, const Fn& fn) {
  if (p.zone_h != nullptr) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

template <typename scalar_t>
void ln_lstm_forward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone(p, [&](auto zone) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t G = 4 * p.H;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = p.r0 + b;
      const layer_norm::LSTMRow::Ptrs<acc_t> w{p.block(kXhat, p.xr0 + b),
                                               p.block(kHhat, r),
                                               p.block(kGates, r),
                                               p.block(kCPrev, r),
                                               p.block(kChat, r),
                                               p.block(kHPrev, r),
                                               p.r_out ? p.block(kR, r) : nullptr,
                                               p.block(kLSTMStats, r)};
      layer_norm::lstm_forward_row<decltype(zone)::value, scalar_t, acc_t>(
          p.H, p.Hout, p.xp + (p.xr0 + b) * G, p.hg + b * G, p.h_state + b * p.Hout, p.g_ih, p.g_hh,
          p.bias, p.g_c, p.b_c, p.c_state + b * p.H, w,
          p.r_out ? p.r_out + b * p.H : p.out + b * p.Hout,
          p.r_out ? nullptr : p.h_state + b * p.Hout, p.zc(b), p.zh(b));
    }
  });
}

template <typename scalar_t>
void ln_lstm_backward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone(p, [&](auto zone) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t G = 4 * p.H;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = p.r0 + b;
      const layer_norm::LSTMRow::Ptrs<acc_t> w{p.block(kXhat, r),
                                               p.block(kHhat, r),
                                               p.block(kGates, r),
                                               p.block(kCPrev, r),
                                               p.block(kChat, r),
                                               p.block(kHPrev, r),
                                               nullptr,
                                               p.block(kLSTMStats, r)};
      layer_norm::lstm_backward_row<decltype(zone)::value, scalar_t, acc_t>(
          p.H, p.dh + b * p.H, p.g_ih, p.g_hh, p.g_c, p.b_c, p.dc_state + b * p.H, w,
          p.dx + (p.g0 + b) * G, p.dhg + (p.g0 + b) * G, p.sums, p.zc(b), p.zh(b));
    }
  });
}

template <typename scalar_t>
void ln_gru_forward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone(p, [&](auto zone) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t G = 3 * p.H;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = p.r0 + b;
      const layer_norm::GRURow::Ptrs<acc_t> w{p.block(kGXhat, p.xr0 + b), p.block(kGHhat, r),
                                              p.block(kGGates, r), p.block(kGHPrev, r),
                                              p.block(kGRUStats, r)};
      layer_norm::gru_forward_row<decltype(zone)::value, scalar_t, acc_t>(
          p.H, p.xp + (p.xr0 + b) * G, p.hg + b * G, p.g_ih, p.g_hh, p.b_ih, p.b_hh,
          p.h_state + b * p.H, w, p.out + b * p.H, p.zh(b));
    }
  });
}

template <typename scalar_t>
void ln_gru_backward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone(p, [&](auto zone) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t G = 3 * p.H;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = p.r0 + b;
      const layer_norm::GRURow::Ptrs<acc_t> w{p.block(kGXhat, r), p.block(kGHhat, r),
                                              p.block(kGGates, r), p.block(kGHPrev, r),
                                              p.block(kGRUStats, r)};
      layer_norm::gru_backward_row<decltype(zone)::value, scalar_t, acc_t>(
          p.H, p.g_ih, p.g_hh, p.b_hh, p.dh + b * p.H, w, p.dx + (p.g0 + b) * G,
          p.dhg + (p.g0 + b) * G, p.sums, p.zh(b));
    }
  });
}

template <typename T>
constexpr LayerNormFns<T> ln_fns() {
  return {&ln_lstm_forward_rows<T>, &ln_lstm_backward_rows<T>, &ln_gru_forward_rows<T>,
          &ln_gru_backward_rows<T>};
}

constexpr LayerNormKernels kLayerNormKernels = {ln_fns<float>(), ln_fns<double>(),
                                                ln_fns<c10::BFloat16>(), ln_fns<c10::Half>()};

}  // namespace FUSEDRNN_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fusedrnn
