// Which CPU instruction set the library's vectorised kernels use, chosen once, when first asked
// (the Python package asks at import): the best one that both this build and the CPU have, or a
// lower one forced with FUSEDRNN_CPU_ISA=baseline|avx2|avx512|avx512_bf16. avx512_bf16 is the
// AVX-512 kernels with the bf16 steps on AVX512_BF16's dot products; avx512 runs bf16 steps on
// float panels. Asking for one the CPU lacks is an
// error (raised to Python as ValueError at import), never an illegal instruction.
#pragma once

#include <string>

#include "fused_isa.h"

namespace fusedrnn {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAVX2 = 1, kAVX512 = 2, kAVX512BF16 = 3 };

const char* isa_name(Isa isa);

// The best ISA this build has kernels for and this CPU (and its OS) supports.
Isa best_isa();

// The ISA in use (FUSEDRNN_CPU_ISA, else best_isa()); throws when FUSEDRNN_CPU_ISA is invalid.
Isa current_isa();

// Switches the ISA in use (tests run the fused paths under each); throws for an ISA above
// best_isa() or an unknown name. Returns the previous one's name.
std::string set_isa(const std::string& name);

// Whether the CPU is Intel's (cpuid vendor "GenuineIntel"): where MKL's sgemm, behind at::mm,
// is the faster fp32 GEMM (execution/gemm.cpp).
bool cpu_is_intel();

// Whether the CPU has AMX with bf16 (AMX-TILE and AMX-BF16) and oneDNN may use it: not capped
// below it by ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA).
bool onednn_bf16_amx();

// Whether bf16 layer calls run the fused tiles (else a GEMM per step through ATen). "auto" (the
// default; FUSEDRNN_CPU_BF16_TILES=auto|on|off): on unless oneDNN's bf16 GEMMs run on AMX
// (onednn_bf16_amx()), where the GEMM per step through ATen measured 2-4x faster than the
// AVX-512 tiles (docs/performance.md); the library has no AMX tiles of its own yet.
bool bf16_tiles();

// Switches that choice ("auto", "on", "off"; the tests force the tiles); returns the previous
// mode.
std::string set_bf16_tiles(const std::string& mode);

// The fused step kernels of the ISA in use, or nullptr (baseline: GEMM + step kernel).
const FusedStepKernels* fused_kernels();

}  // namespace cpu
}  // namespace fusedrnn
