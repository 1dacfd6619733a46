// The layer-normalised cells (design.md §1.6), one row of one step at a time: LN-LSTM and LN-GRU,
// forward and backward, with the row statistics of the step computed inside the step.
//
// A row function is a few passes over the row's columns, each run by the `Row` it is given:
// `row.each(n, f)` calls f(k) for every column k, `row.sum2(n, f)` returns the two sums of
// f(k) (a Sum2), `row.once(f)` calls f once. A pass may read, at any column, what the passes before
// it wrote, and at its own column k only what it writes itself. On the CPU `SerialRow` runs a pass
// as one loop (`#pragma GCC ivdep`: within a pass every array written is a separate buffer, or the
// element read; the sums as `omp simd` reductions, which gcc otherwise keeps in order, one lane
// at a time), compiled once per ISA (kernels/cpu/layer_norm_rows.h). The CUDA kernels
// (kernels/cuda/layer_norm.cu) run a row on a thread block, `BlockRow`: the columns of a pass on
// its threads, a barrier after each pass, sums as block reductions. So the math below is the
// one of both devices.
//
// A row's step needs the mean and variance of its whole recurrent product h_{t-1} W_hh^T (4H or
// 3H columns) before any unit's gates, and the LN-LSTM the statistics of its whole c_t before any
// unit's output, so the unit of work is a row (not an element, as in the other cells): a few
// passes over the row's columns, each a loop that gcc vectorises. The input side x W_ih^T does not
// depend on the recurrence: it is one GEMM for every row of the call before the step loop in
// training, for a chunk of steps at a time in inference (recurrence/layer_norm.cpp), which each
// row's forward pass normalises (its statistics taken there); its backward runs in the row's
// backward pass, which also adds the row's terms of the gains' and biases' gradients (column
// sums over every row) to sums of its thread's own.
//
// The training workspace of a row (acc_t, the op-math type: fp32 for the half types) keeps
// what the backward reads: the normalised products x̂ and ĥ, the activated gates, the states
// before the step, the normalisation ĉ of c_t (LN-LSTM), and the reciprocal standard deviations.
//
// Zoneout (design.md §1.7): with kZone (kOn; the LSTM's kCellOnly, a projected row, zones c_t
// only, its h_t zoned after the projection), `zc`, `zh` are the row's weights d of the previous
// cell / hidden state in the new one (0 / 1 masks, or the rate in eval); kOff: not read (a
// compile-time choice: a run-time test of a null pointer inside a loop became masked vector
// loads, which emulators fault on, kernels/step_elements.h). The forward mixes
// d * prev + (1 - d) * new into the carried states and the output; ĉ in the workspace is of
// the cell's own (un-zoned) new state, which h̃_t reads. The backward gives the cell
// (1 - d) of each state's gradient and adds d of it to the previous state's.
#pragma once

#include <type_traits>

#include "common.h"

namespace fusedrnn {
FUSEDRNN_ISA_BEGIN
namespace layer_norm {

constexpr double kEps = 1e-5;  // torch.nn.LayerNorm's default, as the reference

// A pass's function (a lambda): on the CPU always inlined into the pass's loop, which gcc then
// vectorises (left to gcc's heuristics, the GRU's gate pass, which calls two more lambdas, was
// not, and ran at half speed).
#if defined(__CUDACC__)
#define FUSEDRNN_PASS
#else
#define FUSEDRNN_PASS __attribute__((always_inline))
#endif

// Two sums taken in one pass (Row::sum of a function returning them).
template <typename acc_t>
struct Sum2 {
  acc_t a, b;
};

#if !defined(__CUDACC__)
// A row's passes on one CPU thread, in column order (see the header comment).
struct SerialRow {
  template <typename Fn>
  FUSEDRNN_HD void each(int64_t n, const Fn& f) const {
#pragma GCC ivdep
    for (int64_t k = 0; k < n; ++k) f(k);
  }
  // sum2 runs as four partial sums, two per half of the row, added at the end: with one sum
  // each, every vector add waited for the one before.
  template <typename Fn>
  FUSEDRNN_HD auto sum2(int64_t n, const Fn& f) const {
    using S = decltype(f(int64_t(0)));
    using acc_t = decltype(S{}.a);
    const int64_t h = n / 2;
    acc_t a0 = 0, b0 = 0, a1 = 0, b1 = 0;
#pragma omp simd reduction(+ : a0, b0, a1, b1)
    for (int64_t k = 0; k < h; ++k) {
      const S u = f(k), v = f(h + k);
      a0 += u.a;
      b0 += u.b;
      a1 += v.a;
      b1 += v.b;
    }
    for (int64_t k = 2 * h; k < n; ++k) {
      const S v = f(k);
      a0 += v.a;
      b0 += v.b;
    }
    return S{a0 + a1, b0 + b1};
  }
  template <typename Fn>
  FUSEDRNN_HD void once(const Fn& f) const {
    f();
  }
};
#endif

// Mean and reciprocal standard deviation (biased variance, eps) of v[0, n), in one pass: the sums
// of d = v - v[0] and of d², shifted by the row's first value so that the variance
// E[d²] - E[d]² does not cancel for a row far from zero (as E[v²] - E[v]² would): |E[d]| is
// the distance of the mean from one of the row's own values, a few standard deviations at most
// but for outliers. (Two passes, the mean first, cost the row pass a tenth of its time.)
template <typename acc_t, typename Row, typename T>
FUSEDRNN_HD void row_stats(const Row& row, const T* v, int64_t n, acc_t& mean, acc_t& rstd) {
  const acc_t shift = static_cast<acc_t>(v[0]);
  const Sum2<acc_t> s = row.sum2(n, [&](int64_t k) FUSEDRNN_PASS {
    const acc_t d = static_cast<acc_t>(v[k]) - shift;
    return Sum2<acc_t>{d, d * d};
  });
  const acc_t m = s.a / static_cast<acc_t>(n);
  const acc_t var = s.b / static_cast<acc_t>(n) - m * m;
  mean = shift + m;
  rstd = acc_t(1) / std::sqrt((var > acc_t(0) ? var : acc_t(0)) + static_cast<acc_t>(kEps));
}

// dv = rstd (g - mean(g) - v̂ mean(g v̂)): the gradient of v through v̂ = (v - mean) rstd, given
// g = dL/dv̂ (biased variance). g and dv may alias.
template <typename acc_t, typename Row>
FUSEDRNN_HD void norm_backward(const Row& row, const acc_t* g, const acc_t* vhat, acc_t rstd,
                               int64_t n, acc_t* dv) {
  const Sum2<acc_t> s =
      row.sum2(n, [&](int64_t k) FUSEDRNN_PASS { return Sum2<acc_t>{g[k], g[k] * vhat[k]}; });
  const acc_t m1 = s.a / static_cast<acc_t>(n), m2 = s.b / static_cast<acc_t>(n);
  row.each(n, [&](int64_t k) FUSEDRNN_PASS { dv[k] = rstd * (g[k] - m1 - vhat[k] * m2); });
}

// The columns of a row of the workspace blocks (each block is its own (N, width) matrix).
struct LSTMRow {
  // blocks: xhat 4H | hhat 4H | gates 4H (i, f, g, o) | c_prev H | chat H | h_prev Hout |
  // [r H: o * tanh(LN(c)) before the projection] | stats 3 (rstd_x, rstd_h, rstd_c). (c_t
  // itself is not kept: the backward reads its normalisation ĉ_t and rstd_c only.)
  template <typename acc_t>
  struct Ptrs {
    acc_t *xhat, *hhat, *gates, *c_prev, *chat, *h_prev, *r, *stats;
  };
};

// Forward of one row of an LN-LSTM step. `xp` (4H) is the row's input product x W_ih^T, which it
// normalises into w.xhat (xp may be w.xhat itself: each column is read before it is written);
// `hg` (4H) the row's h_{t-1} W_hh^T; bias (4H) b_ih + b_hh (zeros without biases: no null
// test in a pass, whose loop gcc then left scalar in bf16); c_state (H, acc_t) in:
// c_{t-1}, out: c_t; h_prev (Hout) the row's state before the step (saved; h_copy may be it).
// Writes h_t = o tanh(LN(c_t)) to `h_out` (and `h_copy` when not null), as scalar_t. kKeep: a
// training step, which fills the row's workspace for the backward; else an inference step,
// which writes only what the step itself reads again (the output gate, c_t in ĉ's place).
template <int kZone, bool kKeep, typename scalar_t, typename acc_t, typename Row>
FUSEDRNN_HD void lstm_forward_row(const Row& row, int64_t H, int64_t Hout, const scalar_t* xp,
                                  const scalar_t* hg, const scalar_t* h_prev, const scalar_t* g_ih,
                                  const scalar_t* g_hh, const scalar_t* bias, const scalar_t* g_c,
                                  const scalar_t* b_c, acc_t* c_state,
                                  const LSTMRow::Ptrs<acc_t>& w, scalar_t* h_out, scalar_t* h_copy,
                                  const scalar_t* zc, const scalar_t* zh) {
  const int64_t G = 4 * H;
  constexpr bool kZoneC = kZone != kOff, kZoneH = kZone == kOn;
  if constexpr (kKeep || kZoneH) {  // (zoned: the output pass reads it, h_copy may be h_prev)
    row.each(Hout, [&](int64_t k) FUSEDRNN_PASS { w.h_prev[k] = static_cast<acc_t>(h_prev[k]); });
  }
  acc_t mean_x, rstd_x, mean, rstd_h;
  row_stats<acc_t>(row, xp, G, mean_x, rstd_x);
  row_stats<acc_t>(row, hg, G, mean, rstd_h);
  // A unit's four gate columns normalised (into x̂, ĥ) and activated in one pass (xp may be
  // w.xhat itself: each column is read before it is written).
  auto pre = [&](int64_t k) FUSEDRNN_PASS {
    const acc_t xh = (static_cast<acc_t>(xp[k]) - mean_x) * rstd_x;
    const acc_t hh = (static_cast<acc_t>(hg[k]) - mean) * rstd_h;
    if constexpr (kKeep) {
      w.xhat[k] = xh;
      w.hhat[k] = hh;
    }
    acc_t a = static_cast<acc_t>(g_ih[k]) * xh + static_cast<acc_t>(g_hh[k]) * hh;
    return a + static_cast<acc_t>(bias[k]);
  };
  acc_t* const gt = w.gates;
  row.each(H, [&](int64_t j) FUSEDRNN_PASS {
    const acc_t i = math::sigmoid(pre(j)), f = math::sigmoid(pre(H + j));
    const acc_t g = math::tanh(pre(2 * H + j)), o = math::sigmoid(pre(3 * H + j));
    if constexpr (kKeep) {
      gt[j] = i;
      gt[H + j] = f;
      gt[2 * H + j] = g;
    }
    gt[3 * H + j] = o;
    const acc_t cp = c_state[j];
    if constexpr (kKeep) w.c_prev[j] = cp;
    const acc_t c = f * cp + i * g;
    w.chat[j] = c;           // c_t, normalised in place below
    if constexpr (kZoneC) {  // the carried state zoned; chat keeps the cell's own, which LN reads
      const acc_t d = static_cast<acc_t>(zc[j]);
      c_state[j] = d * cp + (acc_t(1) - d) * c;
    } else {
      c_state[j] = c;
    }
  });
  acc_t mean_c, rstd_c;
  row_stats<acc_t>(row, w.chat, H, mean_c, rstd_c);
  // The output pass with a projection (h_copy null: h_out is the cell's r_t, which a training
  // step keeps in w.r) or without, chosen once per row: with the test per column gcc left the
  // bf16 pass scalar.
  auto output = [&](auto projected) FUSEDRNN_PASS {
    constexpr bool kProj = decltype(projected)::value;
    row.each(H, [&](int64_t j) FUSEDRNN_PASS {
      const acc_t ch = (w.chat[j] - mean_c) * rstd_c;
      w.chat[j] = ch;
      acc_t h =
          gt[3 * H + j] * math::tanh(static_cast<acc_t>(g_c[j]) * ch + static_cast<acc_t>(b_c[j]));
      if constexpr (kZoneH) {  // (no projection: h_prev has H values)
        const acc_t d = static_cast<acc_t>(zh[j]);
        h = d * w.h_prev[j] + (acc_t(1) - d) * h;
      }
      if constexpr (kKeep && kProj) w.r[j] = h;
      h_out[j] = static_cast<scalar_t>(h);
      if constexpr (!kProj) h_copy[j] = static_cast<scalar_t>(h);
    });
  };
  if (h_copy == nullptr) {
    output(std::true_type{});
  } else {
    output(std::false_type{});
  }
  if constexpr (kKeep) {
    row.once([&]() FUSEDRNN_PASS {
      w.stats[0] = rstd_x;
      w.stats[1] = rstd_h;
      w.stats[2] = rstd_c;
    });
  }
}

// Backward of one row of an LN-LSTM step. dh (H): the gradient of o tanh(LN(c_t)) (after the
// projection's backward); dc_state (H) in: dL/dc_t from later steps, out: dL/dc_{t-1}. Writes
// dx (4H, the gradient of the input product x W_ih^T, through the input side's LayerNorm) and
// dhg (4H, the gradient of h_{t-1} W_hh^T), and adds the row's terms of the column sums that
// the LayerNorm gains' and the biases' gradients are to `sums`: with da the gradient of the
// pre-activation a = γ_ih x̂ + γ_hh ĥ + b and dyc that of γ_c ĉ + β_c,
// [Σda 4H | Σda x̂ 4H | Σda ĥ 4H | Σdyc H | Σdyc ĉ H].
// With zoneout of h_t (kZone kOn; no projection) dh is dL/dh_t itself and is overwritten with its
// direct part, d_h * dL/dh_t, which the GEMM of dh_{t-1}'s W_hh part then accumulates onto;
// with a projection (kCellOnly) dh is already the gradient of the cell's own r_t.
template <int kZone, typename scalar_t, typename acc_t, typename Row>
FUSEDRNN_HD void lstm_backward_row(const Row& row, int64_t H, acc_t* dh, const scalar_t* g_ih,
                                   const scalar_t* g_hh, const scalar_t* g_c, const scalar_t* b_c,
                                   acc_t* dc_state, const LSTMRow::Ptrs<acc_t>& w, acc_t* dx,
                                   acc_t* dhg, acc_t* sums, const scalar_t* zc,
                                   const scalar_t* zh) {
  const acc_t one(1);
  const int64_t G = 4 * H;
  constexpr bool kZoneC = kZone != kOff, kZoneH = kZone == kOn;
  const acc_t* const gt = w.gates;
  acc_t* const da = dx;  // da first, then turned into dx in place
  acc_t* const s_dyc = sums + 3 * G;
  acc_t* const s_dyc_c = s_dyc + H;
  row.each(H, [&](int64_t j) FUSEDRNN_PASS {
    const acc_t o = gt[3 * H + j];
    const acc_t ty =
        math::tanh(static_cast<acc_t>(g_c[j]) * w.chat[j] + static_cast<acc_t>(b_c[j]));
    acc_t dhj = dh[j];
    if constexpr (kZoneH) {
      const acc_t d = static_cast<acc_t>(zh[j]);
      dh[j] = d * dhj;
      dhj = (one - d) * dhj;
    }
    const acc_t dyc = dhj * o * (one - ty * ty);
    s_dyc[j] += dyc;
    s_dyc_c[j] += dyc * w.chat[j];
    da[3 * H + j] = dhj * ty * o * (one - o);
    dhg[j] = dyc * static_cast<acc_t>(g_c[j]);  // dL/dĉ, in dhg's first H as scratch
  });
  norm_backward<acc_t>(row, dhg, w.chat, w.stats[2], H, dhg);  // dL/dc_t through LN(c_t)
  row.each(H, [&](int64_t j) FUSEDRNN_PASS {
    const acc_t i = gt[j], f = gt[H + j], g = gt[2 * H + j];
    acc_t dc = dhg[j] + dc_state[j], carry = 0;
    if constexpr (kZoneC) {
      const acc_t d = static_cast<acc_t>(zc[j]);
      carry = d * dc_state[j];
      dc = dhg[j] + (one - d) * dc_state[j];
    }
    da[j] = dc * g * i * (one - i);
    da[H + j] = dc * w.c_prev[j] * f * (one - f);
    da[2 * H + j] = dc * i * (one - g * g);
    dc_state[j] = kZoneC ? dc * f + carry : dc * f;
  });
  acc_t* const s_da = sums;
  acc_t* const s_da_x = sums + G;
  acc_t* const s_da_h = sums + 2 * G;
  row.each(G, [&](int64_t k) FUSEDRNN_PASS {
    const acc_t a = da[k];
    s_da[k] += a;
    s_da_x[k] += a * w.xhat[k];
    s_da_h[k] += a * w.hhat[k];
    dhg[k] = a * static_cast<acc_t>(g_hh[k]);
    da[k] = a * static_cast<acc_t>(g_ih[k]);  // dL/dx̂
  });
  norm_backward<acc_t>(row, dhg, w.hhat, w.stats[1], G, dhg);
  norm_backward<acc_t>(row, dx, w.xhat, w.stats[0], G, dx);
}

struct GRURow {
  // blocks: xhat 3H | hhat 3H | gates 3H (r, z, n) | h_prev H | stats 2 (rstd_x, rstd_h)
  template <typename acc_t>
  struct Ptrs {
    acc_t *xhat, *hhat, *gates, *h_prev, *stats;
  };
};

// Forward of one row of an LN-GRU step: xp (3H) the row's x W_ih^T, normalised into w.xhat (as
// in the LSTM), hg (3H) the row's h_{t-1} W_hh^T, h_state (H) in: h_{t-1}, out: h_t (also
// written to h_out).
template <int kZone, bool kKeep, typename scalar_t, typename acc_t, typename Row>
FUSEDRNN_HD void gru_forward_row(const Row& row, int64_t H, const scalar_t* xp, const scalar_t* hg,
                                 const scalar_t* g_ih, const scalar_t* g_hh, const scalar_t* b_ih,
                                 const scalar_t* b_hh, scalar_t* h_state,
                                 const GRURow::Ptrs<acc_t>& w, scalar_t* h_out,
                                 const scalar_t* zh) {
  const int64_t G = 3 * H;
  acc_t mean_x, rstd_x, mean, rstd_h;
  row_stats<acc_t>(row, xp, G, mean_x, rstd_x);
  row_stats<acc_t>(row, hg, G, mean, rstd_h);
  // Each gate column normalised (into x̂, ĥ: xp may be w.xhat itself, each column read before
  // it is written), scaled and shifted, in the unit's pass.
  auto xs = [&](int64_t k) FUSEDRNN_PASS {
    const acc_t xh = (static_cast<acc_t>(xp[k]) - mean_x) * rstd_x;
    if constexpr (kKeep) w.xhat[k] = xh;
    acc_t v = static_cast<acc_t>(g_ih[k]) * xh;
    return v + static_cast<acc_t>(b_ih[k]);  // (zeros without biases, as the LSTM's)
  };
  auto hs = [&](int64_t k) FUSEDRNN_PASS {
    const acc_t hh = (static_cast<acc_t>(hg[k]) - mean) * rstd_h;
    if constexpr (kKeep) w.hhat[k] = hh;
    acc_t v = static_cast<acc_t>(g_hh[k]) * hh;
    return v + static_cast<acc_t>(b_hh[k]);
  };
  row.each(H, [&](int64_t j) FUSEDRNN_PASS {
    const acc_t r = math::sigmoid(xs(j) + hs(j));
    const acc_t z = math::sigmoid(xs(H + j) + hs(H + j));
    const acc_t n = math::tanh(xs(2 * H + j) + r * hs(2 * H + j));
    const acc_t hp = static_cast<acc_t>(h_state[j]);
    if constexpr (kKeep) {
      w.h_prev[j] = hp;
      w.gates[j] = r;
      w.gates[H + j] = z;
      w.gates[2 * H + j] = n;
    }
    acc_t h = (acc_t(1) - z) * n + z * hp;
    if constexpr (kZone == kOn) {
      const acc_t d = static_cast<acc_t>(zh[j]);
      h = d * hp + (acc_t(1) - d) * h;
    }
    h_state[j] = static_cast<scalar_t>(h);
    h_out[j] = static_cast<scalar_t>(h);
  });
  if constexpr (kKeep) {
    row.once([&]() FUSEDRNN_PASS {
      w.stats[0] = rstd_x;
      w.stats[1] = rstd_h;
    });
  }
}

// Backward of one row of an LN-GRU step: dh (H) in: dL/dh_t, out: the direct part of
// dL/dh_{t-1} (z ⊙ dh; the W_hh part is a GEMM of dhg). Writes dx (3H, the gradient of the
// input product x W_ih^T, through the input side's LayerNorm) and dhg (3H, the gradient of
// h_{t-1} W_hh^T), and adds the row's terms of the gains' and biases' column sums to `sums`:
// with dxs the gradient of γ_ih x̂ + b_ih and dhs that of γ_hh ĥ + b_hh,
// [Σdxs 3H | Σdxs x̂ 3H | Σdhs 3H | Σdhs ĥ 3H].
template <int kZone, typename scalar_t, typename acc_t, typename Row>
FUSEDRNN_HD void gru_backward_row(const Row& row, int64_t H, const scalar_t* g_ih,
                                  const scalar_t* g_hh, const scalar_t* b_hh, acc_t* dh,
                                  const GRURow::Ptrs<acc_t>& w, acc_t* dx, acc_t* dhg, acc_t* sums,
                                  const scalar_t* zh) {
  const acc_t one(1);
  acc_t* const dxs = dx;   // dxs first, then turned into dx in place
  acc_t* const dhs = dhg;  // dhs first, then dhg in place
  row.each(H, [&](int64_t j) FUSEDRNN_PASS {
    const acc_t r = w.gates[j], z = w.gates[H + j], n = w.gates[2 * H + j];
    acc_t hn = static_cast<acc_t>(g_hh[2 * H + j]) * w.hhat[2 * H + j];
    hn += static_cast<acc_t>(b_hh[2 * H + j]);
    const acc_t g = dh[j];
    acc_t d = g, carry = 0;  // the cell's part of dL/dh_t, and the previous state's
    if constexpr (kZone == kOn) {
      const acc_t dz = static_cast<acc_t>(zh[j]);
      d = (one - dz) * g;
      carry = dz * g;
    }
    const acc_t dan = d * (one - z) * (one - n * n);
    const acc_t dar = dan * hn * r * (one - r);
    const acc_t daz = d * (w.h_prev[j] - n) * z * (one - z);
    dxs[j] = dar;
    dxs[H + j] = daz;
    dxs[2 * H + j] = dan;
    dhs[j] = dar;
    dhs[H + j] = daz;
    dhs[2 * H + j] = dan * r;
    dh[j] = kZone == kOn ? d * z + carry : d * z;
  });
  const int64_t G = 3 * H;
  acc_t* const s_dxs = sums;
  acc_t* const s_dxs_x = sums + G;
  acc_t* const s_dhs = sums + 2 * G;
  acc_t* const s_dhs_h = sums + 3 * G;
  row.each(G, [&](int64_t k) FUSEDRNN_PASS {
    const acc_t a = dxs[k], b = dhs[k];
    s_dxs[k] += a;
    s_dxs_x[k] += a * w.xhat[k];
    s_dhs[k] += b;
    s_dhs_h[k] += b * w.hhat[k];
    dxs[k] = a * static_cast<acc_t>(g_ih[k]);  // dL/dx̂
    dhs[k] = b * static_cast<acc_t>(g_hh[k]);  // dL/dĥ
  });
  norm_backward<acc_t>(row, dhg, w.hhat, w.stats[1], G, dhg);
  norm_backward<acc_t>(row, dx, w.xhat, w.stats[0], G, dx);
}

}  // namespace layer_norm
FUSEDRNN_ISA_END
}  // namespace fusedrnn
