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

constexpr int64_t kPanelUnits = 16;  // units per panel: one AVX-512 vector of floats per gate

bool fused_steps_available() {
  static const bool available = [] {
    const char* env = std::getenv("FUSEDRNN_CPU_FUSED");
    return FUSEDRNN_FUSED_STEPS && !(env && std::string(env) == "0");
  }();
  return available;
}

bool fused_steps_enabled(const at::Tensor& t) {
  return fused_steps_available() && t.device().is_cpu() && t.scalar_type() == at::kFloat;
}

PackedWeight pack_weight(const at::Tensor& w, int64_t G) {
  TORCH_INTERNAL_ASSERT(G == 3 || G == 4, "pack_weight: G must be 3 or 4, got ", G);
  TORCH_INTERNAL_ASSERT(w.dim() == 2 && w.size(0) % G == 0 && w.scalar_type() == at::kFloat,
                        "pack_weight: expected a float (G * H, K) weight, got ", w.sizes());
  PackedWeight pw;
  pw.G = G;
  pw.H = w.size(0) / G;
  pw.K = w.size(1);
  const int64_t panels = (pw.H + kPanelUnits - 1) / kPanelUnits;
  const int64_t width = G * kPanelUnits;
  pw.data = at::zeros({panels, pw.K, width}, w.options());
  const at::Tensor wc = w.contiguous();
  const float* src = wc.data_ptr<float>();
  float* dst = pw.data.data_ptr<float>();
  const int64_t H = pw.H, K = pw.K;
  // dst[panel][k][g * 16 + l] = w[g * H + panel * 16 + l][k] for the units that exist
  for (int64_t pb = 0; pb < panels; ++pb) {
    const int64_t units = std::min(kPanelUnits, H - pb * kPanelUnits);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t l = 0; l < units; ++l) {
        const float* row = src + (g * H + pb * kPanelUnits + l) * K;
        float* col = dst + pb * K * width + g * kPanelUnits + l;
        for (int64_t k = 0; k < K; ++k) col[k * width] = row[k];
      }
    }
  }
  return pw;
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
// r is stored at out + r * ldo + v * gate_stride under `mask` (the units of the panel that exist).
template <int NV, int MR>
inline void gemm_tile(const PanelSource* src, int nsrc, int64_t row0, float* out, int64_t ldo,
                      int64_t gate_stride, __mmask16 mask) {
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
      const float* b = panel + k * (NV * kPanelUnits);
      __m512 bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + v * kPanelUnits);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
      }
    }
  }
  // Whole-vector stores where the panel is full: a masked store is not forwarded to the loads
  // of the step kernel that follow at once, which then wait for it to reach the cache.
  if (mask == static_cast<__mmask16>(0xFFFF)) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + r * ldo + v * gate_stride, acc[r][v]);
    }
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        _mm512_mask_storeu_ps(out + r * ldo + v * gate_stride, mask, acc[r][v]);
      }
    }
  }
}

template <int NV, int MR>
inline void gemm_tail(int rows, const PanelSource* src, int nsrc, int64_t row0, float* out,
                      int64_t ldo, int64_t gate_stride, __mmask16 mask) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      gemm_tile<NV, MR>(src, nsrc, row0, out, ldo, gate_stride, mask);
    } else {
      gemm_tail<NV, MR - 1>(rows, src, nsrc, row0, out, ldo, gate_stride, mask);
    }
  }
}

// out = sum over the sources of a @ W^T for rows [0, n), panel by panel (in parallel over
// panels); epi(r0, rows, j0, units) runs after each tile. Rows per tile: 6 for 4 gates, 8 for 3
// (24 accumulators of the 32 vector registers).
template <int NV, typename Epi>
void gemm_tiles(int64_t n, const GemmSource* sources, int nsrc, float* out, int64_t ldo,
                const Epi& epi) {
  constexpr int MR = NV == 4 ? 6 : 8;
  constexpr int kMaxSources = 2;
  TORCH_INTERNAL_ASSERT(nsrc >= 1 && nsrc <= kMaxSources, "fused step: ", nsrc, " sources");
  const int64_t H = sources[0].w->H;
  int64_t macs_per_panel = 0;
  for (int q = 0; q < nsrc; ++q) {
    const PackedWeight& w = *sources[q].w;
    TORCH_INTERNAL_ASSERT(w.G == NV && w.H == H, "fused step: weight packed as (", w.G, " x ",
                          w.H, ") gates x units, kernel expects (", NV, " x ", H, ")");
    macs_per_panel += n * w.K * NV * kPanelUnits;
  }
  const int64_t panels = (H + kPanelUnits - 1) / kPanelUnits;
  // Panels per task: at least ~64k multiply-adds each, so that small steps stay on one thread.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, macs_per_panel));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t pb = p0; pb < p1; ++pb) {
      const int64_t j0 = pb * kPanelUnits;
      const int64_t units = std::min(kPanelUnits, H - j0);
      const __mmask16 mask = static_cast<__mmask16>((1u << units) - 1u);
      PanelSource src[kMaxSources];
      for (int q = 0; q < nsrc; ++q) {
        const PackedWeight& w = *sources[q].w;
        src[q] = {sources[q].a, sources[q].lda,
                  w.data.data_ptr<float>() + pb * w.K * NV * kPanelUnits, w.K};
      }
      int64_t r = 0;
      for (; r + MR <= n; r += MR) {
        gemm_tile<NV, MR>(src, nsrc, r, out + r * ldo + j0, ldo, H, mask);
        epi(r, static_cast<int64_t>(MR), j0, units);
      }
      if (r < n) {
        gemm_tail<NV, MR - 1>(static_cast<int>(n - r), src, nsrc, r, out + r * ldo + j0, ldo,
                              H, mask);
        epi(r, n - r, j0, units);
      }
    }
  });
}

// fn(b, j) over a tile's rows and units; a full panel's 16 units as a fixed-length loop, which
// the compiler turns into whole-vector code (no masks, no remainder).
template <typename Fn>
__attribute__((always_inline)) inline void for_tile(int64_t r0, int64_t rows, int64_t j0, int64_t units, const Fn& fn) {
  if (units == kPanelUnits) {
    for (int64_t b = r0; b < r0 + rows; ++b) {
#pragma GCC ivdep
      for (int64_t l = 0; l < kPanelUnits; ++l) fn(b, j0 + l);
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
        for_tile(r0, rows, j0, units, [&](int64_t b, int64_t j) __attribute__((always_inline)) {
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

void gru_forward_fused_step(const GRUForwardStep<float>& p, const float* a, int64_t lda,
                            const PackedWeight& w) {
  if (p.n == 0) return;
  TORCH_INTERNAL_ASSERT((p.bias_ih == nullptr) == (p.bias_hh == nullptr));
  dispatch_bool(p.bias_ih != nullptr, [&](auto bias) {
    auto epi = [&](int64_t r0, int64_t rows, int64_t j0, int64_t units) {
      const GRUForwardStep<float> q = p;
      for_tile(r0, rows, j0, units,
               [&](int64_t b, int64_t j) __attribute__((always_inline)) {
                 gru_forward_element<decltype(bias)::value>(q, b, j); });
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

void gru_forward_fused_step(const GRUForwardStep<float>&, const float*, int64_t,
                            const PackedWeight&) {
  TORCH_INTERNAL_ASSERT(false, "fused CPU steps need an AVX-512 build");
}

#endif

}  // namespace cpu
}  // namespace fusedrnn
