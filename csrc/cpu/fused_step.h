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

// A weight W of shape (G * H, K) (G gate blocks of H rows, as weight_hh and weight_ch are laid
// out) packed for the fused steps: for every block of 16 units, a K x (G * 16) panel of W^T
// (columns: gate 0 units j0..j0+15, gate 1 units j0..j0+15, ...), zero-padded past H.
struct PackedWeight {
  at::Tensor data;  // (panels, K, G * 16) float
  int64_t K = 0, H = 0, G = 0;
};

// Whether this build has the AVX-512 kernels and FUSEDRNN_CPU_FUSED is not "0".
bool fused_steps_available();

// Whether the fused steps run for tensors like `t`: available, CPU and float32.
bool fused_steps_enabled(const at::Tensor& t);

// Packs w (G * H, K), G in {3, 4}.
PackedWeight pack_weight(const at::Tensor& w, int64_t G);

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
void gru_forward_fused_step(const GRUForwardStep<T>&, const T*, int64_t, const PackedWeight&) {
  TORCH_INTERNAL_ASSERT(false, "fused CPU steps are float32 only");
}

}  // namespace cpu
}  // namespace fusedrnn
