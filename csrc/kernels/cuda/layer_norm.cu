// CUDA launchers of the layer-normalised cells' fused steps: one thread block per row of the
// step, running the row's passes (cells/layer_norm.h) on its threads (`BlockRow`): the columns of
// a pass strided over the threads, consecutive threads on consecutive columns (coalesced), a
// barrier after each pass, and the row sums (LayerNorm's statistics) as block reductions whose
// result every thread reads. The per-row code is kernels/layer_norm_elements.h, the one the CPU
// row loops run. tests/test_cuda.py covers it on a GPU (passed on an H200).
//
// A row's state, workspace rows and gradient sums belong to its block alone, and a step's
// kernel follows the previous step's GEMM on the same stream, so blocks never share memory.
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "kernels/layer_norm_elements.h"

namespace fusedrnn {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;  // threads of a row's block
constexpr int kWarps = kRowThreads / 32;

// A row's passes on the threads of its block (the `Row` of cells/layer_norm.h). Device code
// only: the row functions are host-device templates, so the members are too, with empty host
// bodies that nothing calls.
struct BlockRow {
  double* scratch;  // shared memory: 2 * kWarps values of the op-math type (at most double)

  template <typename Fn>
  __host__ __device__ void each(int64_t n, const Fn& f) const {
#if defined(__CUDA_ARCH__)
    for (int64_t k = threadIdx.x; k < n; k += kRowThreads) f(k);
    __syncthreads();
#endif
  }

  template <typename Fn>
  __host__ __device__ auto sum2(int64_t n, const Fn& f) const {
    using S = decltype(f(int64_t(0)));
    using acc_t = decltype(S{}.a);
    acc_t a = 0, b = 0;
#if defined(__CUDA_ARCH__)
    for (int64_t k = threadIdx.x; k < n; k += kRowThreads) {
      const S v = f(k);
      a += v.a;
      b += v.b;
    }
    acc_t* const part = reinterpret_cast<acc_t*>(scratch);
    a = warp_sum(a);
    b = warp_sum(b);
    if ((threadIdx.x & 31) == 0) {
      part[threadIdx.x >> 5] = a;
      part[kWarps + (threadIdx.x >> 5)] = b;
    }
    __syncthreads();
    a = 0;
    b = 0;
    for (int w = 0; w < kWarps; ++w) {
      a += part[w];
      b += part[kWarps + w];
    }
    __syncthreads();
#endif
    return S{a, b};
  }

  template <typename Fn>
  __host__ __device__ void once(const Fn& f) const {
#if defined(__CUDA_ARCH__)
    if (threadIdx.x == 0) f();
#endif
  }

 private:
  // The sum over a warp's lanes (lane 0's is the one used).
  template <typename acc_t>
  __device__ static acc_t warp_sum(acc_t v) {
#if defined(__CUDA_ARCH__)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
#endif
    return v;
  }
};

// The step's row blockIdx.x on its block. The step struct is a kernel parameter (by value).
#define FUSEDRNN_LN_KERNEL(name, fn)                                               \
  template <int kZone, typename scalar_t>                                          \
  __global__ void __launch_bounds__(kRowThreads) name(const LNStep<scalar_t> p) {  \
    __shared__ double scratch[2 * kWarps];                                         \
    layer_norm::fn<kZone>(BlockRow{scratch}, p, static_cast<int64_t>(blockIdx.x)); \
  }
FUSEDRNN_LN_KERNEL(ln_lstm_forward_kernel, lstm_forward_of)
FUSEDRNN_LN_KERNEL(ln_lstm_backward_kernel, lstm_backward_of)
FUSEDRNN_LN_KERNEL(ln_gru_forward_kernel, gru_forward_of)
FUSEDRNN_LN_KERNEL(ln_gru_backward_kernel, gru_backward_of)
#undef FUSEDRNN_LN_KERNEL

template <typename scalar_t>
using RowKernel = void (*)(const LNStep<scalar_t>);

// Launches on rows [0, n) of step p the kernel of its zoneout: `off` (none), `on` (p.zone_h set)
// or `cell_only` (the LSTM's: p.zone_c alone, a projected step); an empty step launches nothing
// (a zero-block grid is a launch error).
template <typename scalar_t>
void launch(RowKernel<scalar_t> off, RowKernel<scalar_t> on, RowKernel<scalar_t> cell_only,
            const LNStep<scalar_t>& p, int64_t n, void* stream) {
  if (n <= 0) return;
  TORCH_CHECK(n <= 0x7fffffff, "fusedrnn: ", n, " rows in a step, more than a CUDA grid holds");
  RowKernel<scalar_t> kernel = p.zone_h != nullptr ? on : p.zone_c != nullptr ? cell_only : off;
  TORCH_INTERNAL_ASSERT(kernel != nullptr, "a zoned layer-normalised step without its kernel");
  kernel<<<static_cast<unsigned>(n), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename scalar_t>
void ln_lstm_forward_rows(const LNStep<scalar_t>& p, int64_t n, void* stream) {
  launch(ln_lstm_forward_kernel<kOff, scalar_t>, ln_lstm_forward_kernel<kOn, scalar_t>,
         ln_lstm_forward_kernel<kCellOnly, scalar_t>, p, n, stream);
}

template <typename scalar_t>
void ln_lstm_backward_rows(const LNStep<scalar_t>& p, int64_t n, void* stream) {
  launch(ln_lstm_backward_kernel<kOff, scalar_t>, ln_lstm_backward_kernel<kOn, scalar_t>,
         ln_lstm_backward_kernel<kCellOnly, scalar_t>, p, n, stream);
}

template <typename scalar_t>
void ln_gru_forward_rows(const LNStep<scalar_t>& p, int64_t n, void* stream) {
  launch<scalar_t>(ln_gru_forward_kernel<kOff, scalar_t>, ln_gru_forward_kernel<kOn, scalar_t>,
                   nullptr, p, n, stream);
}

template <typename scalar_t>
void ln_gru_backward_rows(const LNStep<scalar_t>& p, int64_t n, void* stream) {
  launch<scalar_t>(ln_gru_backward_kernel<kOff, scalar_t>, ln_gru_backward_kernel<kOn, scalar_t>,
                   nullptr, p, n, stream);
}

#define FUSEDRNN_INSTANTIATE(T)                                             \
  template void ln_lstm_forward_rows<T>(const LNStep<T>&, int64_t, void*);  \
  template void ln_lstm_backward_rows<T>(const LNStep<T>&, int64_t, void*); \
  template void ln_gru_forward_rows<T>(const LNStep<T>&, int64_t, void*);   \
  template void ln_gru_backward_rows<T>(const LNStep<T>&, int64_t, void*);
FUSEDRNN_INSTANTIATE(float)
FUSEDRNN_INSTANTIATE(double)
FUSEDRNN_INSTANTIATE(c10::BFloat16)
FUSEDRNN_INSTANTIATE(c10::Half)
#undef FUSEDRNN_INSTANTIATE

}  // namespace cuda
}  // namespace fusedrnn
