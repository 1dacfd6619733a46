// The row loops of the layer-normalised cells' fused steps (cells/layer_norm.h) as a table of
// entry points per instruction set: compiled portably (recurrence/layer_norm.cpp) and once per
// ISA (kernels/cpu/isa/avx2_layer_norm.cpp, avx512_layer_norm.cpp); the driver calls the table of
// the ISA in use (`layer_norm_kernels()`) on each task's rows of a step.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "kernels/layer_norm_step.h"

namespace fusedrnn {
namespace cpu {

template <typename T>
struct LayerNormFns {
  void (*lstm_forward)(const LNStep<T>&, int64_t b0, int64_t b1) = nullptr;
  void (*lstm_backward)(const LNStep<T>&, int64_t b0, int64_t b1) = nullptr;
  void (*gru_forward)(const LNStep<T>&, int64_t b0, int64_t b1) = nullptr;
  void (*gru_backward)(const LNStep<T>&, int64_t b0, int64_t b1) = nullptr;
};

struct LayerNormKernels {
  LayerNormFns<float> f32;
  LayerNormFns<double> f64;
  LayerNormFns<c10::BFloat16> bf16;
  LayerNormFns<c10::Half> f16;

  template <typename T>
  const LayerNormFns<T>& of() const {
    if constexpr (std::is_same_v<T, float>)
      return f32;
    else if constexpr (std::is_same_v<T, double>)
      return f64;
    else if constexpr (std::is_same_v<T, c10::BFloat16>)
      return bf16;
    else
      return f16;
  }
};

// The tables compiled into this library (nullptr where the build has no such ISA) and the one of
// the ISA in use (kernels/cpu/isa.h; the AVX-512 table serves avx512_bf16 too).
const LayerNormKernels* layer_norm_kernels_avx2();
const LayerNormKernels* layer_norm_kernels_avx512();
const LayerNormKernels& layer_norm_kernels();

}  // namespace cpu
}  // namespace fusedrnn
