// Which CPU instruction set the library's vectorised kernels use, chosen once, when first asked
// (the Python package asks at import): the best one that both this build and the CPU have, or a
// lower one forced with FUSEDRNN_CPU_ISA=baseline|avx2|avx512. Asking for one the CPU lacks is an
// error (raised to Python as ValueError at import), never an illegal instruction.
#pragma once

#include <string>

#include "fused_isa.h"

namespace fusedrnn {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAVX2 = 1, kAVX512 = 2 };

const char* isa_name(Isa isa);

// The best ISA this build has kernels for and this CPU (and its OS) supports.
Isa best_isa();

// The ISA in use (FUSEDRNN_CPU_ISA, else best_isa()); throws when FUSEDRNN_CPU_ISA is invalid.
Isa current_isa();

// Switches the ISA in use (tests run the fused paths under each); throws for an ISA above
// best_isa() or an unknown name. Returns the previous one's name.
std::string set_isa(const std::string& name);

// The fused step kernels of the ISA in use, or nullptr (baseline: GEMM + step kernel).
const FusedStepKernels* fused_kernels();

}  // namespace cpu
}  // namespace fusedrnn
