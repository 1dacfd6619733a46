// AVX-512: the table of the fused steps (fused_table.h), with the GRU steps, the GEMM-only
// entry, the small GEMMs and the packing; the LSTM steps are in avx512_lstm_forward_*.cpp and
// avx512_lstm_backward.cpp.
#include "kernels/cpu/isa/unit_avx512.h"

#if FUSEDRNN_ISA_UNIT
#include "kernels/cpu/isa/fused_table.h"
#include "kernels/cpu/isa/isa_end.h"

const fusedrnn::cpu::FusedStepKernels* fusedrnn::cpu::fused_kernels_avx512() {
  return &avx512::kKernels;
}
#else
const fusedrnn::cpu::FusedStepKernels* fusedrnn::cpu::fused_kernels_avx512() { return nullptr; }
#endif
