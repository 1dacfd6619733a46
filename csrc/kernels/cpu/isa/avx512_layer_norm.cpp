// AVX-512: the layer-normalised cells' row loops (kernels/cpu/layer_norm_rows.h) (the avx512_bf16
// ISA uses them too).
#include "kernels/cpu/isa/unit_avx512.h"

#if FUSEDRNN_ISA_UNIT
#include "kernels/cpu/layer_norm_rows.h"
#include "kernels/cpu/isa/isa_end.h"

const fusedrnn::cpu::LayerNormKernels* fusedrnn::cpu::layer_norm_kernels_avx512() {
  return &avx512::kLayerNormKernels;
}
#else
const fusedrnn::cpu::LayerNormKernels* fusedrnn::cpu::layer_norm_kernels_avx512() {
  return nullptr;
}
#endif
