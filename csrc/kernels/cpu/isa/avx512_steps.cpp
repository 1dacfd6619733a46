// AVX-512: the unfused step kernels (kernels/cpu/step_loops.h), every dtype.
#include "kernels/cpu/isa/unit_avx512.h"

#if FUSEDRNN_ISA_UNIT
#include "kernels/cpu/step_loops.h"
#include "kernels/cpu/isa/isa_end.h"

const fusedrnn::cpu::StepKernels* fusedrnn::cpu::step_kernels_avx512() {
  return &avx512::kStepKernels;
}
#else
const fusedrnn::cpu::StepKernels* fusedrnn::cpu::step_kernels_avx512() { return nullptr; }
#endif
