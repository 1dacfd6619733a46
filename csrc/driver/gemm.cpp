#include "gemm.h"

#include <cstdlib>
#include <string>

#include "../cpu/isa.h"

// ATen's oneDNN matmul (result = beta * result + alpha * mat1 @ mat2). It is exported by
// libtorch_cpu but has no installed header; declared weak so that a torch built without it
// still loads this library, which then uses at::mm. On CPUs where MKL's sgemm does not pick its
// best kernels (non-Intel x86), oneDNN is ~25% faster at the shapes of a recurrence. ATen
// refuses the call on CPUs without AVX512BW/VL/DQ (or AVX-NE-CONVERT), so it is taken only when
// the ISA in use is avx512 (cpu/isa.cpp requires exactly those): decided before calling, never by
// trying. Under FUSEDRNN_CPU_ISA=avx2 or baseline every GEMM goes through at::mm, which is how the
// test suite covers that path on AVX-512 machines too.
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
  return out.device().is_cpu() && out.numel() * k >= kOneDnnMinMacs &&
         (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) &&
         onednn_gemm_enabled();
}

}  // namespace

bool onednn_gemm_enabled() {
  static const bool available = [] {
    const char* env = std::getenv("FUSEDRNN_CPU_GEMM");
    return &at::native::mkldnn_matmul != nullptr && at::hasMKLDNN() &&
           !(env && std::string(env) == "aten");
  }();
  return available && cpu::current_isa() == cpu::Isa::kAVX512;
}

void gemm(Tensor out, const Tensor& a, const Tensor& b, float beta) {
  if (out.numel() == 0) return;
  if (a.size(1) == 0) {
    if (beta == 0.0f) out.zero_();
    return;
  }
  if (use_onednn_gemm(out, a.size(1))) {
    at::native::mkldnn_matmul(a, b, out, beta, 1.0f);
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
