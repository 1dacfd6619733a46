// The table of an ISA's fused steps (FusedStepKernels), included by its unit <isa>_tiles.cpp
// after fused_tiles.h: the GRU steps, the GEMM-only entry, the small GEMMs and the packing are
// instantiated here, the LSTM steps in units of their own (declared below).
#pragma once

#ifndef FUSEDRNN_ISA_NAMESPACE
#error "fused_table.h is included by the per-ISA translation units only"
#endif

#include "kernels/cpu/isa/fused_tiles.h"
#include "kernels/cpu/isa/small_gemm.h"

namespace fusedrnn {
namespace cpu {
namespace FUSEDRNN_ISA_NAMESPACE {

// The transposing copy that packs the gated weights (FusedStepKernels::transpose): blocks of
// kL columns of the kL source rows through the registers (Vec::transpose), the last columns
// one by one.
void transpose_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                    int64_t ldd) {
  int64_t c = 0;
  for (; c + kL <= cols; c += kL) {
    typename Vec::Reg r[kL];
#pragma GCC unroll 16
    for (int i = 0; i < kL; ++i) r[i] = i < rows ? Vec::load(src + i * lds + c) : Vec::zero();
    Vec::transpose(r);
#pragma GCC unroll 16
    for (int i = 0; i < kL; ++i) Vec::store(dst + (c + i) * ldd, r[i]);
  }
  for (; c < cols; ++c) {
    for (int64_t i = 0; i < kL; ++i) dst[c * ldd + i] = i < rows ? src[i * lds + c] : 0.0f;
  }
}

FUSEDRNN_LSTM_FORWARD_TILES(extern template, float);
FUSEDRNN_LSTM_FORWARD_TILES(extern template, c10::BFloat16);
FUSEDRNN_LSTM_BACKWARD_TILES(extern template, float);
FUSEDRNN_LSTM_BACKWARD_TILES(extern template, c10::BFloat16);

template <typename T>
constexpr FusedFns<T> fused_fns() {
  FusedFns<T> f;
  f.lstm_forward = &lstm_forward<T>;
  f.lstm_backward = &lstm_backward<T>;
  f.gru_forward = &gru_forward<T>;
  f.gru_backward = &gru_backward<T>;
  f.gemm = &panel_gemm_only<T>;
  return f;
}

// The bf16 small GEMMs (FusedStepKernels::gemm_nt_bf16 ...): AVX2 only. The driver takes them where
// ATen's bf16 GEMM is its fallback loops, i.e. where the CPU lacks the AVX-512 subsets oneDNN's
// bf16 GEMMs need, which the avx512 ISAs require (kernels/cpu/isa.cpp): they would never run.
constexpr bool kSmallGemmsBf16 = !Vec::kBf16Dot && kL == 8;
// (templates, so that the kernels are not instantiated for the other ISAs)
template <bool kOn = kSmallGemmsBf16>
constexpr auto small_gemm_nt_bf16() {
  void (*f)(const SmallGemmBf16&, int64_t, int64_t) = nullptr;
  if constexpr (kOn) f = &small_gemm_nt<c10::BFloat16>;
  return f;
}
template <bool kOn = kSmallGemmsBf16>
constexpr auto small_gemm_nn_bf16_entry() {
  void (*f)(const SmallGemmBf16&, int64_t, int64_t) = nullptr;
  if constexpr (kOn) f = &small_gemm_nn_bf16<>;
  return f;
}
template <bool kOn = kSmallGemmsBf16>
constexpr auto small_gemm_tn_bf16() {
  void (*f)(const SmallGemmBf16&, int64_t, int64_t) = nullptr;
  if constexpr (kOn) f = &small_gemm_tn<c10::BFloat16>;
  return f;
}

// Constant-initialised (no load-time code compiled for this ISA runs on other CPUs).
constexpr FusedStepKernels kKernels{Vec::kName,
                                    kL,
                                    Vec::kPass3,
                                    Vec::kPass4,
                                    /*bf16_pairs=*/Vec::kBf16Dot,
                                    fused_fns<float>(),
                                    fused_fns<c10::BFloat16>(),
                                    &small_gemm_nt<float>,
                                    &small_gemm_nn,
                                    &small_gemm_tn<float>,
                                    &transpose_rows,
                                    small_gemm_nt_bf16(),
                                    small_gemm_nn_bf16_entry(),
                                    small_gemm_tn_bf16()};

}  // namespace FUSEDRNN_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fusedrnn
