// Fused recurrent steps for the CPU (fp32, AVX-512 builds): the step's recurrent GEMM and its
// pointwise kernel in one pass. The GEMM is computed tile by tile (a few rows of the batch by
// 16 hidden units of every gate) from a weight packed once per call, and each tile's step
// elements (step_elements.h, the same code as the unfused path) run right after it, while the
// tile is still in L1. This removes the separate pointwise pass over the gate pre-activations
// and the per-step GEMM call (ATen dispatch, and oneDNN's re-packing of the weight every step).
#pragma once

#include <ATen/ATen.h>

#include "../kernels.h"

namespace fusedrnn {
namespace cpu {

// The B operand of the fused GEMMs (out = a @ B), packed once per call into panels of
// K x (NV * 16) floats, zero-padded past the last unit:
// - gated (pack_weight): B = W^T for a weight W (G * H, K) of G gate blocks, as weight_ih,
//   weight_hh and weight_ch are laid out. A panel is 16 units of every gate (vector v = gate v,
//   output columns v * H + j), so that one tile holds all the gates of its units.
// - plain (pack_plain): B (K, N) as it is; a panel is 64 consecutive output columns.
struct PackedWeight {
  at::Tensor data;  // (panels, K, NV * 16) float
  int64_t K = 0;
  int64_t H = 0;           // units: output columns per gate (gated), all columns (plain)
  int64_t G = 0;           // gates; 1 for plain
  int64_t NV = 0;          // vectors of 16 columns per panel row
  int64_t unit_block = 0;  // units per panel
  int64_t col_stride = 0;  // output column distance of consecutive vectors
};

// Whether this build has the AVX-512 kernels and FUSEDRNN_CPU_FUSED is not "0".
bool fused_steps_available();

// Whether the fused steps run for a layer call on `t` of `steps` steps and `rows` rows in all:
// available, CPU, float32, and long enough to repay packing the weights (a copy of every
// weight per call). Measured on one core: packing costs about one step at 64 rows, and the fused
// steps save ~15% of a step; at one row per step packing pays off from ~30 steps. Hence at
// least kFusedMinSteps steps and kFusedMinRows rows; shorter calls (cells: one step) run a GEMM
// per step on the plain weights.
constexpr int64_t kFusedMinSteps = 4;
constexpr int64_t kFusedMinRows = 32;
bool fused_steps_enabled(const at::Tensor& t, int64_t steps, int64_t rows);

// Packs B = w^T for w (G * H, K), G in {3, 4}.
PackedWeight pack_weight(const at::Tensor& w, int64_t G);

// Packs B (K, N) as it is.
PackedWeight pack_plain(const at::Tensor& b);

// One operand of a fused step's GEMM: rows [0, n) of `a` (row stride lda) times W^T.
struct GemmSource {
  const float* a = nullptr;
  int64_t lda = 0;
  const PackedWeight* w = nullptr;
};

// out[0:n, 0:G*H] (row stride ldo) = the sum over the sources of a @ W^T, then the step kernel
// of (cell, phase) on each tile. LSTM / peephole (kWhole) and WM kIFG: sources x_t with
// weight_ih and h_{t-1} with weight_hh (G = 4), out = p.gates, p.hg = nullptr (the tile is the
// whole pre-activation). WM kO: source c_t with weight_ch (G = 3), out = p.p. No source may be
// written by the step kernel (the h_t it writes must be another buffer than the h_{t-1} read).
void lstm_forward_fused_step(CellKind cell, Phase phase, const LSTMForwardStep<float>& p,
                             float* out, int64_t ldo, GemmSource s0, GemmSource s1 = {});

// LSTM-family backward step phase: out[0:gemm_rows] (row stride ldo) = src.a @ B, then the
// phase's backward kernel on each tile's rows below p.n, and on rows [gemm_rows, p.n) after (whose
// input is already in place in out). LSTM / peephole (kWhole) and WM kO: B = weight_hh packed
// plain, src.a = the next processed step's gradients of the gate pre-activations, out = p.dh.
// WM kIFG: out = p.dc_state (+= instead of =), B = weight_ch packed plain, src.a = the
// gradients of the cell-connection pre-activations (next step's i, f; this step's o).
void lstm_backward_fused_step(CellKind cell, Phase phase, const LSTMBackwardStep<float>& p,
                              float* out, int64_t ldo, GemmSource src, int64_t gemm_rows);

// GRU backward step: p.dh_state[0:gemm_rows] += src.a @ B (the next processed step's
// gradients of the h-side pre-activations times weight_hh, packed plain), then the backward
// step kernel as for the LSTM.
void gru_backward_fused_step(const GRUBackwardStep<float>& p, GemmSource src, int64_t gemm_rows);

// GRU: out = p.hg (ld p.ld_hg) = a @ weight_hh^T (G = 3), then the GRU step kernel per tile.
void gru_forward_fused_step(const GRUForwardStep<float>& p, const float* a, int64_t lda,
                            const PackedWeight& w);

// The other dtypes have no fused steps (fused_steps_enabled() is false for them); these let the
// dtype-generic recurrence loop name the calls.
template <typename T>
void lstm_forward_fused_step(CellKind, Phase, const LSTMForwardStep<T>&, T*, int64_t, GemmSource,
                             GemmSource = {}) {
  TORCH_INTERNAL_ASSERT(false, "fused CPU steps are float32 only");
}
template <typename T>
void lstm_backward_fused_step(CellKind, Phase, const LSTMBackwardStep<T>&, T*, int64_t,
                              GemmSource, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "fused CPU steps are float32 only");
}
template <typename T>
void gru_backward_fused_step(const GRUBackwardStep<T>&, GemmSource, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "fused CPU steps are float32 only");
}
template <typename T>
void gru_forward_fused_step(const GRUForwardStep<T>&, const float*, int64_t,
                            const PackedWeight&) {
  TORCH_INTERNAL_ASSERT(false, "fused CPU steps are float32 only");
}

}  // namespace cpu
}  // namespace fusedrnn
