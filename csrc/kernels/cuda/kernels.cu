// CUDA launchers of the fused step kernels: one grid-stride kernel per launcher over the n*H
// elements of a step, one thread per (row, unit), consecutive threads on consecutive units of a
// row so that every load and store of a warp is coalesced. The per-element math is
// kernels/step_elements.h (the same code the CPU loops run); cell, phase and bias are template
// parameters, so the loop body has no run-time branches on them.
//
// Only light headers here (no <torch/extension.h>, no <ATen/ATen.h>): this file then compiles in
// seconds. Tensor plumbing, streams and device guards live in csrc/recurrence/ and
// csrc/execution/.
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "kernels/step_elements.h"

namespace fusedrnn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Grid cap: 8192 blocks of 256 threads is ~2M threads, several times what an H100/H200 keeps
// resident (132/144 SMs x 2048 threads); larger steps loop in the grid-stride loop instead of
// paying for more block launches.
constexpr int64_t kMaxBlocks = 8192;

int num_blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

// fn(b, j) for every element of an n x H step, grid-stride: element idx is unit j = idx % H of
// row b = idx / H.
template <typename Fn>
__device__ __forceinline__ void each_element(int64_t n, int64_t H, const Fn& fn) {
  const int64_t total = n * H;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t b = idx / H;
    fn(b, idx - b * H);
  }
}

template <CellKind kCell, Phase kPhase, bool kBias, typename scalar_t>
__global__ void __launch_bounds__(kThreads) lstm_forward_kernel(const LSTMForwardStep<scalar_t> p) {
  each_element(p.n, p.H,
               [&](int64_t b, int64_t j) { lstm_forward_element<kCell, kPhase, kBias>(p, b, j); });
}

template <CellKind kCell, Phase kPhase, int kDy, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    lstm_backward_kernel(const LSTMBackwardStep<scalar_t> p) {
  each_element(p.n, p.H,
               [&](int64_t b, int64_t j) { lstm_backward_element<kCell, kPhase, kDy>(p, b, j); });
}

template <bool kBias, typename scalar_t>
__global__ void __launch_bounds__(kThreads) gru_forward_kernel(const GRUForwardStep<scalar_t> p) {
  each_element(p.n, p.H, [&](int64_t b, int64_t j) { gru_forward_element<kBias>(p, b, j); });
}

template <int kDy, typename scalar_t>
__global__ void __launch_bounds__(kThreads) gru_backward_kernel(const GRUBackwardStep<scalar_t> p) {
  each_element(p.n, p.H, [&](int64_t b, int64_t j) { gru_backward_element<kDy>(p, b, j); });
}

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kThreads)
    zone_forward_kernel(const ZoneStep<scalar_t, weight_t> p) {
  each_element(p.n, p.H, [&](int64_t b, int64_t j) { zone_forward_element(p, b, j); });
}

template <int kDy, typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kThreads)
    zone_backward_kernel(const ZoneStep<scalar_t, weight_t> p) {
  each_element(p.n, p.H, [&](int64_t b, int64_t j) { zone_backward_element<kDy>(p, b, j); });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    add_kernel(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count;
       idx += stride) {
    out[idx] = a[idx] + b[idx];  // c10::Half / BFloat16: in float, rounded once
  }
}

// Launches `kernel` over the n*H elements of step `p` on `stream`; an empty step launches
// nothing (a zero-block grid is a launch error).
template <typename Params>
void launch(void (*kernel)(const Params), const Params& p, void* stream) {
  const int64_t total = p.n * p.H;
  if (total <= 0) return;
  kernel<<<num_blocks(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename scalar_t>
void lstm_forward_step(CellKind cell, Phase phase, const LSTMForwardStep<scalar_t>& p,
                       void* stream) {
  dispatch_lstm_family(cell, phase, [&](auto c, auto ph) {
    dispatch_bool(p.bias != nullptr, [&](auto bias) {
      launch(lstm_forward_kernel<decltype(c)::value, decltype(ph)::value, decltype(bias)::value,
                                 scalar_t>,
             p, stream);
    });
  });
}

template <typename scalar_t>
void lstm_backward_step(CellKind cell, Phase phase, const LSTMBackwardStep<scalar_t>& p,
                        void* stream) {
  dispatch_lstm_family(cell, phase, [&](auto c, auto ph) {
    dispatch_on_off(p.dy != nullptr, [&](auto dy) {
      launch(lstm_backward_kernel<decltype(c)::value, decltype(ph)::value, decltype(dy)::value,
                                  scalar_t>,
             p, stream);
    });
  });
}

template <typename scalar_t>
void gru_forward_step(const GRUForwardStep<scalar_t>& p, void* stream) {
  TORCH_INTERNAL_ASSERT((p.bias_ih == nullptr) == (p.bias_hh == nullptr));
  dispatch_bool(p.bias_ih != nullptr, [&](auto bias) {
    launch(gru_forward_kernel<decltype(bias)::value, scalar_t>, p, stream);
  });
}

template <typename scalar_t>
void gru_backward_step(const GRUBackwardStep<scalar_t>& p, void* stream) {
  dispatch_on_off(p.dy != nullptr, [&](auto dy) {
    launch(gru_backward_kernel<decltype(dy)::value, scalar_t>, p, stream);
  });
}

template <typename scalar_t, typename weight_t>
void zone_forward_step(const ZoneStep<scalar_t, weight_t>& p, void* stream) {
  launch(zone_forward_kernel<scalar_t, weight_t>, p, stream);
}

template <typename scalar_t, typename weight_t>
void zone_backward_step(const ZoneStep<scalar_t, weight_t>& p, void* stream) {
  dispatch_on_off(p.dy != nullptr, [&](auto dy) {
    launch(zone_backward_kernel<decltype(dy)::value, scalar_t, weight_t>, p, stream);
  });
}

template <typename scalar_t>
void add_elements(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t count,
                  void* stream) {
  if (count <= 0) return;
  add_kernel<scalar_t>
      <<<num_blocks(count), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(out, a, b, count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void copy_bytes(void* dst, const void* src, int64_t bytes, void* stream) {
  if (bytes <= 0) return;
  C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice,
                                 static_cast<cudaStream_t>(stream)));
}

#define FUSEDRNN_INSTANTIATE(T)                                                            \
  template void add_elements<T>(T*, const T*, const T*, int64_t, void*);                   \
  template void lstm_forward_step<T>(CellKind, Phase, const LSTMForwardStep<T>&, void*);   \
  template void lstm_backward_step<T>(CellKind, Phase, const LSTMBackwardStep<T>&, void*); \
  template void gru_forward_step<T>(const GRUForwardStep<T>&, void*);                      \
  template void gru_backward_step<T>(const GRUBackwardStep<T>&, void*);
FUSEDRNN_INSTANTIATE(float)
FUSEDRNN_INSTANTIATE(double)
FUSEDRNN_INSTANTIATE(c10::BFloat16)
FUSEDRNN_INSTANTIATE(c10::Half)
#undef FUSEDRNN_INSTANTIATE

// (the layer's dtype, the weights'): a layer's own, and the op-math buffers of a half type's
#define FUSEDRNN_INSTANTIATE(T, W)                                     \
  template void zone_forward_step<T, W>(const ZoneStep<T, W>&, void*); \
  template void zone_backward_step<T, W>(const ZoneStep<T, W>&, void*);
FUSEDRNN_INSTANTIATE(float, float)
FUSEDRNN_INSTANTIATE(double, double)
FUSEDRNN_INSTANTIATE(c10::BFloat16, c10::BFloat16)
FUSEDRNN_INSTANTIATE(c10::Half, c10::Half)
FUSEDRNN_INSTANTIATE(float, c10::BFloat16)
FUSEDRNN_INSTANTIATE(float, c10::Half)
#undef FUSEDRNN_INSTANTIATE

}  // namespace cuda
}  // namespace fusedrnn
