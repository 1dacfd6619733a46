// AVX2 + FMA: the table of the fused steps (fused_table.h), with the GRU steps, the GEMM-only
// entry, the small GEMMs and the packing; the LSTM steps are in avx2_lstm_forward_*.cpp and
// avx2_lstm_backward.cpp.
#include "kernels/cpu/isa/unit_avx2.h"

#if FUSEDRNN_ISA_UNIT
#include "kernels/cpu/isa/fused_table.h"
#include "kernels/cpu/isa/isa_end.h"

const fusedrnn::cpu::FusedStepKernels* fusedrnn::cpu::fused_kernels_avx2() {
  return &avx2::kKernels;
}
#else
const fusedrnn::cpu::FusedStepKernels* fusedrnn::cpu::fused_kernels_avx2() { return nullptr; }
#endif
