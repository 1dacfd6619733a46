// Opens a translation unit compiled for AVX2 + FMA (8 floats per vector, 16 vector registers):
// the target and the namespace `avx2` (isa_begin.h), then the ISA's vector type `Vec` of the
// fused tiles. Included first by every kernels/cpu/isa/avx2_*.cpp, which close it with
// isa_end.h; FUSEDRNN_ISA_UNIT is 0 where the compiler has no such target (not x86-64, not
// gcc or clang), and the unit then defines its getters as nullptr.

// The tables' declarations first, compiled for the baseline like every header before the
// target switch (isa_begin.h).
#include "kernels/cpu/fused_isa.h"
#include "kernels/cpu/layer_norm_table.h"
#include "kernels/cpu/step_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDRNN_ISA_UNIT 1
#define FUSEDRNN_ISA_NAMESPACE avx2
#define FUSEDRNN_ISA_TARGET "avx2,fma"
#include "kernels/cpu/isa/isa_begin.h"

namespace fusedrnn {
namespace cpu {
namespace avx2 {

struct Vec {
  static constexpr const char* kName = "avx2";
  static constexpr int kRegisters = 16;
  static constexpr int kLanes = 8;
  // No lane math (lane_math.h): the cells run through the compiler's vectorisation.
  static constexpr bool kLaneMath = false;
  // 4-vector tiles: 5 rows in passes of 2 vectors (5 x 2 accumulators, 2 b vectors and a
  // broadcast in the 16 registers; with 6 rows gcc spills an accumulator in the inner loop).
  // 3-vector tiles: 4 rows in one pass (12 accumulators, 3 b vectors and a broadcast).
  static constexpr int kRows4 = 5;
  static constexpr int kRows3 = 4;
  static constexpr int kPass4 = 2;
  static constexpr int kPass3 = 3;
  using Reg = __m256;
  using Mask = __m256i;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static float sum(Reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // lanes [0, count) of a vector, 0 <= count <= 8: lane l is set when l < count
  static Mask first_lanes(int64_t count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Reg load_masked(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void store_masked(float* p, Mask m, Reg v) { _mm256_maskstore_ps(p, m, v); }
  // bf16 tiles: fp32 panels, the activations converted in the tiles' loads and stores.
  static constexpr bool kBf16Dot = false;
  // 8 bf16 (their bits) widened to floats: the bits are the high half of the float's.
  static Reg load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  // 16 bf16 as two vectors of floats, the even-indexed elements and the odd-indexed ones (each
  // 32-bit lane holds a pair: the even element's bits in its low half, the odd one's in its high
  // half, which is that float): two instructions for 16 elements where load_bf16 takes two for
  // 8. For sums over the elements whose other factor is split alike (a dot product), or results
  // kept in that order (the bf16 small GEMMs, small_gemm.h).
  static void load_bf16_split(const uint16_t* p, Reg& even, Reg& odd) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(~0xFFFF)));
  }
  // 8 floats rounded to bf16 as c10::BFloat16 rounds (to nearest even; a NaN to 0x7FC0).
  static void store_bf16(uint16_t* p, Reg v) {
    const __m256i r = _mm256_srli_epi32(rounded_bf16(v), 16);
    // the eight 32-bit lanes' low halves: pack (within 128-bit halves), then join the halves
    const __m256i packed = _mm256_packus_epi32(r, r);
    const __m256i joined = _mm256_permute4x64_epi64(packed, 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(joined));
  }
  // The inverse of load_bf16_split: 16 floats as their even-indexed and odd-indexed elements,
  // rounded as store_bf16 rounds and stored in order (each 32-bit lane of the store is the pair:
  // the even element's bf16 shifted down, the odd one's kept in the high half), in one store.
  // A NaN takes the element-wise path, rounded to 0x7FC0 as c10::BFloat16 and store_bf16 round it
  // (the add would keep its payload, and carry one whose payload is all below bit 16 into
  // infinity): one test for the 16.
  static void store_bf16_split(uint16_t* p, Reg even, Reg odd) {
    if (_mm256_movemask_ps(_mm256_cmp_ps(even, odd, _CMP_UNORD_Q)) != 0) {
      alignas(32) float e[8], o[8];
      _mm256_store_ps(e, even);
      _mm256_store_ps(o, odd);
      for (int l = 0; l < 8; ++l) {
        p[2 * l] = c10::BFloat16(e[l]).x;
        p[2 * l + 1] = c10::BFloat16(o[l]).x;
      }
      return;
    }
    const __m256i pairs = _mm256_blend_epi16(_mm256_srli_epi32(rounded_bf16_finite(even), 16),
                                             rounded_bf16_finite(odd), 0xAA);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pairs);
  }
  // Each float (not a NaN) rounded to bf16 to nearest even, the bf16 in the high half of the
  // lane (the low half is what the rounding left there): + 0x7FFF, + 1 where the bf16's lowest
  // bit (bit 16) is set (the compare's -1 subtracted).
  static __m256i rounded_bf16_finite(Reg v) {
    const __m256i u = _mm256_castps_si256(v), bit = _mm256_set1_epi32(0x10000);
    const __m256i odd_bf16 = _mm256_cmpeq_epi32(_mm256_and_si256(u, bit), bit);
    return _mm256_sub_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd_bf16);
  }
  // The same, a NaN to the quiet NaN 0x7FC0 as c10::BFloat16 rounds it.
  static __m256i rounded_bf16(Reg v) {
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded_bf16_finite(v), _mm256_set1_epi32(0x7FC00000), nan);
  }
  // r[i] lane j <- r[j] lane i (an 8 x 8 block): interleave pairs of rows, then 2 x 2 blocks
  // within the 128-bit halves, then the halves of rows 0-3 and 4-7.
  static void transpose(Reg (&r)[8]) {
    Reg t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // a0 b0 c0 d0 | a4 b4 c4 d4
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);  // a1 b1 c1 d1 | a5 ...
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      r[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
};

}  // namespace avx2
}  // namespace cpu
}  // namespace fusedrnn
#else
#define FUSEDRNN_ISA_UNIT 0
#endif
