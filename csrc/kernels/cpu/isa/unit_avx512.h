// Opens a translation unit compiled for AVX-512 (AVX512F; the library selects them only on CPUs
// that also have AVX512BW, VL and DQ, see isa.cpp): 16 floats per vector, 32 vector registers
// (vec_avx512.h). Included first by every kernels/cpu/isa/avx512_*.cpp, which close it with
// isa_end.h (see unit_avx2.h).

// The tables' declarations first, compiled for the baseline like every header before the
// target switch (isa_begin.h).
#include "kernels/cpu/fused_isa.h"
#include "kernels/cpu/layer_norm_table.h"
#include "kernels/cpu/step_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDRNN_ISA_UNIT 1
#define FUSEDRNN_ISA_NAMESPACE avx512
#define FUSEDRNN_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
#include "kernels/cpu/isa/isa_begin.h"
#include "kernels/cpu/isa/vec_avx512.h"

namespace fusedrnn {
namespace cpu {
namespace avx512 {

struct Vec : Avx512Vec {
  static constexpr const char* kName = "avx512";
  static constexpr bool kBf16Dot = false;  // bf16 tiles: fp32 panels, activations converted
};
}  // namespace avx512
}  // namespace cpu
}  // namespace fusedrnn
#else
#define FUSEDRNN_ISA_UNIT 0
#endif
