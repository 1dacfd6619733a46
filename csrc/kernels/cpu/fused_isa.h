// The boundary between the portable driver and the per-ISA fused step kernels: plain structs of
// pointers and sizes, and one table of entry points per instruction set. Nothing here includes
// ATen (c10's BFloat16 type only), so that the per-ISA translation units (kernels/cpu/isa/*.cpp),
// compiled with AVX2 or AVX-512 target flags, instantiate no inline code of torch's headers (see
// cells/common.h on why per-ISA inline code must not share symbol names with portable code).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/kernels.h"

namespace fusedrnn {
namespace cpu {

// One operand of a fused step's GEMM: rows of `a` (row stride lda, elements of the step's type:
// float or c10::BFloat16) times a weight packed into panels (see PackedWeight in fused_step.h);
// `panels` points at panel 0, each panel is K * nv * lanes 32-bit elements: floats, or for the
// bf16 dot-product kernels pairs of bf16 (rows 2k and 2k + 1 of B, FusedStepKernels::bf16_pairs),
// K = ceil(ka / 2). ka: the columns of `a` (= K for float panels).
struct PanelOperand {
  const void* a = nullptr;
  int64_t lda = 0;
  const float* panels = nullptr;
  int64_t K = 0;
  int64_t ka = 0;
};

// The GEMM of one fused step: out = the sum over the operands of a @ B, for `rows` rows. Every
// operand is packed in the same layout: `units` output units, `gates` gate blocks (1: a plain
// matrix of `units` columns), `nv` vectors of `lanes` columns per panel row, `unit_block` units
// per panel, `col_stride` the output column distance of consecutive vectors, `pass_vectors` the
// vectors per pass of the kernels (the panel holds each pass's vectors as a K-row block);
// `pairs`: the panels hold bf16 pairs.
struct PanelGemm {
  PanelOperand src[2];
  int nsrc = 0;
  int64_t rows = 0;
  int64_t units = 0, gates = 0, nv = 0, lanes = 0, unit_block = 0, col_stride = 0;
  int64_t pass_vectors = 0;
  bool pairs = false;
  int64_t panels() const { return (units + unit_block - 1) / unit_block; }
};

// A GEMM of m <= kSmallGemmRows rows against a row-major weight W (n x k, row stride ldw), as
// kernels/cpu/isa/small_gemm.h computes it: nt: out (m x n) = [out +] a (m x k) W^T; nn: out (m x
// k) = [out +] a (m x n) W; tn (a rank-m update): out (n x k) = [out +] a^T W, a (m x n), W (m x
// k). Row strides lda, ldo; unit column strides everywhere. T: the elements of a, W and out,
// float or c10::BFloat16 (accumulated in float, rounded once into out).
constexpr int64_t kSmallGemmRows = 4;
// The rank update (tn) takes up to this many rows in one pass (the others: kSmallGemmRows).
constexpr int64_t kSmallRankRows = 32;

template <typename T>
struct SmallGemmOf {
  int64_t m = 0, n = 0, k = 0;
  const T* a = nullptr;
  int64_t lda = 0;
  const T* w = nullptr;
  int64_t ldw = 0;
  T* out = nullptr;
  int64_t ldo = 0;
  bool accumulate = false;
};
using SmallGemm = SmallGemmOf<float>;
using SmallGemmBf16 = SmallGemmOf<c10::BFloat16>;

// The fused steps of one instruction set, for one element type T of the activations (float;
// c10::BFloat16, accumulated in float). Each entry runs panels [p0, p1) of its step's GEMM (the
// caller splits the panels between threads) and the step kernel on every output tile.
// lstm_forward: out (ld ldo) = the GEMM, then the (cell, phase) forward kernel.
// lstm_backward: out = (WM kIFG: +=) the GEMM, then the phase's backward kernel on the tile's
// rows below p.n, and on the panel's rows [g.rows, p.n) (their input is already in `out`).
// gru_forward: p.hg = the GEMM, then the GRU forward kernel.
// gru_backward: p.dh_state += the GEMM, then the GRU backward kernel (as lstm_backward).
// gemm: out (ld ldo) = (accumulate: +=) the GEMM alone, no step kernel (the layer-normalised
// steps, whose row passes need a row's whole product first).
template <typename T>
struct FusedFns {
  void (*lstm_forward)(CellKind, Phase, const LSTMForwardStep<T>&, T* out, int64_t ldo,
                       const PanelGemm&, int64_t p0, int64_t p1) = nullptr;
  void (*lstm_backward)(CellKind, Phase, const LSTMBackwardStep<T>&, T* out, int64_t ldo,
                        const PanelGemm&, int64_t p0, int64_t p1) = nullptr;
  void (*gru_forward)(const GRUForwardStep<T>&, const PanelGemm&, int64_t p0, int64_t p1) = nullptr;
  void (*gru_backward)(const GRUBackwardStep<T>&, const PanelGemm&, int64_t p0,
                       int64_t p1) = nullptr;
  void (*gemm)(const PanelGemm&, T* out, int64_t ldo, bool accumulate, int64_t p0,
               int64_t p1) = nullptr;
};

struct FusedStepKernels {
  const char* isa = nullptr;
  int64_t lanes = 0;             // floats per vector: the panel layout the kernels read
  int64_t pass3 = 0, pass4 = 0;  // vectors per GEMM pass of 3- and 4-vector panels: ditto
  // bf16 weights: packed as pairs of bf16 for the dot-product instructions (AVX512_BF16), or
  // (false) converted to float panels, the bf16 activations converted in the tiles' loads.
  bool bf16_pairs = false;
  FusedFns<float> f32;
  FusedFns<c10::BFloat16> bf16;
  // The small GEMMs (fp32): gemm_nt computes output columns [c0, c1) (the weight rows), gemm_nn
  // output columns [c0, c1) (the weight's columns); the caller splits them between threads.
  void (*gemm_nt)(const SmallGemm&, int64_t c0, int64_t c1) = nullptr;
  void (*gemm_nn)(const SmallGemm&, int64_t c0, int64_t c1) = nullptr;
  // gemm_tn computes output rows [r0, r1).
  void (*gemm_tn)(const SmallGemm&, int64_t r0, int64_t r1) = nullptr;
  // The packing of gated weights (fused_step.cpp): dst[c * ldd + r] = src[r * lds + c] for
  // rows r < `rows` (<= lanes) and columns c < `cols`, and 0 for the lanes r >= rows (32-bit
  // elements: floats, or pairs of bf16).
  void (*transpose)(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                    int64_t ldd) = nullptr;
  // The small GEMMs in bf16 (a, W and out bf16; the elements widened to floats in the loads, the
  // sums in float, each output rounded once): AVX2's table; nullptr elsewhere. (The driver takes
  // them where ATen's bf16 GEMM is its fallback loops: execution/gemm.cpp.)
  void (*gemm_nt_bf16)(const SmallGemmBf16&, int64_t c0, int64_t c1) = nullptr;
  void (*gemm_nn_bf16)(const SmallGemmBf16&, int64_t c0, int64_t c1) = nullptr;
  void (*gemm_tn_bf16)(const SmallGemmBf16&, int64_t r0, int64_t r1) = nullptr;

  template <typename T>
  const FusedFns<T>& of() const {
    if constexpr (std::is_same_v<T, float>) {
      return f32;
    } else {
      static_assert(std::is_same_v<T, c10::BFloat16>, "fused tiles: float and bf16 only");
      return bf16;
    }
  }
};

// The tables compiled into this library; nullptr where the build has no such kernels (not
// x86-64, or a compiler without the target). Calling one's entries on a CPU without the ISA
// is an illegal instruction: the caller (isa.cpp) checks the CPU first.
const FusedStepKernels* fused_kernels_avx2();
const FusedStepKernels* fused_kernels_avx512();
const FusedStepKernels* fused_kernels_avx512_bf16();

}  // namespace cpu
}  // namespace fusedrnn
