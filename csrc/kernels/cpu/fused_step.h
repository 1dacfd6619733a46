// Fused recurrent steps for the CPU (fp32 and bf16): the step's GEMM and its pointwise kernel in
// one tiled pass (kernels/cpu/isa/fused_tiles.h, compiled per ISA). This header is the portable
// side: weights packed once per call into the panel layout of the ISA in use, and the calls that
// split a step's panels between threads and run the ISA's kernel on each share.
#pragma once

#include <ATen/ATen.h>

#include "fused_isa.h"
#include "kernels/kernels.h"

namespace fusedrnn {
namespace cpu {

// The memory of a call's packed panels: a buffer kept by the calling thread from its earlier
// calls when one fits, else a new one; given back to the thread when the call is done. Every
// element is written by the packing before the kernels read it, so nothing carries over from
// the call before. Fresh memory costs more than the packing where the allocator has returned
// it to the system between calls (first-touch page faults: an H = 256 LSTM's two 1 MB panels
// took ~1 ms instead of ~0.1 ms in a loop of one-step calls). A thread keeps at most
// kKeptPanelBuffers buffers of at most kKeptPanelFloats floats (12 MB in all).
constexpr int64_t kKeptPanelFloats = int64_t{1} << 20;
constexpr size_t kKeptPanelBuffers = 3;

class PanelBuffer {
 public:
  PanelBuffer() = default;
  PanelBuffer(int64_t numel, const at::TensorOptions& opts);
  PanelBuffer(PanelBuffer&& other) noexcept = default;
  PanelBuffer& operator=(PanelBuffer&& other) noexcept {
    if (this != &other) {
      give_back();
      base_ = std::move(other.base_);
    }
    return *this;
  }
  PanelBuffer(const PanelBuffer&) = delete;
  PanelBuffer& operator=(const PanelBuffer&) = delete;
  ~PanelBuffer() { give_back(); }
  float* data() const { return base_.data_ptr<float>(); }

 private:
  void give_back() noexcept;
  at::Tensor base_;
};

// The B operand of the fused GEMMs (out = a @ B), packed once per call into panels of
// K x NV vectors of `lanes` floats (the ISA's vector width), zero-padded past the last unit. The
// kernels compute a tile in passes of `pass_vectors` vectors; a panel holds the vectors of each
// pass as one block of K rows, so that each pass streams contiguous memory:
// - gated (pack_weight): B = W^T for a weight W (G * H, K) of G gate blocks, as weight_ih,
//   weight_hh and weight_ch are laid out. A panel is `lanes` units of every gate (vector v =
//   gate v, output columns v * H + j), so that one tile holds all the gates of its units.
// - plain (pack_plain): B (K, N) as it is; a panel is 4 * lanes consecutive output columns.
// bf16 weights are packed for the kernels' bf16 steps (FusedStepKernels::bf16_pairs): as pairs
// of bf16 (B's rows 2k and 2k + 1 in one 32-bit element, K = ceil(ka / 2) rows of pairs), or
// converted to floats.
struct PackedWeight {
  PanelBuffer data;  // panels x (K * NV * lanes) 32-bit elements (floats or pairs of bf16)
  int64_t panels = 0;
  int64_t K = 0;
  int64_t ka = 0;            // B's rows: the columns of the rows it multiplies
  bool pairs = false;        // bf16 pairs
  int64_t H = 0;             // units: output columns per gate (gated), all columns (plain)
  int64_t G = 0;             // gates; 1 for plain
  int64_t NV = 0;            // vectors per panel row
  int64_t lanes = 0;         // floats per vector
  int64_t pass_vectors = 0;  // vectors per kernel pass
  int64_t unit_block = 0;    // units per panel
  int64_t col_stride = 0;    // output column distance of consecutive vectors
};

// Whether fp32 and bf16 steps are fused: the ISA in use has fused kernels (not baseline) and
// FUSEDRNN_CPU_FUSED is not "0".
bool fused_steps_available();

// The fused kernels for a layer call on `t` of `steps` steps, `rows` rows in all and at most
// `step_rows` a step, or nullptr: available, CPU, float32 or bfloat16, and long enough to repay
// packing the weights (a copy of every weight per call). Packing transposes through the registers
// (FusedStepKernels::transpose): an H = 256 LSTM's W_ih and W_hh (2 MB) in 70-200 us on one
// Zen 4 core (the element-by-element loop before it took 440-900 us), about a fifth of a
// 32-row step; the fused steps save ~15% of a step. Hence at least kFusedMinSteps steps and
// kFusedMinRows rows; and, where `wide_short_calls`, calls of fewer steps with at least
// kFusedOneStepRows rows a step: there the tiles' GEMM (one pass over the packed panels, no
// call into oneDNN) repays the packing within one step for the LSTM-family forward
// (`scripts/short_calls.py` with and without FUSEDRNN_CPU_FUSED=0: a 10-step LSTMCell loop at
// B = 32, H = 256, one thread, 1.16-1.22x torch.nn against 1.07x; the GRU forward and the
// backwards measured no faster or slower, and keep the steps). Other calls run a GEMM per step
// on the plain weights.
constexpr int64_t kFusedMinSteps = 4;
constexpr int64_t kFusedMinRows = 32;
constexpr int64_t kFusedOneStepRows = 32;
const FusedStepKernels* fused_kernels_for(const at::Tensor& t, int64_t steps, int64_t rows,
                                          int64_t step_rows, bool wide_short_calls);

// Packs B = w^T for w (G * H, K), G in {3, 4}, for the kernels k (float or bf16 w).
PackedWeight pack_weight(const at::Tensor& w, int64_t G, const FusedStepKernels& k);

// Packs B (K, N) as it is (float or bf16).
PackedWeight pack_plain(const at::Tensor& b, const FusedStepKernels& k);

// One operand of a fused step's GEMM: rows [0, n) of `a` (row stride lda, elements of the step's
// type) times W^T.
struct GemmSource {
  const void* a = nullptr;
  int64_t lda = 0;
  const PackedWeight* w = nullptr;
};

// The fused steps of one layer call: the kernels of one ISA, entered through these calls.
class FusedSteps {
 public:
  explicit FusedSteps(const FusedStepKernels& k) : k_(k) {}
  const FusedStepKernels& kernels() const { return k_; }

  // out[0:n, 0:G*H] (row stride ldo) = the sum over the sources of a @ W^T, then the step
  // kernel of (cell, phase) on each tile. LSTM / peephole (kWhole) and WM kIFG: sources x_t with
  // weight_ih and h_{t-1} with weight_hh (G = 4), out = p.gates, p.hg = nullptr (the tile is the
  // whole pre-activation). WM kO: source c_t with weight_ch (G = 3), out = p.p. No source may
  // be written by the step kernel (the h_t it writes must be another buffer than the h_{t-1}
  // read).
  template <typename T>
  void lstm_forward(CellKind cell, Phase phase, const LSTMForwardStep<T>& p, T* out, int64_t ldo,
                    GemmSource s0, GemmSource s1 = {}) const;

  // LSTM-family backward step phase: out[0:gemm_rows] (row stride ldo) = src.a @ B, then the
  // phase's backward kernel on each tile's rows below p.n, and on rows [gemm_rows, p.n) after
  // (whose input is already in place in out). LSTM / peephole (kWhole) and WM kO: B = weight_hh
  // packed plain, src.a = the next processed step's gradients of the gate pre-activations,
  // out = p.dh. WM kIFG: out = p.dc_state (+= instead of =), B = weight_ch packed plain,
  // src.a = the gradients of the cell-connection pre-activations (next step's i, f; this
  // step's o).
  template <typename T>
  void lstm_backward(CellKind cell, Phase phase, const LSTMBackwardStep<T>& p, T* out, int64_t ldo,
                     GemmSource src, int64_t gemm_rows) const;

  // GRU: out = p.hg (ld p.ld_hg) = a @ weight_hh^T (G = 3), then the GRU step kernel per tile.
  template <typename T>
  void gru_forward(const GRUForwardStep<T>& p, const T* a, int64_t lda,
                   const PackedWeight& w) const;

  // GRU backward step: p.dh_state[0:gemm_rows] += src.a @ B (the next processed step's
  // gradients of the h-side pre-activations times weight_hh, packed plain), then the backward
  // step kernel as for the LSTM.
  template <typename T>
  void gru_backward(const GRUBackwardStep<T>& p, GemmSource src, int64_t gemm_rows) const;

  // out[0:rows] (row stride ldo) = (accumulate: +=) src.a @ B, the GEMM alone, from B packed
  // once per call: the layer-normalised steps' per-step products (their row passes need a row's
  // whole product first), without a GEMM library's packing of the weight on every call.
  template <typename T>
  void gemm(T* out, int64_t ldo, GemmSource src, int64_t rows, bool accumulate) const;

 private:
  const FusedStepKernels& k_;
};

}  // namespace cpu
}  // namespace fusedrnn
