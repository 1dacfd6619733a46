// How a layer call runs, decided once per call before the dtype dispatch: the driver (lstm.cpp,
// gru.cpp) runs the same step loop with one of two step executors,
// - kGemmStep: the step's recurrent GEMM through ATen (MKL / oneDNN on the CPU, cuBLAS on CUDA)
//   and then ONE fused step kernel (CPU loop or CUDA kernel, launch() below); every dtype and
//   device;
// - kFusedTiles: the step's GEMM and its step kernel in one tiled pass (cpu/fused_step.h), with
//   the kernels of the ISA in use (cpu/isa.h); fp32 on the CPU, calls long enough to repay
//   packing the weights.
// Adding an ISA touches cpu/ only; a new device strategy (a persistent CUDA kernel) is a third
// executor chosen here.
#pragma once

#include <ATen/ATen.h>

#include <memory>

#include "../cpu/fused_step.h"
#include "../kernels.h"

#ifdef FUSEDRNN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fusedrnn {
namespace driver {

enum class Strategy { kGemmStep, kFusedTiles };

struct Plan {
  Strategy strategy = Strategy::kGemmStep;
  const cpu::FusedStepKernels* kernels = nullptr;  // kFusedTiles: the ISA's kernels
};

// The plan of a call on `input` of `steps` steps and `rows` rows in all; `tiles_ok` false where
// the driver has no tiled path for the call (the LSTM backward with a projection).
inline Plan plan_call(const at::Tensor& input, int64_t steps, int64_t rows, bool tiles_ok = true) {
  Plan plan;
  if (tiles_ok) plan.kernels = cpu::fused_kernels_for(input, steps, rows);
  if (plan.kernels) plan.strategy = Strategy::kFusedTiles;
  return plan;
}

inline std::unique_ptr<c10::DeviceGuard> guard_for(const at::Tensor& t) {
  return std::make_unique<c10::DeviceGuard>(t.device());
}

}  // namespace driver
}  // namespace fusedrnn

// The step kernel `fn` of kernels.h on the device of `dev`: the CPU loop, or the CUDA kernel on
// the current stream.
#ifdef FUSEDRNN_WITH_CUDA
#define FUSEDRNN_LAUNCH(dev, fn, ...)                                           \
  do {                                                                          \
    if ((dev).is_cuda()) {                                                      \
      ::fusedrnn::cuda::fn(__VA_ARGS__, at::cuda::getCurrentCUDAStream().stream()); \
    } else {                                                                    \
      ::fusedrnn::cpu::fn(__VA_ARGS__);                                         \
    }                                                                           \
  } while (0)
#else
#define FUSEDRNN_LAUNCH(dev, fn, ...)                                          \
  do {                                                                         \
    TORCH_CHECK(!(dev).is_cuda(), "fusedrnn was built without CUDA support");  \
    ::fusedrnn::cpu::fn(__VA_ARGS__);                                          \
  } while (0)
#endif
