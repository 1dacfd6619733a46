// The per-step work of the GEMM + step kernel loops on raw pointers: a row-major GEMM, a copy
// and an elementwise add, and the stream the step kernels are launched on. A StepDevice is made
// once per layer call, for the dtype and device of its input, before the step loop; per step
// the loops then do pointer arithmetic and call it, building no tensor (design.md §3.1, §3.4).
//
// - CPU: the GEMM wraps the pointers in tensors of the same sizes and strides as the row views
//   the loops used before (at::for_blob, no copy) and calls gemm() (gemm.cpp: oneDNN or at::mm),
//   so results are those of the tensor code. Every pointer, leading dimension and transpose
//   flag the CUDA path passes to cuBLAS is built and checked by the same code on the CPU.
// - CUDA: the GEMM is one cublasGemmEx on the cuBLAS handle of the current device and thread,
//   set by ATen to the current stream when the StepDevice is made (cublas.cpp); the copy is a
//   cudaMemcpyAsync and the add a kernel, both on that stream. The CUDA tests, gradcheck
//   and opcheck (tests/test_cuda.py) cover this path on a GPU (passed on an H200).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "kernels/kernels.h"

namespace fusedrnn {
namespace driver {

// How a CUDA call's GEMMs run (cublas.cpp): chosen once per call from the dtype and ATen's
// precision settings. cuBLAS enum values are kept as ints so that this header needs no CUDA
// header.
struct CublasPlan {
  void* stream = nullptr;             // cudaStream_t: the current stream of the call's device
  void* handle = nullptr;             // cublasHandle_t of ATen's pool, set to that stream
  const char* aten_reason = nullptr;  // set: the GEMMs go through ATen instead, for this reason
  int data_type = 0;                  // cudaDataType of A, B and C
  int compute_type = 0;               // cublasComputeType_t
  int math_mode = 0;  // cublasMath_t the GEMM needs (set_math_mode: else left as it is)
  bool set_math_mode = false;
  bool double_scalars = false;  // alpha and beta are double (fp64), else float
};

// The arguments of the column-major cublasGemmEx call that computes a row-major GEMM of
// StepDevice::gemm: row-major C = op(A) op(B) is, read column-major, C^T = op(B)^T op(A)^T (a
// row-major r x c matrix with row stride ld is the column-major c x r matrix with leading
// dimension ld). So cuBLAS computes the n x m column-major C^T from B (first) and A, with the
// same transpose flags and leading dimensions.
struct ColMajorGemm {
  bool trans_a, trans_b;  // cuBLAS's transa, transb
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* c;
  int64_t ldc;
};

inline ColMajorGemm col_major_gemm(int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                                   bool trans_a, const void* b, int64_t ldb, bool trans_b, void* c,
                                   int64_t ldc) {
  return {trans_b, trans_a, n, m, k, b, ldb, a, lda, c, ldc};
}

class StepDevice {
 public:
  // For calls on tensors of like's dtype and device; on CUDA the current stream and cuBLAS
  // handle of like's device, which must be the current device (the drivers' device guard).
  explicit StepDevice(const at::Tensor& like);

  bool cuda() const { return cuda_; }
  // The cudaStream_t the step kernels are launched on (CUDA only).
  void* stream() const { return stream_; }

  // C = beta * C + op(A) op(B), every matrix row-major with the given row stride (leading
  // dimension, in elements): C is m x n (ldc), op(A) m x k, op(B) k x n. op(X) = X, or with
  // trans_x its transpose: A is then stored as k x m (lda), B as n x k (ldb). beta is 0 or 1;
  // with beta 0, C is not read. The pointers are of the call's dtype and device.
  void gemm(int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, bool trans_a,
            const void* b, int64_t ldb, bool trans_b, void* c, int64_t ldc, float beta) const;
  // dst[0, count) = src[0, count), count elements; the ranges do not overlap.
  void copy(void* dst, const void* src, int64_t count) const;
  // out[i] = a[i] + b[i] for i < count (rounded once to the dtype, as at::add).
  void add(void* out, const void* a, const void* b, int64_t count) const;

 private:
  at::Tensor wrap(const void* p, int64_t rows, int64_t cols, int64_t ld, bool trans) const;
  void aten_gemm(int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, bool trans_a,
                 const void* b, int64_t ldb, bool trans_b, void* c, int64_t ldc, float beta) const;

  at::ScalarType dtype_;
  at::Device device_;
  int64_t elem_size_;
  bool cuda_ = false;
  // CPU, FUSEDRNN_CPU_STEP_GEMM=cublas_reference: the GEMMs run the arguments of the cuBLAS call
  // (col_major_gemm) through a plain column-major GEMM with cuBLAS's contract, which checks
  // cuBLAS's leading-dimension rules: the CUDA path's argument mapping, tested on the CPU.
  bool cublas_reference_ = false;
  void* stream_ = nullptr;
  CublasPlan blas_;  // CUDA only
};

#ifdef FUSEDRNN_WITH_CUDA
// cublas.cpp. The plan of a call's GEMMs on tensors like `like`, on its device, which must be
// the current one, and that device's current stream.
CublasPlan cublas_plan(const at::Tensor& like);
// C = beta * C + op(A) op(B) (row-major, as StepDevice::gemm) with cuBLAS; sizes and leading
// dimensions positive and at most INT_MAX.
void cublas_gemm(const CublasPlan& plan, int64_t m, int64_t n, int64_t k, const void* a,
                 int64_t lda, bool trans_a, const void* b, int64_t ldb, bool trans_b, void* c,
                 int64_t ldc, float beta);
#endif

// How the per-step GEMMs of a call on tensors like `like` run: "cpu"; on CUDA "cublas"
// (cublasGemmEx on ATen's handle) or "aten: <reason>" (FUSEDRNN_CUDA_GEMM=aten, cuBLAS not
// found in the process, a precision setting only ATen's own GEMM honours).
std::string gemm_backend(const at::Tensor& like);

// C = beta * C + op(A) op(B) on the buffers of `c`, `a` and `b` (contiguous, of one dtype and
// device) at element offset 0, with StepDevice::gemm: the test hook of the raw GEMM, checking
// that each matrix lies inside its buffer.
void raw_gemm_op(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, int64_t m,
                 int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool trans_a,
                 bool trans_b, double beta);

}  // namespace driver
}  // namespace fusedrnn

// The step kernel `fn` of kernels/kernels.h on the device of StepDevice `dev`: the CPU loop, or the
// CUDA kernel on the call's stream.
#ifdef FUSEDRNN_WITH_CUDA
#define FUSEDRNN_LAUNCH(dev, fn, ...)                    \
  do {                                                   \
    if ((dev).cuda()) {                                  \
      ::fusedrnn::cuda::fn(__VA_ARGS__, (dev).stream()); \
    } else {                                             \
      ::fusedrnn::cpu::fn(__VA_ARGS__);                  \
    }                                                    \
  } while (0)
#else
#define FUSEDRNN_LAUNCH(dev, fn, ...) ::fusedrnn::cpu::fn(__VA_ARGS__)
#endif
