// The per-step GEMMs of CUDA calls: cublasGemmEx on ATen's cuBLAS handle (step_device.h).
// Its tests (tests/test_cuda.py) pass on an H200.
//
// cuBLAS is not linked: this library calls the cuBLAS that torch's CUDA library (libtorch_cuda)
// is linked with and has already loaded, whose handle ATen hands out. Its functions are looked
// up once, at the first CUDA call, with dlopen(RTLD_NOLOAD) + dlsym: first through
// libtorch_cuda.so (dlsym on a library's handle searches its dependencies, where that cuBLAS
// is), then by the SONAME of the headers' cuBLAS (libcublas.so.<CUBLAS_VER_MAJOR>). So the
// build needs only the headers (site-packages/nvidia/cu*/include, setup.py), never a
// libcublas.so to link, which the pip packages of cuBLAS do not ship; and no second cuBLAS can
// be loaded next to torch's. Where the functions are not found (a torch with cuBLAS linked in
// statically), the GEMMs go through ATen instead, with a warning.
//
// Precision, as ATen's own GEMMs (aten/src/ATen/cuda/CUDABlas.cpp, CublasHandlePool.cpp):
// - fp32: TF32 exactly when ATen would use it. at::cuda::getCurrentCUDABlasHandle() sets the
//   handle's math mode to CUBLAS_TF32_TENSOR_OP_MATH when float32 matmul precision is "tf32"
//   (torch.backends.cuda.matmul.allow_tf32 / fp32_precision) and no NoTF32Guard is active, else
//   CUBLAS_DEFAULT_MATH; that math mode is read here, once per call, and the compute type chosen
//   from it (CUBLAS_COMPUTE_32F_FAST_TF32, or CUBLAS_COMPUTE_32F).
// - bf16 / fp16: fp32 accumulation (CUBLAS_COMPUTE_32F), with
//   CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION unless
//   allow_bf16_reduced_precision_reduction / allow_fp16_reduced_precision_reduction allow it;
//   the handle's math mode is restored after each GEMM. The settings only ATen's GEMMs
//   implement (split-K disallowed, which needs cuBLASLt; fp16 accumulation) send the GEMMs of
//   that dtype through ATen.
// - fp64: CUBLAS_COMPUTE_64F.
// FUSEDRNN_CUDA_GEMM=aten sends every per-step GEMM through ATen (at::mm on views).
#ifdef FUSEDRNN_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cublas_v2.h>
#include <dlfcn.h>

#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

#include "step_device.h"

namespace fusedrnn {
namespace driver {
namespace {

// The functions used, with the types of their cublas_v2.h declarations (cublasGemmEx has a
// second, inline overload there; these are the exported ones).
using GemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                    int, const void*, const void*, cudaDataType, int, const void*,
                                    cudaDataType, int, const void*, void*, cudaDataType, int,
                                    cublasComputeType_t, cublasGemmAlgo_t);
using GetMathModeFn = cublasStatus_t (*)(cublasHandle_t, cublasMath_t*);
using SetMathModeFn = cublasStatus_t (*)(cublasHandle_t, cublasMath_t);
using GetPointerModeFn = cublasStatus_t (*)(cublasHandle_t, cublasPointerMode_t*);
using SetPointerModeFn = cublasStatus_t (*)(cublasHandle_t, cublasPointerMode_t);
using StatusStringFn = const char* (*)(cublasStatus_t);

// The headers declare them so: checked at compile time in unevaluated operands, which do not
// reference the symbols (this library does not link cuBLAS).
static_assert(std::is_same_v<decltype(static_cast<GemmExFn>(&cublasGemmEx)), GemmExFn>);
static_assert(std::is_same_v<decltype(&cublasGetMathMode), GetMathModeFn>);
static_assert(std::is_same_v<decltype(&cublasSetMathMode), SetMathModeFn>);
static_assert(std::is_same_v<decltype(&cublasGetPointerMode_v2), GetPointerModeFn>);
static_assert(std::is_same_v<decltype(&cublasSetPointerMode_v2), SetPointerModeFn>);
static_assert(std::is_same_v<decltype(&cublasGetStatusString), StatusStringFn>);

struct CublasApi {
  GemmExFn gemm_ex = nullptr;
  GetMathModeFn get_math_mode = nullptr;
  SetMathModeFn set_math_mode = nullptr;
  GetPointerModeFn get_pointer_mode = nullptr;
  SetPointerModeFn set_pointer_mode = nullptr;
  StatusStringFn status_string = nullptr;  // optional
  std::string source;                      // the library the functions were found through
  bool ok() const {
    return gemm_ex && get_math_mode && set_math_mode && get_pointer_mode && set_pointer_mode;
  }
};

template <typename Fn>
Fn lookup(void* lib, const char* name) {
  return reinterpret_cast<Fn>(dlsym(lib, name));
}

CublasApi load_api() {
  const std::string soname = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
  for (const std::string& name : {std::string("libtorch_cuda.so"), soname}) {
    // RTLD_NOLOAD: only a library already loaded (by torch); never a second copy
    void* lib = dlopen(name.c_str(), RTLD_NOLOAD | RTLD_LAZY);
    if (lib == nullptr) continue;
    CublasApi api;
    api.gemm_ex = lookup<GemmExFn>(lib, "cublasGemmEx");
    api.get_math_mode = lookup<GetMathModeFn>(lib, "cublasGetMathMode");
    api.set_math_mode = lookup<SetMathModeFn>(lib, "cublasSetMathMode");
    api.get_pointer_mode = lookup<GetPointerModeFn>(lib, "cublasGetPointerMode_v2");
    api.set_pointer_mode = lookup<SetPointerModeFn>(lib, "cublasSetPointerMode_v2");
    api.status_string = lookup<StatusStringFn>(lib, "cublasGetStatusString");
    api.source = name;
    if (api.ok()) return api;
  }
  return {};
}

// Looked up once, after ATen has made a handle (so its cuBLAS is loaded).
const CublasApi& api() {
  static const CublasApi instance = load_api();
  return instance;
}

void check(cublasStatus_t status, const char* call) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  const char* text = api().status_string ? api().status_string(status) : nullptr;
  TORCH_CHECK(false, "fusedrnn: ", call, " failed: ", text ? text : "cuBLAS error", " (status ",
              static_cast<int>(status), ")");
}

// ATen's reduced-precision reduction setting of bf16 / fp16 GEMMs: a bool in older torch, a
// CuBLASReductionOption (reduced precision allowed, split-K allowed) since 2.10.
template <typename Option>
bool reduced_reduction_allowed(Option option) {
  if constexpr (std::is_same_v<Option, bool>) {
    return option;
  } else {
    return option == Option::AllowReducedPrecisionWithSplitK;
  }
}

template <typename Option>
bool split_k_disallowed(Option option) {
  if constexpr (std::is_same_v<Option, bool>) {
    return false;
  } else {
    return option == Option::DisallowReducedPrecisionDisallowSplitK;
  }
}

// at::Context::allowFP16AccumulationCuBLAS() where this torch has it.
template <typename Ctx, typename = void>
struct HasFP16Accumulation : std::false_type {};
template <typename Ctx>
struct HasFP16Accumulation<
    Ctx, std::void_t<decltype(std::declval<const Ctx&>().allowFP16AccumulationCuBLAS())>>
    : std::true_type {};

template <typename Ctx>
bool fp16_accumulation(const Ctx& ctx) {
  if constexpr (HasFP16Accumulation<Ctx>::value) {
    return ctx.allowFP16AccumulationCuBLAS();
  } else {
    return false;
  }
}

bool aten_requested() {
  const char* env = std::getenv("FUSEDRNN_CUDA_GEMM");
  return env != nullptr && std::string(env) == "aten";
}

}  // namespace

CublasPlan cublas_plan(const at::Tensor& like) {
  TORCH_CHECK(like.is_cuda() && like.device().index() == c10::cuda::current_device(),
              "fusedrnn internal error: CUDA call on device ", like.device(),
              " while the current device is ", static_cast<int>(c10::cuda::current_device()));
  CublasPlan plan;
  plan.stream = at::cuda::getCurrentCUDAStream().stream();
  static const bool env_aten = aten_requested();
  if (env_aten) {
    plan.aten_reason = "FUSEDRNN_CUDA_GEMM=aten";
    return plan;
  }
  // Sets the handle to the current stream, its workspace, and its math mode to ATen's TF32
  // setting.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const CublasApi& f = api();
  if (!f.ok()) {
    TORCH_WARN_ONCE(
        "fusedrnn: the cuBLAS functions were not found in the libraries torch loaded "
        "(libtorch_cuda.so, libcublas.so.",
        CUBLAS_VER_MAJOR, "); the per-step GEMMs of CUDA calls go through ATen");
    plan.aten_reason = "cuBLAS not found in the process";
    return plan;
  }
  plan.handle = handle;
  const at::Context& ctx = at::globalContext();
  switch (like.scalar_type()) {
    case at::kFloat: {
      cublasMath_t mode;
      check(f.get_math_mode(handle, &mode), "cublasGetMathMode");
      const bool tf32 = (static_cast<int>(mode) & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH;
      plan.data_type = CUDA_R_32F;
      plan.compute_type = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
      break;
    }
    case at::kDouble:
      plan.data_type = CUDA_R_64F;
      plan.compute_type = CUBLAS_COMPUTE_64F;
      plan.double_scalars = true;
      break;
    case at::kBFloat16:
    case at::kHalf: {
      const bool bf16 = like.scalar_type() == at::kBFloat16;
      bool allowed = false;
      if (bf16) {
        const auto option = ctx.allowBF16ReductionCuBLAS();
        if (split_k_disallowed(option)) {
          plan.aten_reason = "allow_bf16_reduced_precision_reduction disallows split-K";
          return plan;
        }
        allowed = reduced_reduction_allowed(option);
      } else {
        const auto option = ctx.allowFP16ReductionCuBLAS();
        if (split_k_disallowed(option)) {
          plan.aten_reason = "allow_fp16_reduced_precision_reduction disallows split-K";
          return plan;
        }
        if (fp16_accumulation(ctx)) {
          plan.aten_reason = "allow_fp16_accumulation";
          return plan;
        }
        allowed = reduced_reduction_allowed(option);
      }
      plan.data_type = bf16 ? CUDA_R_16BF : CUDA_R_16F;
      plan.compute_type = CUBLAS_COMPUTE_32F;
      plan.set_math_mode = true;
      plan.math_mode =
          allowed ? CUBLAS_DEFAULT_MATH
                  : (CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
      break;
    }
    default:
      TORCH_CHECK(false, "fusedrnn internal error: no cuBLAS GEMM for dtype ", like.scalar_type());
  }
  return plan;
}

// The row-major GEMM as the column-major call of col_major_gemm (step_device.h), whose mapping
// the CPU tests run through a reference GEMM (FUSEDRNN_CPU_STEP_GEMM=cublas_reference).
void cublas_gemm(const CublasPlan& plan, int64_t m, int64_t n, int64_t k, const void* a,
                 int64_t lda, bool trans_a, const void* b, int64_t ldb, bool trans_b, void* c,
                 int64_t ldc, float beta) {
  TORCH_CHECK(plan.handle != nullptr && plan.aten_reason == nullptr,
              "fusedrnn internal error: cuBLAS GEMM without a cuBLAS plan");
  const CublasApi& f = api();
  const auto handle = static_cast<cublasHandle_t>(plan.handle);
  const float alpha_f = 1.0f, beta_f = beta;
  const double alpha_d = 1.0, beta_d = beta;
  const void* alpha_p = plan.double_scalars ? static_cast<const void*>(&alpha_d) : &alpha_f;
  const void* beta_p = plan.double_scalars ? static_cast<const void*>(&beta_d) : &beta_f;

  // The handle is ATen's: whatever is changed for this GEMM is put back before returning.
  cublasPointerMode_t pointer_mode;
  check(f.get_pointer_mode(handle, &pointer_mode), "cublasGetPointerMode");
  const bool restore_pointer_mode = pointer_mode != CUBLAS_POINTER_MODE_HOST;
  if (restore_pointer_mode) {
    check(f.set_pointer_mode(handle, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  }
  cublasMath_t math_mode = CUBLAS_DEFAULT_MATH;
  bool restore_math_mode = false;
  if (plan.set_math_mode) {
    check(f.get_math_mode(handle, &math_mode), "cublasGetMathMode");
    if (static_cast<int>(math_mode) != plan.math_mode) {
      check(f.set_math_mode(handle, static_cast<cublasMath_t>(plan.math_mode)),
            "cublasSetMathMode");
      restore_math_mode = true;
    }
  }
  const ColMajorGemm g = col_major_gemm(m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc);
  const auto type = static_cast<cudaDataType>(plan.data_type);
  const cublasStatus_t status =
      f.gemm_ex(handle, g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(g.m), static_cast<int>(g.n),
                static_cast<int>(g.k), alpha_p, g.a, type, static_cast<int>(g.lda), g.b, type,
                static_cast<int>(g.ldb), beta_p, g.c, type, static_cast<int>(g.ldc),
                static_cast<cublasComputeType_t>(plan.compute_type), CUBLAS_GEMM_DEFAULT);
  if (restore_math_mode) check(f.set_math_mode(handle, math_mode), "cublasSetMathMode");
  if (restore_pointer_mode) check(f.set_pointer_mode(handle, pointer_mode), "cublasSetPointerMode");
  if (status != CUBLAS_STATUS_SUCCESS) {
    const char* text = f.status_string ? f.status_string(status) : nullptr;
    TORCH_CHECK(false, "fusedrnn: cublasGemmEx (row-major ", m, " x ", n, " x ", k, ", trans_a ",
                trans_a, ", trans_b ", trans_b, ", lda ", lda, ", ldb ", ldb, ", ldc ", ldc,
                ") failed: ", text ? text : "cuBLAS error", " (status ", static_cast<int>(status),
                ")");
  }
}

}  // namespace driver
}  // namespace fusedrnn

#endif  // FUSEDRNN_WITH_CUDA
