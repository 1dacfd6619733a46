// The layer-normalised cells' row loops (kernels/cpu/layer_norm_rows.h) for AVX-512 (the ISA
// of isa_avx512.cpp; the avx512_bf16 ISA uses them too). A unit of its own, beside
// isa_avx512.cpp, so that changing them does not rebuild the tiles.
#include "kernels/cpu/layer_norm_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDRNN_ISA_NAMESPACE avx512
#define FUSEDRNN_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
#include "isa_begin.h"
#include "kernels/cpu/layer_norm_rows.h"
#include "isa_end.h"

const fusedrnn::cpu::LayerNormKernels* fusedrnn::cpu::layer_norm_kernels_avx512() {
  return &avx512::kLayerNormKernels;
}
#else
const fusedrnn::cpu::LayerNormKernels* fusedrnn::cpu::layer_norm_kernels_avx512() {
  return nullptr;
}
#endif
