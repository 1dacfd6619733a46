// The row loops of the layer-normalised cells' steps over the rows [b0, b1) of a step, and their
// table `kLayerNormKernels`. Included once per instruction set, in namespace
// fusedrnn::cpu::FUSEDRNN_ISA_NAMESPACE (recurrence/layer_norm.cpp: portable;
// isa/avx2_layer_norm.cpp, isa/avx512_layer_norm.cpp), as step_loops.h is.
#pragma once

#include <type_traits>

#include "kernels/layer_norm_elements.h"
#include "layer_norm_table.h"

namespace fusedrnn {
namespace cpu {
namespace FUSEDRNN_ISA_NAMESPACE {

// Zoneout is fixed per step at compile time in the row functions (cells/layer_norm.h, kZone):
// each loop below runs with kZone = kOn when the step zones its states (p.zone_h set), kOff when
// it zones none, and (kCellOnly_: the LSTM's) kCellOnly when it zones c_t only (p.zone_c set:
// a projected LSTM).
template <bool kCellOnly_, typename scalar_t, typename Fn>
void with_zone(const LNStep<scalar_t>& p, const Fn& fn) {
  if (p.zone_h != nullptr) {
    fn(std::integral_constant<int, kOn>{});
  } else if (kCellOnly_ && p.zone_c != nullptr) {
    if constexpr (kCellOnly_) fn(std::integral_constant<int, kCellOnly>{});
  } else {
    fn(std::integral_constant<int, kOff>{});
  }
}

// Rows [b0, b1) of step p, one after the other (kernels/layer_norm_elements.h).
template <typename scalar_t>
void ln_lstm_forward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone<true>(p, [&](auto zone) {
    for (int64_t b = b0; b < b1; ++b) {
      layer_norm::lstm_forward_of<decltype(zone)::value>(layer_norm::SerialRow{}, p, b);
    }
  });
}

template <typename scalar_t>
void ln_lstm_backward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone<true>(p, [&](auto zone) {
    for (int64_t b = b0; b < b1; ++b) {
      layer_norm::lstm_backward_of<decltype(zone)::value>(layer_norm::SerialRow{}, p, b);
    }
  });
}

template <typename scalar_t>
void ln_gru_forward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone<false>(p, [&](auto zone) {
    for (int64_t b = b0; b < b1; ++b) {
      layer_norm::gru_forward_of<decltype(zone)::value>(layer_norm::SerialRow{}, p, b);
    }
  });
}

template <typename scalar_t>
void ln_gru_backward_rows(const LNStep<scalar_t>& p, int64_t b0, int64_t b1) {
  with_zone<false>(p, [&](auto zone) {
    for (int64_t b = b0; b < b1; ++b) {
      layer_norm::gru_backward_of<decltype(zone)::value>(layer_norm::SerialRow{}, p, b);
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
