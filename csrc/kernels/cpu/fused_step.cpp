// The portable side of the fused CPU steps (fused_step.h): weight packing, and the split of a
// step's panels between threads around the ISA's kernel.
#include "fused_step.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <string>
#include <vector>

#include "isa.h"

namespace fusedrnn {
namespace cpu {

bool fused_steps_available() {
  static const bool enabled = [] {
    const char* env = std::getenv("FUSEDRNN_CPU_FUSED");
    return !(env && std::string(env) == "0");
  }();
  return enabled && fused_kernels() != nullptr;
}

const FusedStepKernels* fused_kernels_for(const at::Tensor& t, int64_t steps, int64_t rows,
                                          int64_t step_rows, bool wide_short_calls) {
  const bool long_enough =
      steps >= kFusedMinSteps || (wide_short_calls && steps >= 1 && step_rows >= kFusedOneStepRows);
  const bool dtype_ok =
      t.scalar_type() == at::kFloat || (t.scalar_type() == at::kBFloat16 && bf16_tiles());
  if (!(t.device().is_cpu() && dtype_ok && long_enough && rows >= kFusedMinRows &&
        fused_steps_available())) {
    return nullptr;
  }
  return fused_kernels();
}

namespace {

// The buffers this thread keeps for its next calls' panels (PanelBuffer).
std::vector<at::Tensor>& kept_panel_buffers() {
  thread_local std::vector<at::Tensor> kept = [] {
    std::vector<at::Tensor> v;
    v.reserve(kKeptPanelBuffers);  // give_back's push_back never allocates
    return v;
  }();
  return kept;
}

}  // namespace

PanelBuffer::PanelBuffer(int64_t numel, const at::TensorOptions& opts) {
  TORCH_INTERNAL_ASSERT(opts.device().is_cpu() && opts.dtype() == at::kFloat,
                        "PanelBuffer: float CPU panels only");
  std::vector<at::Tensor>& kept = kept_panel_buffers();
  size_t best = kept.size();  // the smallest kept buffer that fits
  for (size_t i = 0; i < kept.size(); ++i) {
    if (kept[i].numel() >= numel && (best == kept.size() || kept[i].numel() < kept[best].numel())) {
      best = i;
    }
  }
  if (best < kept.size()) {
    base_ = std::move(kept[best]);
    kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(best));
  } else {
    base_ = at::empty({numel}, opts);
  }
}

void PanelBuffer::give_back() noexcept {
  if (!base_.defined()) return;
  std::vector<at::Tensor>& kept = kept_panel_buffers();
  if (base_.numel() <= kKeptPanelFloats && kept.size() < kKeptPanelBuffers) {
    kept.push_back(std::move(base_));
  }
  base_ = at::Tensor();
}

namespace {

// The packed layout: panel pb, vector v (in the pass of vectors [first, first + width)), row k,
// lane l, at pb * K * NV * lanes + first * K * lanes + k * width * lanes + (v - first) * lanes + l,
// holds B[k][column] for the output column
// (pb * unit_block + l) + v * col_stride of the gated layout, pb * unit_block + v * lanes + l of
// the plain one; zero where that unit does not exist. `layout` sets the fields and allocates the
// panels (every element is written by the packing loops); `vector_at` is where vector v of
// panel pb starts (its row k at + k * row_stride(v)).
PackedWeight layout(int64_t K, int64_t H, int64_t G, int64_t NV, int64_t lanes, int64_t pass,
                    int64_t unit_block, int64_t col_stride, const at::TensorOptions& opts) {
  PackedWeight pw;
  pw.K = K;
  pw.H = H;
  pw.G = G;
  pw.NV = NV;
  pw.lanes = lanes;
  pw.pass_vectors = pass;
  pw.unit_block = unit_block;
  pw.col_stride = col_stride;
  pw.panels = (H + unit_block - 1) / unit_block;
  pw.data = PanelBuffer(pw.panels * K * NV * lanes, opts);
  return pw;
}

int64_t pass_first(const PackedWeight& pw, int64_t v) {
  return v / pw.pass_vectors * pw.pass_vectors;
}

int64_t row_stride(const PackedWeight& pw, int64_t v) {
  return std::min(pw.pass_vectors, pw.NV - pass_first(pw, v)) * pw.lanes;
}

float* vector_at(PackedWeight& pw, int64_t pb, int64_t v) {
  const int64_t first = pass_first(pw, v);
  return pw.data.data() + pb * pw.K * pw.NV * pw.lanes + first * pw.K * pw.lanes +
         (v - first) * pw.lanes;
}

PanelGemm panel_gemm(int64_t rows, const GemmSource* sources, int nsrc, const FusedStepKernels& k) {
  TORCH_INTERNAL_ASSERT(nsrc >= 1 && nsrc <= 2, "fused step: ", nsrc, " sources");
  const PackedWeight& w0 = *sources[0].w;
  PanelGemm g;
  g.nsrc = nsrc;
  g.rows = rows;
  g.units = w0.H;
  g.gates = w0.G;
  g.nv = w0.NV;
  g.lanes = w0.lanes;
  g.unit_block = w0.unit_block;
  g.col_stride = w0.col_stride;
  g.pass_vectors = w0.pass_vectors;
  g.pairs = w0.pairs;
  TORCH_INTERNAL_ASSERT(w0.lanes == k.lanes && w0.pass_vectors == (w0.NV == 3 ? k.pass3 : k.pass4),
                        "fused step: weight packed for other kernels than ", k.isa);
  for (int q = 0; q < nsrc; ++q) {
    const PackedWeight& w = *sources[q].w;
    TORCH_INTERNAL_ASSERT(w.NV == w0.NV && w.H == w0.H && w.G == w0.G && w.lanes == w0.lanes &&
                              w.pass_vectors == w0.pass_vectors && w.pairs == w0.pairs,
                          "fused step: operands packed in different layouts");
    g.src[q] = {sources[q].a, sources[q].lda, w.data.data(), w.K, w.ka};
  }
  return g;
}

// fn(p0, p1) over the panels of g, split between threads: at least ~64k multiply-adds per task,
// so that small steps stay on one thread.
template <typename Fn>
void for_panels(const PanelGemm& g, int64_t n, const Fn& fn) {
  int64_t macs_per_panel = 0;
  for (int q = 0; q < g.nsrc; ++q) macs_per_panel += g.rows * g.src[q].K * g.nv * g.lanes;
  macs_per_panel = std::max<int64_t>(macs_per_panel, n * g.unit_block);  // the step kernel
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, macs_per_panel));
  at::parallel_for(0, g.panels(), grain, fn);
}

// A bf16 weight as the kernels read it: converted to float, or (bf16_pairs) with every two
// consecutive elements of a row of `m` as one 32-bit element: `m` (R, C) becomes a float-typed
// (R, ceil(C / 2)) view of its bf16 pairs (a zero appended to odd rows).
at::Tensor as_pairs(const at::Tensor& m) {
  at::Tensor b = m.contiguous();
  if (b.size(1) % 2 != 0) b = at::constant_pad_nd(b, {0, 1});
  return b.view(at::kFloat);
}

at::Tensor for_kernels(const at::Tensor& w, const FusedStepKernels& kernels, bool& pairs) {
  TORCH_INTERNAL_ASSERT(
      w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
      "fused step: expected a float or bf16 matrix, got ", w.sizes());
  pairs = w.scalar_type() == at::kBFloat16 && kernels.bf16_pairs;
  return w.scalar_type() == at::kBFloat16 && !pairs ? w.to(at::kFloat) : w;
}

PackedWeight pack_gated(const at::Tensor& w, int64_t G, const FusedStepKernels& kernels) {
  TORCH_INTERNAL_ASSERT(G == 3 || G == 4, "pack_weight: G must be 3 or 4, got ", G);
  TORCH_INTERNAL_ASSERT(w.dim() == 2 && w.size(0) % G == 0 && w.scalar_type() == at::kFloat,
                        "pack_weight: expected a float (G * H, K) weight, got ", w.sizes());
  const at::Tensor wc = w.contiguous();
  const float* src = wc.data_ptr<float>();
  const int64_t H = w.size(0) / G, K = w.size(1);
  const int64_t lanes = kernels.lanes;
  PackedWeight pw =
      layout(K, H, G, G, lanes, G == 3 ? kernels.pass3 : kernels.pass4, lanes, H, w.options());
  // B = w^T: vector v of panel pb is, transposed, the `lanes` rows of w from unit pb * lanes of
  // gate v on (fewer in the last panel; the kernel zeroes the missing lanes).
  for (int64_t pb = 0; pb < pw.panels; ++pb) {
    const int64_t unit0 = pb * lanes, units = std::min(lanes, H - unit0);
    for (int64_t v = 0; v < G; ++v) {
      kernels.transpose(src + (v * H + unit0) * K, K, units, K, vector_at(pw, pb, v),
                        row_stride(pw, v));
    }
  }
  return pw;
}

PackedWeight pack_columns(const at::Tensor& b, const FusedStepKernels& kernels) {
  TORCH_INTERNAL_ASSERT(b.dim() == 2 && b.scalar_type() == at::kFloat,
                        "pack_plain: expected a float (K, N) matrix, got ", b.sizes());
  const at::Tensor bc = b.contiguous();
  const float* src = bc.data_ptr<float>();
  const int64_t K = b.size(0), N = b.size(1);
  const int64_t lanes = kernels.lanes;
  PackedWeight pw = layout(K, N, 1, 4, lanes, kernels.pass4, 4 * lanes, lanes, b.options());
  // vector v of panel pb: columns [col0, col0 + lanes) of every row of B, zero past column N
  for (int64_t pb = 0; pb < pw.panels; ++pb) {
    for (int64_t v = 0; v < 4; ++v) {
      const int64_t col0 = pb * 4 * lanes + v * lanes;
      const int64_t n = std::max<int64_t>(0, std::min(lanes, N - col0));
      float* dst = vector_at(pw, pb, v);
      const int64_t ld = row_stride(pw, v);
      for (int64_t k = 0; k < K; ++k) {
        std::copy(src + k * N + col0, src + k * N + col0 + n, dst + k * ld);
        std::fill(dst + k * ld + n, dst + k * ld + lanes, 0.0f);
      }
    }
  }
  return pw;
}

}  // namespace

PackedWeight pack_weight(const at::Tensor& w, int64_t G, const FusedStepKernels& kernels) {
  bool pairs = false;
  const at::Tensor m = for_kernels(w, kernels, pairs);
  // B = w^T, so B's rows 2k, 2k + 1 are the pairs of each row of w: w's rows as pairs are
  // transposed like floats.
  PackedWeight pw = pack_gated(pairs ? as_pairs(m) : m, G, kernels);
  pw.ka = w.size(1);
  pw.pairs = pairs;
  return pw;
}

PackedWeight pack_plain(const at::Tensor& b, const FusedStepKernels& kernels) {
  bool pairs = false;
  const at::Tensor m = for_kernels(b, kernels, pairs);
  PackedWeight pw;
  if (pairs) {
    // B's rows 2k, 2k + 1 interleaved, column by column: (K, N) -> pairs of (N, K)'s rows,
    // transposed back to (ceil(K / 2), N) 32-bit elements.
    pw = pack_columns(as_pairs(m.t()).t(), kernels);
  } else {
    pw = pack_columns(m, kernels);
  }
  pw.ka = b.size(0);
  pw.pairs = pairs;
  return pw;
}

template <typename T>
void FusedSteps::lstm_forward(CellKind cell, Phase phase, const LSTMForwardStep<T>& p, T* out,
                              int64_t ldo, GemmSource s0, GemmSource s1) const {
  if (p.n == 0) return;
  const GemmSource sources[2] = {s0, s1};
  const PanelGemm g = panel_gemm(p.n, sources, s1.w ? 2 : 1, k_);
  for_panels(g, p.n, [&](int64_t p0, int64_t p1) {
    k_.of<T>().lstm_forward(cell, phase, p, out, ldo, g, p0, p1);
  });
}

template <typename T>
void FusedSteps::lstm_backward(CellKind cell, Phase phase, const LSTMBackwardStep<T>& p, T* out,
                               int64_t ldo, GemmSource src, int64_t gemm_rows) const {
  const bool into_dc = traits(cell).two_phase && phase == Phase::kIFG;
  TORCH_INTERNAL_ASSERT(
      into_dc ? (out == p.dc_state && ldo == p.H) : (out == p.dh && ldo == p.ld_dh),
      "FusedSteps::lstm_backward: the step must read the GEMM's output");
  TORCH_INTERNAL_ASSERT(src.w->G == 1, "fused backward step: weight must be packed plain");
  const PanelGemm g = panel_gemm(gemm_rows, &src, 1, k_);
  for_panels(g, p.n, [&](int64_t p0, int64_t p1) {
    k_.of<T>().lstm_backward(cell, phase, p, out, ldo, g, p0, p1);
  });
}

template <typename T>
void FusedSteps::gru_forward(const GRUForwardStep<T>& p, const T* a, int64_t lda,
                             const PackedWeight& w) const {
  if (p.n == 0) return;
  TORCH_INTERNAL_ASSERT((p.bias_ih == nullptr) == (p.bias_hh == nullptr));
  const GemmSource source{a, lda, &w};
  const PanelGemm g = panel_gemm(p.n, &source, 1, k_);
  for_panels(g, p.n, [&](int64_t p0, int64_t p1) { k_.of<T>().gru_forward(p, g, p0, p1); });
}

template <typename T>
void FusedSteps::gru_backward(const GRUBackwardStep<T>& p, GemmSource src,
                              int64_t gemm_rows) const {
  TORCH_INTERNAL_ASSERT(src.w->G == 1, "fused backward step: weight must be packed plain");
  const PanelGemm g = panel_gemm(gemm_rows, &src, 1, k_);
  for_panels(g, p.n, [&](int64_t p0, int64_t p1) { k_.of<T>().gru_backward(p, g, p0, p1); });
}

template <typename T>
void FusedSteps::gemm(T* out, int64_t ldo, GemmSource src, int64_t rows, bool accumulate) const {
  if (rows == 0) return;
  const PanelGemm g = panel_gemm(rows, &src, 1, k_);
  for_panels(g, rows,
             [&](int64_t p0, int64_t p1) { k_.of<T>().gemm(g, out, ldo, accumulate, p0, p1); });
}

#define FUSEDRNN_INSTANTIATE(T)                                                                    \
  template void FusedSteps::lstm_forward<T>(CellKind, Phase, const LSTMForwardStep<T>&, T*,        \
                                            int64_t, GemmSource, GemmSource) const;                \
  template void FusedSteps::lstm_backward<T>(CellKind, Phase, const LSTMBackwardStep<T>&, T*,      \
                                             int64_t, GemmSource, int64_t) const;                  \
  template void FusedSteps::gru_forward<T>(const GRUForwardStep<T>&, const T*, int64_t,            \
                                           const PackedWeight&) const;                             \
  template void FusedSteps::gru_backward<T>(const GRUBackwardStep<T>&, GemmSource, int64_t) const; \
  template void FusedSteps::gemm<T>(T*, int64_t, GemmSource, int64_t, bool) const;
FUSEDRNN_INSTANTIATE(float)
FUSEDRNN_INSTANTIATE(c10::BFloat16)
#undef FUSEDRNN_INSTANTIATE

}  // namespace cpu
}  // namespace fusedrnn
