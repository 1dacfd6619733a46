// AVX2 + FMA: the fused LSTM-family backward steps (fused_tiles.h), fp32 and bf16, for the
// table of avx2_tiles.cpp.
#include "kernels/cpu/isa/unit_avx2.h"

#if FUSEDRNN_ISA_UNIT
#include "kernels/cpu/isa/fused_tiles.h"

namespace fusedrnn {
namespace cpu {
namespace avx2 {
FUSEDRNN_LSTM_BACKWARD_TILES(template, float);
FUSEDRNN_LSTM_BACKWARD_TILES(template, c10::BFloat16);
}  // namespace avx2
}  // namespace cpu
}  // namespace fusedrnn

#include "kernels/cpu/isa/isa_end.h"
#endif
