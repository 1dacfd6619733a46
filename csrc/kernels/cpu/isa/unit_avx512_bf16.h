// Opens a translation unit compiled for AVX-512 with AVX512_BF16 (Cooper Lake, Sapphire Rapids and
// later, AMD Zen 4 and later): the AVX-512 kernels (vec_avx512.h), with the bf16 steps' GEMMs on
// the bf16 dot-product instruction (vdpbf16ps: per float lane, the sum of two bf16 products added
// to the accumulator, so a vector instruction does twice the multiply-adds of an fp32 FMA and the
// packed weights take half the memory). Selected only on CPUs that have it (isa.cpp).
// Included first by every kernels/cpu/isa/avx512_bf16_*.cpp, which close it with isa_end.h
// (see unit_avx2.h).

// The tables' declarations first, compiled for the baseline like every header before the
// target switch (isa_begin.h).
#include "kernels/cpu/fused_isa.h"
#include "kernels/cpu/layer_norm_table.h"
#include "kernels/cpu/step_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDRNN_ISA_UNIT 1
#define FUSEDRNN_ISA_NAMESPACE avx512_bf16
#define FUSEDRNN_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma"
#include "kernels/cpu/isa/isa_begin.h"
#include "kernels/cpu/isa/vec_avx512.h"

namespace fusedrnn {
namespace cpu {
namespace avx512_bf16 {

struct Vec : Avx512Vec {
  static constexpr const char* kName = "avx512_bf16";
  static constexpr bool kBf16Dot = true;
  // Two bf16 of a row (columns 2k, 2k + 1: the low, high half) in every 32-bit lane.
  using Pair = __m512i;
  static Pair broadcast_pair(const uint16_t* p) {
    uint32_t v;
    std::memcpy(&v, p, sizeof(v));
    return _mm512_set1_epi32(static_cast<int>(v));
  }
  // The row's last element with a zero partner (odd columns).
  static Pair broadcast_low(const uint16_t* p) { return _mm512_set1_epi32(*p); }
  // 16 floats rounded to bf16 by the conversion instruction: to nearest even as c10::BFloat16,
  // but a NaN keeps its sign and payload (quietened) and a denormal float or result becomes
  // zero (below 1.2e-38: far under every tolerance, docs/design.md §4). Hides Avx512Vec's.
  static void store_bf16(uint16_t* p, Reg v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
  }
  // acc + a.lo * b.lo + a.hi * b.hi in each float lane (b: a panel vector of pairs).
  static Reg dot_pairs(Reg acc, Pair a, Reg b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)_mm512_castps_si512(b));
  }
};

}  // namespace avx512_bf16
}  // namespace cpu
}  // namespace fusedrnn
#else
#define FUSEDRNN_ISA_UNIT 0
#endif
