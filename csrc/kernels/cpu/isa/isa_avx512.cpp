// The fused CPU steps for AVX-512 (AVX512F; the library selects them only on CPUs that also have
// AVX512BW, VL and DQ, see isa.cpp): 16 floats per vector, 32 vector registers (vec_avx512.h).
#include "kernels/cpu/fused_isa.h"
#include "kernels/cpu/step_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDRNN_ISA_NAMESPACE avx512
#define FUSEDRNN_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
#include "isa_begin.h"
#include "vec_avx512.h"

namespace fusedrnn {
namespace cpu {
namespace avx512 {

struct Vec : Avx512Vec {
  static constexpr const char* kName = "avx512";
  static constexpr bool kBf16Dot = false;  // bf16 tiles: fp32 panels, activations converted
};
}  // namespace avx512
}  // namespace cpu
}  // namespace fusedrnn

#include "fused_tiles.h"
#include "kernels/cpu/step_loops.h"
#include "isa_end.h"

const fusedrnn::cpu::FusedStepKernels* fusedrnn::cpu::fused_kernels_avx512() {
  return &avx512::kKernels;
}
const fusedrnn::cpu::StepKernels* fusedrnn::cpu::step_kernels_avx512() {
  return &avx512::kStepKernels;
}
#else
const fusedrnn::cpu::FusedStepKernels* fusedrnn::cpu::fused_kernels_avx512() { return nullptr; }
const fusedrnn::cpu::StepKernels* fusedrnn::cpu::step_kernels_avx512() { return nullptr; }
#endif
