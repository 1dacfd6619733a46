#include "gemm.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "kernels/cpu/fused_isa.h"
#include "kernels/cpu/isa.h"

// ATen's oneDNN matmul (result = beta * result + alpha * mat1 @ mat2). It is exported by
// libtorch_cpu but has no installed header; declared weak so that a torch built without it
// still loads this library, which then uses at::mm. On CPUs where MKL's sgemm does not pick its
// best kernels (non-Intel x86), oneDNN is ~25% faster at the shapes of a recurrence. ATen
// refuses the call on CPUs without AVX512BW/VL/DQ (or AVX-NE-CONVERT), so it is taken only when
// the ISA in use is avx512 (kernels/cpu/isa.cpp requires exactly those): decided before calling,
// never by trying. Under FUSEDRNN_CPU_ISA=avx2 or baseline every GEMM goes through at::mm, which is
// how the test suite covers that path on AVX-512 machines too.
namespace at::native {
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2,
                                         const at::Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace fusedrnn {
namespace driver {
namespace {

constexpr size_t kMaxSegmentGemms = 8;

// oneDNN's matmul costs ~20 us per call on top of the arithmetic (descriptor and primitive
// cache look-ups), MKL's ~2 us: the small per-step GEMMs of short hidden sizes and batches go to
// at::mm, the large ones (input projection, weight gradients, big steps) to oneDNN.
constexpr int64_t kOneDnnMinMacs = int64_t{1} << 22;

bool use_onednn_gemm(const Tensor& out, int64_t k) {
  if (!out.device().is_cpu() || out.numel() * k < kOneDnnMinMacs) return false;
  if (out.scalar_type() == at::kFloat) return onednn_fp32_gemm();
  return out.scalar_type() == at::kBFloat16 && onednn_gemm_enabled();
}

// FUSEDRNN_CPU_GEMM: unset or "auto", "aten" (never oneDNN), "onednn" (fp32 too on Intel CPUs).
enum class GemmMode { kAuto, kAten, kOneDnn };

GemmMode gemm_mode() {
  static const GemmMode mode = [] {
    const char* env = std::getenv("FUSEDRNN_CPU_GEMM");
    const std::string v = env ? env : "";
    if (v.empty() || v == "auto") return GemmMode::kAuto;
    if (v == "aten") return GemmMode::kAten;
    if (v == "onednn") return GemmMode::kOneDnn;
    TORCH_CHECK(false, "fusedrnn: FUSEDRNN_CPU_GEMM must be auto, aten or onednn, got '", v, "'");
    return GemmMode::kAuto;  // (not reached)
  }();
  return mode;
}

// Without oneDNN's bf16 GEMMs (a CPU without AVX512BW/VL/DQ, AVX-NE-CONVERT or AMX, or oneDNN
// capped below them), ATen's bf16 at::mm falls back to loops that are slow in most layouts: on a
// Zen 4 core with torch held to AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), a
// (6400 x 1024) @ (1024 x 256) bf16 product took 1.4 s, and 49 ms with both operands converted
// to fp32 and the result back. Those loops accumulate in fp32 and round once, as the fp32
// route does. ATen's own check (the mkldnn::_is_mkldnn_bf16_supported op), made once.
bool aten_bf16_gemm_is_fallback() {
  static const bool aten_bf16_onednn = [] {
    // (absent from a torch built without oneDNN, whose bf16 at::mm is the loops)
    const auto op =
        c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    return op.has_value() && op->typed<bool()>().call();
  }();
  return !aten_bf16_onednn;
}

// Whether bf16 GEMMs of a few rows take the ISA's bf16 small GEMMs (where it has them, AVX2's):
// where ATen's bf16 GEMM is its fallback loops, or where the tests force them (the op
// _set_bf16_small_gemms), so that CPUs whose ATen has oneDNN's check them against the reference
// too.
std::atomic<bool> bf16_small_gemms_forced{false};

bool bf16_small_gemms() { return bf16_small_gemms_forced.load() || aten_bf16_gemm_is_fallback(); }

// fp32 CPU GEMMs of at most kSmallGemmRows rows against a row-major weight (b = W^T or b = W)
// go to the ISA's small GEMMs (kernels/cpu/isa/small_gemm.h): they stream the weight once, at up to
// twice the rate of at::mm's M = 1..4 calls (docs/cpu_kernels.md), with no call overhead to speak
// of. Work per thread: at least this many multiply-adds.
constexpr int64_t kSmallGemmGrainMacs = int64_t{1} << 15;

// A rank-k update of k <= kSmallRankMaxRows, out (m x n) = [out +] a b with a = g^T (g (k x m)
// row-major) and b (k x n) row-major: the weight gradients of a step of a few rows, or of a short
// call's few rows in all (dgates^T x), as one pass that writes out once (faster than at::mm's
// small-K GEMM: scripts/small_gemm_rate.py, docs/cpu_kernels.md). The kernel takes up to
// kSmallRankRows (32) rows; from about 16 at::mm was as fast in fp32 (at 24-32 faster: a
// (2048 x 512) result, one Zen 1 thread), so that more rows stay its. Measured under avx2 only:
// the AVX-512 ISAs give it at most kSmallGemmRows rows (the steps' rank updates) until it is
// measured against oneDNN / MKL there.
constexpr int64_t kSmallRankMaxRows = 16;
static_assert(kSmallRankMaxRows <= cpu::kSmallRankRows,
              "the rank update's kernel takes fewer rows");

// T: float, or bf16 where the bf16 small GEMMs are taken (bf16_small_gemms), whose rank update
// writes the bf16 result directly: a bf16 cell's backward went through an fp32 at::mm of the
// whole weight's shape and its conversion.
template <typename T>
bool small_rank_update(Tensor& out, const Tensor& a, const Tensor& b, float beta) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const int64_t max_rows =
      cpu::current_isa() == cpu::Isa::kAVX2 ? kSmallRankMaxRows : cpu::kSmallGemmRows;
  if (!(k >= 1 && k <= max_rows && (a.stride(0) == 1 || m == 1) && (b.stride(1) == 1 || n == 1) &&
        (out.stride(1) == 1 || n == 1))) {
    return false;
  }
  const cpu::FusedStepKernels* kernels = cpu::fused_kernels();
  if (kernels == nullptr) return false;
  void (*tn)(const cpu::SmallGemmOf<T>&, int64_t, int64_t) = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    tn = kernels->gemm_tn;
  } else {
    tn = kernels->gemm_tn_bf16;
  }
  if (tn == nullptr) return false;
  cpu::SmallGemmOf<T> g;
  g.m = k;
  g.n = m;
  g.k = n;
  g.a = a.const_data_ptr<T>();
  g.lda = a.stride(1);
  g.w = b.const_data_ptr<T>();
  g.ldw = b.stride(0);
  g.out = out.data_ptr<T>();
  g.ldo = out.stride(0);
  g.accumulate = beta != 0.0f;
  const int64_t grain = std::max<int64_t>(1, kSmallGemmGrainMacs / std::max<int64_t>(1, k * n));
  at::parallel_for(0, m, grain, [&](int64_t i0, int64_t i1) { tn(g, i0, i1); });
  return true;
}

bool small_gemm(Tensor& out, const Tensor& a, const Tensor& b, float beta) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const at::ScalarType t = out.scalar_type();
  if (!(out.device().is_cpu() && (t == at::kFloat || t == at::kBFloat16) && a.scalar_type() == t &&
        b.scalar_type() == t)) {
    return false;
  }
  const bool nt = b.stride(0) == 1 && b.stride(1) >= k;         // b = W^T, W (n x k) row-major
  const bool nn = !nt && b.stride(1) == 1 && b.stride(0) >= n;  // b = W (k x n)
  const bool rows_ok = m <= (nt ? kSmallGemmMaxRowsNt : kSmallGemmMaxRowsNn) &&
                       (a.stride(1) == 1 || k == 1) && (out.stride(1) == 1 || n == 1);
  if (t == at::kBFloat16) {
    if (!bf16_small_gemms()) return false;
    if (!(rows_ok && (nt || nn))) return small_rank_update<c10::BFloat16>(out, a, b, beta);
    return small_gemm_bf16(m, n, k, a.const_data_ptr<c10::BFloat16>(), a.stride(0),
                           b.const_data_ptr<c10::BFloat16>(), nt ? b.stride(1) : b.stride(0), nt,
                           out.data_ptr<c10::BFloat16>(), out.stride(0), beta);
  }
  if (!(rows_ok && (nt || nn))) return small_rank_update<float>(out, a, b, beta);
  return small_gemm_f32(m, n, k, a.const_data_ptr<float>(), a.stride(0), b.const_data_ptr<float>(),
                        nt ? b.stride(1) : b.stride(0), nt, out.data_ptr<float>(), out.stride(0),
                        beta);
}

// Blocks of the weight that the groups of rows of a small GEMM share while it is in cache:
// nt, this many weight rows (128 KB of a 256-wide weight); nn, this many output columns (a
// weight of 1024 rows: 1 MB, the L2 of the core this was measured on). At 8 and 16 rows both
// measured as fast as the whole weight at once (H = 256), and they keep larger weights' blocks
// in L2.
constexpr int64_t kNtBlockRows = 128;
constexpr int64_t kNnBlockColumns = 256;

// The small GEMMs of m rows in T (small_gemm_f32, small_gemm_bf16): groups of kSmallGemmRows rows,
// each block of the weight multiplied by every group while it is in cache, the blocks split
// between threads. nt / nn: the ISA's kernels for T.
template <typename T, typename Nt, typename Nn>
bool small_gemm_rows(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* w,
                     int64_t ldw, bool w_transposed, T* out, int64_t ldo, float beta, Nt nt, Nn nn,
                     int64_t lanes) {
  if (m < 1 || m > (w_transposed ? kSmallGemmMaxRowsNt : kSmallGemmMaxRowsNn)) return false;
  if (nt == nullptr || nn == nullptr) return false;
  cpu::SmallGemmOf<T> g;
  g.accumulate = beta != 0.0f;
  g.w = w;
  g.ldw = ldw;
  // group q: rows [q * kSmallGemmRows, ...) of a and out
  const int64_t groups = (m + cpu::kSmallGemmRows - 1) / cpu::kSmallGemmRows;
  auto group = [&](int64_t q) {
    cpu::SmallGemmOf<T> gq = g;
    gq.m = std::min(cpu::kSmallGemmRows, m - q * cpu::kSmallGemmRows);
    gq.a = a + q * cpu::kSmallGemmRows * lda;
    gq.lda = lda;
    gq.out = out + q * cpu::kSmallGemmRows * ldo;
    gq.ldo = ldo;
    return gq;
  };
  const int64_t grain = std::max<int64_t>(1, kSmallGemmGrainMacs / std::max<int64_t>(1, m * k));
  if (w_transposed) {
    g.n = n;  // out (m x n) = a W^T, W (n x k)
    g.k = k;
    at::parallel_for(0, n, grain, [&](int64_t j0, int64_t j1) {
      for (int64_t c0 = j0; c0 < j1; c0 += kNtBlockRows) {
        const int64_t c1 = std::min(j1, c0 + kNtBlockRows);
        for (int64_t q = 0; q < groups; ++q) nt(group(q), c0, c1);
      }
    });
  } else {
    g.n = k;  // out (m x n) = a (m x k) W, W (k x n): the nn kernel's n is the sum's length
    g.k = n;
    const int64_t blocks = (n + lanes - 1) / lanes;
    at::parallel_for(0, blocks, std::max<int64_t>(1, grain / lanes), [&](int64_t b0, int64_t b1) {
      const int64_t hi = std::min(b1 * lanes, n);
      for (int64_t c0 = b0 * lanes; c0 < hi; c0 += kNnBlockColumns) {
        const int64_t c1 = std::min(hi, c0 + kNnBlockColumns);
        for (int64_t q = 0; q < groups; ++q) nn(group(q), c0, c1);
      }
    });
  }
  return true;
}

}  // namespace

bool small_gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* w,
                    int64_t ldw, bool w_transposed, float* out, int64_t ldo, float beta) {
  const cpu::FusedStepKernels* kernels = cpu::fused_kernels();
  if (kernels == nullptr) return false;
  return small_gemm_rows(m, n, k, a, lda, w, ldw, w_transposed, out, ldo, beta, kernels->gemm_nt,
                         kernels->gemm_nn, kernels->lanes);
}

bool small_gemm_bf16(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda,
                     const c10::BFloat16* w, int64_t ldw, bool w_transposed, c10::BFloat16* out,
                     int64_t ldo, float beta) {
  const cpu::FusedStepKernels* kernels = cpu::fused_kernels();
  if (kernels == nullptr || !bf16_small_gemms()) return false;
  return small_gemm_rows(m, n, k, a, lda, w, ldw, w_transposed, out, ldo, beta,
                         kernels->gemm_nt_bf16, kernels->gemm_nn_bf16, kernels->lanes);
}

bool force_bf16_small_gemms(bool force) { return bf16_small_gemms_forced.exchange(force); }

bool onednn_gemm_enabled() {
  static const bool available =
      &at::native::mkldnn_matmul != nullptr && at::hasMKLDNN() && gemm_mode() != GemmMode::kAten;
  return available && cpu::current_isa() >= cpu::Isa::kAVX512;
}

// On Intel CPUs MKL's sgemm (at::mm) is the faster fp32 GEMM at the recurrence's shapes: at T=100
// B=64 I=H=256, one thread, the LSTM's and GRU's training 2-7% and the layer-normalised layers'
// forward ~10% faster than with oneDNN's (scripts/layer_timing.py with FUSEDRNN_CPU_GEMM=onednn
// against aten, alternating, docs/cpu_kernels.md). Elsewhere MKL does not pick its best kernels
// and oneDNN is the faster one.
bool onednn_fp32_gemm() {
  if (!onednn_gemm_enabled()) return false;
  static const bool intel = cpu::cpu_is_intel();
  return gemm_mode() == GemmMode::kOneDnn || !intel;
}

// bf16 GEMMs where ATen's are its fallback loops (aten_bf16_gemm_is_fallback) run as fp32 at::mm
// on converted operands, but those of a few rows, which take the small GEMMs in bf16.
static bool bf16_gemm_via_fp32(const Tensor& out) {
  return out.scalar_type() == at::kBFloat16 && out.device().is_cpu() &&
         aten_bf16_gemm_is_fallback();
}

// An operand as oneDNN's matmul (through ATen) takes it without a copy of its own: ATen makes
// any operand that is neither dense nor the transpose of a dense matrix contiguous, which for
// the transpose of a column block of a wider buffer (D[:, j0:j1]^T, the working-memory
// backward's dp_{i,f} in its weight_ch gradient) is a transposing copy, element by element:
// 5% of that backward (bf16, T=100 B=64 H=512, perf). Copying the block's rows (dense) and
// passing their transpose is a plain row copy.
static Tensor onednn_operand(const Tensor& t) {
  if (t.is_contiguous() || t.t().is_contiguous() || t.stride(0) != 1) return t;
  return t.t().contiguous().t();
}

void gemm(Tensor out, const Tensor& a, const Tensor& b, float beta, bool small_ok) {
  if (out.numel() == 0) return;
  if (a.size(1) == 0) {
    if (beta == 0.0f) out.zero_();
    return;
  }
  if (small_ok && small_gemm(out, a, b, beta)) return;
  if (use_onednn_gemm(out, a.size(1))) {
    at::native::mkldnn_matmul(onednn_operand(a), onednn_operand(b), out, beta, 1.0f);
  } else if (bf16_gemm_via_fp32(out)) {
    Tensor acc = at::mm(a.to(at::kFloat), b.to(at::kFloat));
    if (beta != 0.0f) acc.add_(out, beta);
    out.copy_(acc);
  } else if (beta == 0.0f) {
    at::mm_out(out, a, b);
  } else {
    out.addmm_(a, b);
  }
}

void gemm_prev(Tensor out, const Tensor& grad, const std::vector<PrevSegment>& segs,
               const Tensor& seq, const Tensor& init, float beta) {
  if (segs.size() > kMaxSegmentGemms) {
    gemm(out, grad.t(), gather_prev(segs, seq, init, grad.size(0)), beta);
    return;
  }
  if (segs.empty() && beta == 0.0f) out.zero_();
  for (size_t i = 0; i < segs.size(); ++i) {
    const PrevSegment& g = segs[i];
    gemm(out, rows(grad, g.dst, g.count).t(), rows(g.from_init ? init : seq, g.src, g.count),
         i == 0 ? beta : 1.0f);
  }
}

Tensor colsum_prev(const Tensor& grad, const std::vector<PrevSegment>& segs, const Tensor& seq,
                   const Tensor& init) {
  if (segs.size() > kMaxSegmentGemms) {
    return (grad * gather_prev(segs, seq, init, grad.size(0))).sum(0);
  }
  Tensor acc = at::zeros({grad.size(1)}, grad.options());
  for (const PrevSegment& g : segs) {
    acc += (rows(grad, g.dst, g.count) * rows(g.from_init ? init : seq, g.src, g.count)).sum(0);
  }
  return acc;
}

}  // namespace driver
}  // namespace fusedrnn
