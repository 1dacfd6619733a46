// AVX2 + FMA: the unfused step kernels (kernels/cpu/step_loops.h), every dtype.
#include "kernels/cpu/isa/unit_avx2.h"

#if FUSEDRNN_ISA_UNIT
#include "kernels/cpu/step_loops.h"
#include "kernels/cpu/isa/isa_end.h"

const fusedrnn::cpu::StepKernels* fusedrnn::cpu::step_kernels_avx2() { return &avx2::kStepKernels; }
#else
const fusedrnn::cpu::StepKernels* fusedrnn::cpu::step_kernels_avx2() { return nullptr; }
#endif
