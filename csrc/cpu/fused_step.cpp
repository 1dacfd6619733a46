// The fused CPU steps of fused_step.h: an AVX-512 GEMM micro-kernel over packed weight panels
// whose every output tile is handed to the step kernel of step_elements.h right away.
#include "fused_step.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "../step_elements.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define FUSEDRNN_FUSED_STEPS 1
#else
#define FUSEDRNN_FUSED_STEPS 0
#endif

namespace fusedrnn {
namespace cpu {

constexpr int64_t kVec = 16;  // floats per AVX-512 vector

bool fused_steps_available() {
  static const bool available = [] {
    const char* env = std::getenv("FUSEDRNN_CPU_FUSED");
    return FUSEDRNN_FUSED_STEPS && !(env && std::string(env) == "0");
  }();
  return available;
}

bool fused_steps_enabled(const at::Tensor& t, int64_t steps, int64_t rows) {
  return fused_steps_available() && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
         steps >= kFusedMinSteps && rows >= kFusedMinRows;
}

namespace {

// The packed layout: panel pb, row k, vector v, lane l holds B[k][column] for the output column
// (pb * unit_block + l) + v * col_stride of the gated layout, pb * unit_block + v * 16 + l of
// the plain one; zero where that unit does not exist. `b(k, col)` reads the unpacked B.
template <typename ReadB>
PackedWeight pack(int64_t K, int64_t H, int64_t G, int64_t NV, int64_t unit_block,
                  int64_t col_stride, const at::TensorOptions& opts, const ReadB& b) {
  PackedWeight pw;
  pw.K = K;
  pw.H = H;
  pw.G = G;
  pw.NV = NV;
  pw.unit_block = unit_block;
  pw.col_stride = col_stride;
  const int64_t panels = (H + unit_block - 1) / unit_block;
  pw.data = at::zeros({panels, K, NV * kVec}, opts);
  float* dst = pw.data.data_ptr<float>();
  for (int64_t pb = 0; pb < panels; ++pb) {
    for (int64_t v = 0; v < NV; ++v) {
      for (int64_t l = 0; l < kVec; ++l) {
        const int64_t unit = pb * unit_block + (G == 1 ? v * kVec : 0) + l;
        if (unit >= H || (G > 1 && l >= unit_block)) continue;
        const int64_t col = G == 1 ? unit : v * col_stride + unit;
        float* out = dst + pb * K * NV * kVec + v * kVec + l;
        for (int64_t k = 0; k < K; ++k) out[k * NV * kVec] = b(k, col);
      }
    }
  }
  return pw;
}

}  // namespace

PackedWeight pack_weight(const at::Tensor& w, int64_t G) {
  TORCH_INTERNAL_ASSERT(G == 3 || G == 4, "pack_weight: G must be 3 or 4, got ", G);
  TORCH_INTERNAL_ASSERT(w.dim() == 2 && w.size(0) % G == 0 && w.scalar_type() == at::kFloat,
                        "pack_weight: expected a float (G * H, K) weight, got ", w.sizes());
  const at::Tensor wc = w.contiguous();
  const float* src = wc.data_ptr<float>();
  const int64_t H = w.size(0) / G, K = w.size(1);
  // B = w^T: B[k][col] = w[col][k]
  return pack(K, H, G, G, kVec, H, w.options(),
              [&](int64_t k, int64_t col) { return src[col * K + k]; });
}

PackedWeight pack_plain(const at::Tensor& b) {
  TORCH_INTERNAL_ASSERT(b.dim() == 2 && b.scalar_type() == at::kFloat,
                        "pack_plain: expected a float (K, N) matrix, got ", b.sizes());
  const at::Tensor bc = b.contiguous();
  const float* src = bc.data_ptr<float>();
  const int64_t K = b.size(0), N = b.size(1);
  return pack(K, N, 1, 4, 4 * kVec, kVec, b.options(),
              [&](int64_t k, int64_t col) { return src[k * N + col]; });
}

#if FUSEDRNN_FUSED_STEPS
namespace {

// A GEMM operand resolved for one panel.
struct PanelSource {
  const float* a;
  int64_t lda;
  const float* panel;
  int64_t K;
};

// One output tile: MR rows x NV vectors of 16 columns, summed over the sources. Vector v of row
// r is stored at out + r * ldo + v * col_stride under mask[v] (the units that exist).
template <int NV, int MR, bool kAcc>
inline void gemm_tile(const PanelSource* src, int nsrc, int64_t row0, float* out, int64_t ldo,
                      int64_t col_stride, const __mmask16* mask) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int q = 0; q < nsrc; ++q) {
    const float* a = src[q].a + row0 * src[q].lda;
    const int64_t lda = src[q].lda, K = src[q].K;
    const float* panel = src[q].panel;
    for (int64_t k = 0; k < K; ++k) {
      const float* b = panel + k * (NV * kVec);
      __m512 bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + v * kVec);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
      }
    }
  }
  if constexpr (kAcc) {  // out += the product
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        acc[r][v] = _mm512_add_ps(
            acc[r][v], _mm512_maskz_loadu_ps(mask[v], out + r * ldo + v * col_stride));
      }
    }
  }
  // Whole-vector stores where the vector is full: the loads of the step kernel that follow at
  // once are then served from the store buffer.
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    if (mask[v] == static_cast<__mmask16>(0xFFFF)) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) _mm512_storeu_ps(out + r * ldo + v * col_stride, acc[r][v]);
    } else if (mask[v] != 0) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        _mm512_mask_storeu_ps(out + r * ldo + v * col_stride, mask[v], acc[r][v]);
      }
    }
  }
}

template <int NV, int MR, bool kAcc>
inline void gemm_tail(int rows, const PanelSource* src, int nsrc, int64_t row0, float* out,
                      int64_t ldo, int64_t col_stride, const __mmask16* mask) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      gemm_tile<NV, MR, kAcc>(src, nsrc, row0, out, ldo, col_stride, mask);
    } else {
      gemm_tail<NV, MR - 1, kAcc>(rows, src, nsrc, row0, out, ldo, col_stride, mask);
    }
  }
}

__mmask16 lanes(int64_t count) {
  count = std::max<int64_t>(0, std::min<int64_t>(kVec, count));
  return static_cast<__mmask16>((1u << count) - 1u);
}

// out = sum over the sources of a @ B (kAcc: out += ...) for rows [0, n), panel by panel (in
// parallel over panels); epi(r0, rows, j0, units) runs after each tile. Rows per tile: 6 for 4
// vectors, 8 for 3 (24 accumulators of the 32 vector registers).
template <int NV, bool kAcc = false, typename Epi>
void gemm_tiles(int64_t n, const GemmSource* sources, int nsrc, float* out, int64_t ldo,
                const Epi& epi) {
  constexpr int MR = NV == 4 ? 6 : 8;
  constexpr int kMaxSources = 2;
  TORCH_INTERNAL_ASSERT(nsrc >= 1 && nsrc <= kMaxSources, "fused step: ", nsrc, " sources");
  const PackedWeight& w0 = *sources[0].w;
  const int64_t H = w0.H, unit_block = w0.unit_block, col_stride = w0.col_stride;
  int64_t macs_per_panel = 0;
  for (int q = 0; q < nsrc; ++q) {
    const PackedWeight& w = *sources[q].w;
    TORCH_INTERNAL_ASSERT(w.NV == NV && w.H == H && w.G == w0.G,
                          "fused step: operands packed as (", w.NV, " vectors, ", w.H,
                          " units), kernel expects (", NV, ", ", H, ")");
    macs_per_panel += n * w.K * NV * kVec;
  }
  const int64_t panels = (H + unit_block - 1) / unit_block;
  // Panels per task: at least ~64k multiply-adds each, so that small steps stay on one thread.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, macs_per_panel));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t pb = p0; pb < p1; ++pb) {
      const int64_t j0 = pb * unit_block;
      const int64_t units = std::min(unit_block, H - j0);
      __mmask16 mask[NV];
      for (int v = 0; v < NV; ++v) mask[v] = lanes(w0.G == 1 ? units - v * kVec : units);
      PanelSource src[kMaxSources];
      for (int q = 0; q < nsrc; ++q) {
        const PackedWeight& w = *sources[q].w;
        src[q] = {sources[q].a, sources[q].lda, w.data.data_ptr<float>() + pb * w.K * NV * kVec,
                  w.K};
      }
      int64_t r = 0;
      for (; r + MR <= n; r += MR) {
        gemm_tile<NV, MR, kAcc>(src, nsrc, r, out + r * ldo + j0, ldo, col_stride, mask);
        epi(r, static_cast<int64_t>(MR), j0, units);
      }
      if (r < n) {
        gemm_tail<NV, MR - 1, kAcc>(static_cast<int>(n - r), src, nsrc, r, out + r * ldo + j0,
                                    ldo, col_stride, mask);
        epi(r, n - r, j0, units);
      }
    }
  });
}

// fn(b, j) over rows [r0, r0 + rows) and units [j0, j0 + units); a whole block of kBlock units
// as a fixed-length loop, which the compiler turns into whole-vector code (no masks, no
// remainder).
template <int64_t kBlock, typename Fn>
__attribute__((always_inline)) inline void for_tile(int64_t r0, int64_t rows, int64_t j0,
                                                    int64_t units, const Fn& fn) {
  if (units == kBlock) {
    for (int64_t b = r0; b < r0 + rows; ++b) {
#pragma GCC ivdep
      for (int64_t l = 0; l < kBlock; ++l) fn(b, j0 + l);
    }
  } else {
    for (int64_t b = r0; b < r0 + rows; ++b) {
#pragma GCC ivdep
      for (int64_t j = j0; j < j0 + units; ++j) fn(b, j);
    }
  }
}

}  // namespace

void lstm_forward_fused_step(CellKind cell, Phase phase, const LSTMForwardStep<float>& p,
                             float* out, int64_t ldo, GemmSource s0, GemmSource s1) {
  if (p.n == 0) return;
  const GemmSource sources[2] = {s0, s1};
  const int nsrc = s1.w ? 2 : 1;
  dispatch_lstm_family(cell, phase, [&](auto c, auto ph) {
    constexpr CellKind kCell = decltype(c)::value;
    constexpr Phase kPhase = decltype(ph)::value;
    dispatch_bool(p.bias != nullptr, [&](auto bias) {
      constexpr bool kBias = decltype(bias)::value;
      auto epi = [&](int64_t r0, int64_t rows, int64_t j0, int64_t units) {
        const LSTMForwardStep<float> q = p;  // a local copy: stores cannot alias its pointers
        for_tile<kVec>(r0, rows, j0, units,
                       [&](int64_t b, int64_t j) __attribute__((always_inline)) {
                         lstm_forward_element<kCell, kPhase, kBias, /*kHg=*/false>(q, b, j);
                       });
      };
      if constexpr (kCell == CellKind::kWorkingMemory && kPhase == Phase::kO) {
        gemm_tiles<3>(p.n, sources, nsrc, out, ldo, epi);
      } else {
        gemm_tiles<4>(p.n, sources, nsrc, out, ldo, epi);
      }
    });
  });
}

// A backward step: dh[0:gemm_rows] (=, or += with kAcc) src.a @ B tile by tile, then
// element(q, b, j) on each tile's rows below p.n; then on rows [gemm_rows, p.n), whose dh the
// GEMM does not produce (it is already in place).
template <bool kAcc, typename Step, typename Element>
void backward_tiles(const Step& p, float* dh, int64_t ld_dh, const GemmSource& src,
                    int64_t gemm_rows, const Element& element) {
  TORCH_INTERNAL_ASSERT(src.w->G == 1, "fused backward step: weight must be packed plain");
  auto epi = [&](int64_t r0, int64_t rows, int64_t j0, int64_t units) {
    const Step q = p;  // a local copy: stores cannot alias its pointers
    rows = std::min(rows, p.n - r0);  // GEMM rows past the step's are gradients of h0 only
    if (rows <= 0) return;
    for_tile<4 * kVec>(r0, rows, j0, units,
                       [&](int64_t b, int64_t j) __attribute__((always_inline)) {
                         element(q, b, j);
                       });
  };
  if (gemm_rows > 0) gemm_tiles<4, kAcc>(gemm_rows, &src, 1, dh, ld_dh, epi);
  if (p.n > gemm_rows) {
    at::parallel_for(gemm_rows, p.n, 1, [&](int64_t b0, int64_t b1) {
      const Step q = p;
      for (int64_t b = b0; b < b1; ++b) {
#pragma GCC ivdep
        for (int64_t j = 0; j < q.H; ++j) element(q, b, j);
      }
    });
  }
}

void lstm_backward_fused_step(CellKind cell, Phase phase, const LSTMBackwardStep<float>& p,
                              float* out, int64_t ldo, GemmSource src, int64_t gemm_rows) {
  // The GEMM writes what the phase's kernel reads: dh (=) before kWhole / kO, dc (+=) before
  // the WM kIFG phase.
  const bool into_dc = cell == CellKind::kWorkingMemory && phase == Phase::kIFG;
  TORCH_INTERNAL_ASSERT(into_dc ? (out == p.dc_state && ldo == p.H)
                                : (out == p.dh && ldo == p.ld_dh),
                        "lstm_backward_fused_step: the step must read the GEMM's output");
  dispatch_lstm_family(cell, phase, [&](auto c, auto ph) {
    constexpr CellKind kCell = decltype(c)::value;
    constexpr Phase kPhase = decltype(ph)::value;
    constexpr bool kIntoDc = kCell == CellKind::kWorkingMemory && kPhase == Phase::kIFG;
    backward_tiles<kIntoDc>(p, out, ldo, src, gemm_rows,
                            [&](const LSTMBackwardStep<float>& q, int64_t b, int64_t j)
                                __attribute__((always_inline)) {
                                  lstm_backward_element<kCell, kPhase>(q, b, j);
                                });
  });
}

void gru_backward_fused_step(const GRUBackwardStep<float>& p, GemmSource src,
                             int64_t gemm_rows) {
  backward_tiles<true>(p, p.dh_state, p.H, src, gemm_rows,
                       [&](const GRUBackwardStep<float>& q, int64_t b, int64_t j)
                           __attribute__((always_inline)) { gru_backward_element(q, b, j); });
}

void gru_forward_fused_step(const GRUForwardStep<float>& p, const float* a, int64_t lda,
                            const PackedWeight& w) {
  if (p.n == 0) return;
  TORCH_INTERNAL_ASSERT((p.bias_ih == nullptr) == (p.bias_hh == nullptr));
  dispatch_bool(p.bias_ih != nullptr, [&](auto bias) {
    auto epi = [&](int64_t r0, int64_t rows, int64_t j0, int64_t units) {
      const GRUForwardStep<float> q = p;
      for_tile<kVec>(r0, rows, j0, units,
                     [&](int64_t b, int64_t j) __attribute__((always_inline)) {
                       gru_forward_element<decltype(bias)::value>(q, b, j);
                     });
    };
    const GemmSource source{a, lda, &w};
    gemm_tiles<3>(p.n, &source, 1, const_cast<float*>(p.hg), p.ld_hg, epi);
  });
}

#else  // no AVX-512: fused_steps_enabled() is false and these are never called

void lstm_forward_fused_step(CellKind, Phase, const LSTMForwardStep<float>&, float*, int64_t,
                             GemmSource, GemmSource) {
  TORCH_INTERNAL_ASSERT(false, "fused CPU steps need an AVX-512 build");
}

void lstm_backward_fused_step(CellKind, Phase, const LSTMBackwardStep<float>&, float*, int64_t,
                              GemmSource, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "fused CPU steps need an AVX-512 build");
}

void gru_forward_fused_step(const GRUForwardStep<float>&, const float*, int64_t,
                            const PackedWeight&) {
  TORCH_INTERNAL_ASSERT(false, "fused CPU steps need an AVX-512 build");
}

void gru_backward_fused_step(const GRUBackwardStep<float>&, GemmSource, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "fused CPU steps need an AVX-512 build");
}

#endif

}  // namespace cpu
}  // namespace fusedrnn
