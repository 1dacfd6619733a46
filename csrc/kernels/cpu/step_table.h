// The unfused CPU step kernels (the step kernel after a separate GEMM: every dtype, the cells'
// single steps, the baseline ISA) as a table of entry points per instruction set: compiled once
// portably (kernels_cpu.cpp) and once per ISA (isa/avx2_steps.cpp, isa/avx512_steps.cpp); the
// cpu::*_step functions of kernels/kernels.h call the table of the ISA in use.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels/kernels.h"

namespace fusedrnn {
namespace cpu {

template <typename T>
struct StepFns {
  void (*lstm_forward)(CellKind, Phase, const LSTMForwardStep<T>&) = nullptr;
  void (*lstm_backward)(CellKind, Phase, const LSTMBackwardStep<T>&) = nullptr;
  void (*gru_forward)(const GRUForwardStep<T>&) = nullptr;
  void (*gru_backward)(const GRUBackwardStep<T>&) = nullptr;
};

struct StepKernels {
  StepFns<float> f32;
  StepFns<double> f64;
  StepFns<c10::BFloat16> bf16;
  StepFns<c10::Half> f16;

  template <typename T>
  const StepFns<T>& of() const {
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

// The tables compiled into this library (nullptr where the build has no such ISA, see
// fused_isa.h) and the portable one.
const StepKernels* step_kernels_avx2();
const StepKernels* step_kernels_avx512();
const StepKernels& step_kernels_portable();

}  // namespace cpu
}  // namespace fusedrnn
