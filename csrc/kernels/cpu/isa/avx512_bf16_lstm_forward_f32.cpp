// AVX-512 with AVX512_BF16: the fused LSTM-family forward steps (fused_tiles.h) in fp32, for the
// table of avx512_bf16_tiles.cpp.
#include "kernels/cpu/isa/unit_avx512_bf16.h"

#if FUSEDRNN_ISA_UNIT
#include "kernels/cpu/isa/fused_tiles.h"

namespace fusedrnn {
namespace cpu {
namespace avx512_bf16 {
FUSEDRNN_LSTM_FORWARD_TILES(template, float);
}  // namespace avx512_bf16
}  // namespace cpu
}  // namespace fusedrnn

#include "kernels/cpu/isa/isa_end.h"
#endif
