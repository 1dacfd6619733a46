// The AVX-512 vector type of the fused CPU steps (AVX512F + BW, VL, DQ: 16 floats per vector,
// 32 vector registers), shared by the units compiled for AVX-512 (unit_avx512.h) and for
// AVX-512 with the bf16 dot products (unit_avx512_bf16.h), which each derive their `Vec` from it.
#pragma once

#ifndef FUSEDRNN_ISA_NAMESPACE
#error "vec_avx512.h is included by the per-ISA translation units only"
#endif

namespace fusedrnn {
namespace cpu {
namespace FUSEDRNN_ISA_NAMESPACE {

struct Avx512Vec {
  static constexpr int kRegisters = 32;
  static constexpr int kLanes = 16;
  // Tile heights: rows x vectors accumulators of the 32 registers (24 for both shapes), in one
  // pass.
  static constexpr int kRows4 = 6;
  static constexpr int kRows3 = 8;
  static constexpr int kPass4 = 4;
  static constexpr int kPass3 = 3;
  using Reg = __m512;
  using Mask = __mmask16;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  // The sum of the lanes, in-register: swap halves, quarters, pairs, lanes. The zero-masked
  // forms, because gcc 12 warns on the undefined operands of the unmasked shuffles,
  // _mm512_reduce_add_ps and the 512 -> 256 casts.
  static float sum(Reg v) {
    v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, 0xB1));
    v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xFFFF, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xFFFF, v, 0xB1));
    return _mm512_cvtss_f32(v);
  }
  // lanes [0, count) of a vector, 0 <= count <= 16
  static Mask first_lanes(int64_t count) {
    return static_cast<Mask>((count >= 16 ? 0xFFFFu : (1u << count) - 1u));
  }
  static Reg load_masked(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store_masked(float* p, Mask m, Reg v) { _mm512_mask_storeu_ps(p, m, v); }
  // 16 bf16 (their bits) widened to floats: the bits are the high half of the float's.
  static Reg load_bf16(const uint16_t* p) {
    const __m512i w =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  // 16 floats rounded to bf16 as c10::BFloat16 rounds (to nearest even; a NaN to 0x7FC0).
  static void store_bf16(uint16_t* p, Reg v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  // The element-wise operations of the lane-wise cell math (lane_math.h). min / max return
  // their second operand where either is NaN (so min(bound, x) keeps a NaN x); scale2(p, n) is
  // p * 2^n for integral n.
  static constexpr bool kLaneMath = true;
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg min(Reg a, Reg b) { return _mm512_min_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  static Reg abs(Reg a) { return _mm512_abs_ps(a); }
  static Reg round(Reg a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static Reg scale2(Reg p, Reg n) { return _mm512_scalef_ps(p, n); }
  static Reg div(Reg a, Reg b) { return _mm512_div_ps(a, b); }
  // |mag| with the sign of `sign` (mag >= 0)
  static Reg with_sign(Reg mag, Reg sign) {
    return _mm512_or_ps(mag, _mm512_and_ps(sign, set1(-0.0f)));
  }
  // a < b ? x : y per lane (false where a or b is NaN)
  static Reg select_lt(Reg a, Reg b, Reg x, Reg y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
  }
  // r[i] lane j <- r[j] lane i (a 16 x 16 block): interleave pairs of rows, then 2 x 2 blocks
  // within the 128-bit lanes, then the 128-bit lanes across rows 0-7 and 8-15 (zero-masked
  // forms: see sum()).
  static void transpose(Reg (&r)[16]) {
    constexpr Mask all = 0xFFFF;
    Reg t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_maskz_unpacklo_ps(all, r[i], r[i + 1]);      // a0 b0 a1 b1 per lane
      t[i + 1] = _mm512_maskz_unpackhi_ps(all, r[i], r[i + 1]);  // a2 b2 a3 b3
    }
    for (int i = 0; i < 16; i += 4) {
      u[i] = _mm512_maskz_shuffle_ps(all, t[i], t[i + 2], 0x44);      // a0 b0 c0 d0
      u[i + 1] = _mm512_maskz_shuffle_ps(all, t[i], t[i + 2], 0xEE);  // a1 b1 c1 d1
      u[i + 2] = _mm512_maskz_shuffle_ps(all, t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm512_maskz_shuffle_ps(all, t[i + 1], t[i + 3], 0xEE);
    }
    // u[4q + c], c < 4: rows 4q..4q+3 of columns c, c + 4, c + 8, c + 12 (one per 128-bit lane)
    for (int c = 0; c < 4; ++c) {
      const Reg lo02 = _mm512_maskz_shuffle_f32x4(all, u[c], u[4 + c], 0x88);  // cols c, c+8
      const Reg lo13 = _mm512_maskz_shuffle_f32x4(all, u[c], u[4 + c], 0xDD);  // c+4, c+12
      const Reg hi02 = _mm512_maskz_shuffle_f32x4(all, u[8 + c], u[12 + c], 0x88);
      const Reg hi13 = _mm512_maskz_shuffle_f32x4(all, u[8 + c], u[12 + c], 0xDD);
      r[c] = _mm512_maskz_shuffle_f32x4(all, lo02, hi02, 0x88);
      r[c + 8] = _mm512_maskz_shuffle_f32x4(all, lo02, hi02, 0xDD);
      r[c + 4] = _mm512_maskz_shuffle_f32x4(all, lo13, hi13, 0x88);
      r[c + 12] = _mm512_maskz_shuffle_f32x4(all, lo13, hi13, 0xDD);
    }
  }
};

}  // namespace FUSEDRNN_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fusedrnn
