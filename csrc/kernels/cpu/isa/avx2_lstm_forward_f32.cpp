// AVX2 + FMA: the fused LSTM-family forward steps (fused_tiles.h) in fp32, for the
// table of avx2_tiles.cpp.
#include "kernels/cpu/isa/unit_avx2.h"

#if FUSEDRNN_ISA_UNIT
#include "kernels/cpu/isa/fused_tiles.h"

namespace fusedrnn {
namespace cpu {
namespace avx2 {
FUSEDRNN_LSTM_FORWARD_TILES(template, float);
}  // namespace avx2
}  // namespace cpu
}  // namespace fusedrnn

#include "kernels/cpu/isa/isa_end.h"
#endif
