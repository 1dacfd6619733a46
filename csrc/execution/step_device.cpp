#include "step_device.h"

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>

#include "gemm.h"

namespace fusedrnn {
namespace driver {
namespace {

#ifdef FUSEDRNN_WITH_CUDA
bool fits_int(int64_t v) { return v <= INT_MAX; }
#endif

// (rows - 1) * ld + cols elements from the start: the extent of a row-major matrix.
int64_t extent(int64_t rows, int64_t cols, int64_t ld) {
  return rows == 0 || cols == 0 ? 0 : (rows - 1) * ld + cols;
}

// cublasGemmEx's contract (column-major: X(i, j) is x[i + j * ldx]): C = beta * C + op(A) op(B)
// with op(A) m x k, stored m x k (lda >= m) or, transposed, k x m (lda >= k); op(B) k x n
// likewise; C m x n (ldc >= m); with beta 0, C is not read. Accumulates in Acc and rounds once,
// as cuBLAS's fp32 / fp64 compute types do.
template <typename T, typename Acc>
void col_major_reference(const ColMajorGemm& g, float beta) {
  TORCH_CHECK(g.lda >= std::max<int64_t>(g.trans_a ? g.k : g.m, 1) &&
                  g.ldb >= std::max<int64_t>(g.trans_b ? g.n : g.k, 1) &&
                  g.ldc >= std::max<int64_t>(g.m, 1),
              "fusedrnn internal error: cuBLAS would refuse the leading dimensions lda ", g.lda,
              ", ldb ", g.ldb, ", ldc ", g.ldc, " of a ", g.m, " x ", g.n, " x ", g.k,
              " GEMM (transa ", g.trans_a, ", transb ", g.trans_b, ")");
  const T* a = static_cast<const T*>(g.a);
  const T* b = static_cast<const T*>(g.b);
  T* c = static_cast<T*>(g.c);
  for (int64_t j = 0; j < g.n; ++j) {
    for (int64_t i = 0; i < g.m; ++i) {
      Acc acc = 0;
      for (int64_t l = 0; l < g.k; ++l) {
        const Acc x = static_cast<Acc>(g.trans_a ? a[l + i * g.lda] : a[i + l * g.lda]);
        const Acc y = static_cast<Acc>(g.trans_b ? b[j + l * g.ldb] : b[l + j * g.ldb]);
        acc += x * y;
      }
      T& out = c[i + j * g.ldc];
      if (beta != 0.0f) acc += static_cast<Acc>(out);
      out = static_cast<T>(acc);
    }
  }
}

bool cublas_reference_requested() {
  const char* env = std::getenv("FUSEDRNN_CPU_STEP_GEMM");
  return env != nullptr && std::string(env) == "cublas_reference";
}

}  // namespace

StepDevice::StepDevice(const at::Tensor& like)
    : dtype_(like.scalar_type()), device_(like.device()), elem_size_(like.element_size()) {
  if (!device_.is_cuda()) {
    // read per call (cheap), so that a test may set it in its own process
    cublas_reference_ = cublas_reference_requested();
    return;
  }
#ifdef FUSEDRNN_WITH_CUDA
  cuda_ = true;
  blas_ = cublas_plan(like);
  stream_ = blas_.stream;
#else
  TORCH_CHECK(false, "fusedrnn was built without CUDA support");
#endif
}

// The tensor op(X) (rows x cols) over X stored row-major at p with row stride ld: strides
// (ld, 1), or (1, ld) transposed, the strides of the row views (narrow) and of the transposed
// weights (t()) the loops passed to gemm() before, so that ATen picks the same kernels.
at::Tensor StepDevice::wrap(const void* p, int64_t rows, int64_t cols, int64_t ld,
                            bool trans) const {
  const std::array<int64_t, 2> sizes{rows, cols};
  const std::array<int64_t, 2> strides =
      trans ? std::array<int64_t, 2>{1, ld} : std::array<int64_t, 2>{ld, 1};
  return at::for_blob(const_cast<void*>(p), sizes)
      .strides(at::IntArrayRef(strides))
      .options(at::TensorOptions().dtype(dtype_).device(device_))
      .target_device(device_)
      .make_tensor();
}

void StepDevice::aten_gemm(int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                           bool trans_a, const void* b, int64_t ldb, bool trans_b, void* c,
                           int64_t ldc, float beta) const {
  // fp32 steps of a few rows, and bf16 ones where ATen's bf16 GEMM is its fallback loops: the
  // small GEMMs on the pointers (no tensor to wrap)
  if (device_.is_cpu() && dtype_ == at::kFloat && !trans_a && k > 0 &&
      small_gemm_f32(m, n, k, static_cast<const float*>(a), lda, static_cast<const float*>(b), ldb,
                     trans_b, static_cast<float*>(c), ldc, beta)) {
    return;
  }
  if (device_.is_cpu() && dtype_ == at::kBFloat16 && !trans_a && k > 0 &&
      small_gemm_bf16(m, n, k, static_cast<const c10::BFloat16*>(a), lda,
                      static_cast<const c10::BFloat16*>(b), ldb, trans_b,
                      static_cast<c10::BFloat16*>(c), ldc, beta)) {
    return;
  }
  driver::gemm(wrap(c, m, n, ldc, false), wrap(a, m, k, lda, trans_a), wrap(b, k, n, ldb, trans_b),
               beta);
}

void StepDevice::gemm(int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, bool trans_a,
                      const void* b, int64_t ldb, bool trans_b, void* c, int64_t ldc,
                      float beta) const {
  // The loops' own arithmetic: a failure here is a bug in the driver, not a bad argument. The
  // leading dimensions are those cuBLAS requires (at least the stored row length, and 1).
  TORCH_CHECK(m >= 0 && n >= 0 && k >= 0 && (beta == 0.0f || beta == 1.0f),
              "fusedrnn internal error: gemm of sizes ", m, " x ", n, " x ", k, ", beta ", beta);
  TORCH_CHECK(ldc >= std::max<int64_t>(n, 1) && lda >= std::max<int64_t>(trans_a ? m : k, 1) &&
                  ldb >= std::max<int64_t>(trans_b ? k : n, 1),
              "fusedrnn internal error: gemm ", m, " x ", n, " x ", k, " (trans_a ", trans_a,
              ", trans_b ", trans_b, ") with leading dimensions lda ", lda, ", ldb ", ldb, ", ldc ",
              ldc);
  if (m == 0 || n == 0) return;
  if (cublas_reference_) {
    const ColMajorGemm g = col_major_gemm(m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc);
    switch (dtype_) {
      case at::kFloat:
        return col_major_reference<float, float>(g, beta);
      case at::kDouble:
        return col_major_reference<double, double>(g, beta);
      case at::kBFloat16:
        return col_major_reference<c10::BFloat16, float>(g, beta);
      case at::kHalf:
        return col_major_reference<c10::Half, float>(g, beta);
      default:
        TORCH_CHECK(false, "fusedrnn internal error: gemm of dtype ", dtype_);
    }
  }
#ifdef FUSEDRNN_WITH_CUDA
  // k == 0 (C = beta * C) and sizes past cuBLAS's int arguments go through ATen.
  if (cuda_ && blas_.aten_reason == nullptr && k > 0 && fits_int(m) && fits_int(n) && fits_int(k) &&
      fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    cublas_gemm(blas_, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, beta);
    return;
  }
#endif
  aten_gemm(m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, beta);
}

void StepDevice::copy(void* dst, const void* src, int64_t count) const {
  TORCH_CHECK(count >= 0, "fusedrnn internal error: copy of ", count, " elements");
  if (count == 0) return;
#ifdef FUSEDRNN_WITH_CUDA
  if (cuda_) {
    cuda::copy_bytes(dst, src, count * elem_size_, stream_);
    return;
  }
#endif
  std::memcpy(dst, src, static_cast<size_t>(count * elem_size_));
}

void StepDevice::add(void* out, const void* a, const void* b, int64_t count) const {
  TORCH_CHECK(count >= 0, "fusedrnn internal error: add of ", count, " elements");
  if (count == 0) return;
#ifdef FUSEDRNN_WITH_CUDA
  if (cuda_) {
    switch (dtype_) {
      case at::kFloat:
        return cuda::add_elements(static_cast<float*>(out), static_cast<const float*>(a),
                                  static_cast<const float*>(b), count, stream_);
      case at::kDouble:
        return cuda::add_elements(static_cast<double*>(out), static_cast<const double*>(a),
                                  static_cast<const double*>(b), count, stream_);
      case at::kBFloat16:
        return cuda::add_elements(static_cast<c10::BFloat16*>(out),
                                  static_cast<const c10::BFloat16*>(a),
                                  static_cast<const c10::BFloat16*>(b), count, stream_);
      case at::kHalf:
        return cuda::add_elements(static_cast<c10::Half*>(out), static_cast<const c10::Half*>(a),
                                  static_cast<const c10::Half*>(b), count, stream_);
      default:
        TORCH_CHECK(false, "fusedrnn internal error: add of dtype ", dtype_);
    }
  }
#endif
  // ATen's add, as the loops ran it before (one rounding to the dtype)
  at::Tensor result = wrap(out, 1, count, count, false);
  at::add_out(result, wrap(a, 1, count, count, false), wrap(b, 1, count, count, false));
}

std::string gemm_backend(const at::Tensor& like) {
  if (!like.device().is_cuda()) return "cpu";
#ifdef FUSEDRNN_WITH_CUDA
  c10::DeviceGuard guard(like.device());
  const CublasPlan plan = cublas_plan(like);
  return plan.aten_reason ? std::string("aten: ") + plan.aten_reason : std::string("cublas");
#else
  TORCH_CHECK(false, "fusedrnn was built without CUDA support");
#endif
}

void raw_gemm_op(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, int64_t m,
                 int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool trans_a,
                 bool trans_b, double beta) {
  for (const at::Tensor* t : {&a, &b}) {
    TORCH_CHECK(t->scalar_type() == c.scalar_type() && t->device() == c.device(),
                "_raw_gemm: a and b must have c's dtype and device");
  }
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous(),
              "_raw_gemm: the buffers must be contiguous");
  TORCH_CHECK(m >= 0 && n >= 0 && k >= 0, "_raw_gemm: negative size");
  TORCH_CHECK(extent(trans_a ? k : m, trans_a ? m : k, lda) <= a.numel() &&
                  extent(trans_b ? n : k, trans_b ? k : n, ldb) <= b.numel() &&
                  extent(m, n, ldc) <= c.numel(),
              "_raw_gemm: a matrix does not fit its buffer");
  c10::DeviceGuard guard(c.device());
  const StepDevice dev(c);
  dev.gemm(m, n, k, a.const_data_ptr(), lda, trans_a, b.const_data_ptr(), ldb, trans_b,
           c.data_ptr(), ldc, static_cast<float>(beta));
}

}  // namespace driver
}  // namespace fusedrnn
