// The layer-normalised cells' row loops (kernels/cpu/layer_norm_rows.h) for AVX2 + FMA. A unit of
// its own, beside isa_avx2.cpp, so that changing them does not rebuild the tiles.
#include "kernels/cpu/layer_norm_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDRNN_ISA_NAMESPACE avx2
#define FUSEDRNN_ISA_TARGET "avx2,fma"
#include "isa_begin.h"
#include "kernels/cpu/layer_norm_rows.h"
#include "isa_end.h"

const fusedrnn::cpu::LayerNormKernels* fusedrnn::cpu::layer_norm_kernels_avx2() {
  return &avx2::kLayerNormKernels;
}
#else
const fusedrnn::cpu::LayerNormKernels* fusedrnn::cpu::layer_norm_kernels_avx2() { return nullptr; }
#endif
