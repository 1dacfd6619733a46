// How a layer call runs, decided once per call before the dtype dispatch: the driver (lstm.cpp,
// gru.cpp) runs the same step loop with one of two step executors,
// - kGemmStep: per step the recurrent GEMM and then ONE fused step kernel, both through the
//   call's StepDevice (step_device.h) on raw pointers and row strides computed once per call:
//   on the CPU the GEMM through ATen (MKL / oneDNN, gemm.cpp) and the CPU loop of the kernel; on
//   CUDA cublasGemmEx on ATen's cuBLAS handle and the CUDA kernel, both on the current stream,
//   so that a step costs the host a few microseconds (cublas.cpp; its tests pass on an H200,
//   speed not measured). Every dtype and device;
// - kFusedTiles: the step's GEMM and its step kernel in one tiled pass (kernels/cpu/fused_step.h),
//   with the kernels of the ISA in use (kernels/cpu/isa.h); fp32 and bf16 on the CPU, calls long
//   enough to repay packing the weights.
// Adding an ISA touches cpu/ only; a new device strategy (a persistent CUDA kernel) is a third
// executor chosen here.
#pragma once

#include <ATen/ATen.h>

#include <memory>

#include <c10/core/DeviceGuard.h>

#include "kernels/cpu/fused_isa.h"
#include "kernels/cpu/fused_step.h"
#include "kernels/kernels.h"
#include "recurrence/steps.h"
#include "step_device.h"

namespace fusedrnn {
namespace driver {

enum class Strategy { kGemmStep, kFusedTiles };

struct Plan {
  Strategy strategy = Strategy::kGemmStep;
  const cpu::FusedStepKernels* kernels = nullptr;  // kFusedTiles: the ISA's kernels
};

// Which calls of a driver may run the tiles (kernels/cpu/fused_step.h: which calls they repay):
// calls of enough steps and rows; also one-step (or few-step) calls of enough rows a step (the
// LSTM-family forward, where that measured faster); or none (the LSTM backward with a
// projection, which has no tiled path).
enum class TilesFor { kLongCalls, kAlsoWideShortCalls, kNone };

// The plan of a call on `input` of `s.T` steps, `s.N` rows in all and at most `s.B` per step.
// Steps of at most kSmallGemmRows rows stay GemmStep: their recurrent GEMM streams the weight
// once either way (the small GEMMs, kernels/cpu/isa/small_gemm.h), and GemmStep's input projection
// is one GEMM per chunk of steps, where the tiles would stream W_ih on every step too.
inline Plan plan_call(const at::Tensor& input, const Steps& s, TilesFor tiles) {
  Plan plan;
  if (tiles != TilesFor::kNone && s.B > cpu::kSmallGemmRows) {
    plan.kernels =
        cpu::fused_kernels_for(input, s.T, s.N, s.B, tiles == TilesFor::kAlsoWideShortCalls);
  }
  if (plan.kernels) plan.strategy = Strategy::kFusedTiles;
  return plan;
}

// fn(T{}) with T the element type of a kFusedTiles call: float or c10::BFloat16.
template <typename Fn>
void dispatch_tiles(at::ScalarType type, const Fn& fn) {
  if (type == at::kBFloat16) {
    fn(c10::BFloat16{});
  } else {
    TORCH_INTERNAL_ASSERT(type == at::kFloat, "fused tiles: float and bf16 only, got ", type);
    fn(float{});
  }
}

inline std::unique_ptr<c10::DeviceGuard> guard_for(const at::Tensor& t) {
  return std::make_unique<c10::DeviceGuard>(t.device());
}

}  // namespace driver
}  // namespace fusedrnn
