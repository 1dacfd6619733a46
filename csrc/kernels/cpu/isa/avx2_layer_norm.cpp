// AVX2 + FMA: the layer-normalised cells' row loops (kernels/cpu/layer_norm_rows.h).
#include "kernels/cpu/isa/unit_avx2.h"

#if FUSEDRNN_ISA_UNIT
#include "kernels/cpu/layer_norm_rows.h"
#include "kernels/cpu/isa/isa_end.h"

const fusedrnn::cpu::LayerNormKernels* fusedrnn::cpu::layer_norm_kernels_avx2() {
  return &avx2::kLayerNormKernels;
}
#else
const fusedrnn::cpu::LayerNormKernels* fusedrnn::cpu::layer_norm_kernels_avx2() { return nullptr; }
#endif
