// The layer-normalised LSTM and GRU (design.md §1.6): one layer, one direction, forward and
// backward, on the CPU, as the ops layer_norm_lstm_* / layer_norm_gru_* of ops/schemas.cpp.
//
// Per call: the input product x W_ih^T of every row in one GEMM, normalised row by row (it does
// not depend on the recurrence). Per step: the recurrent product h_{t-1} W_hh^T (one GEMM through
// the call's StepDevice, as the other cells' GemmStep loops) and then ONE fused pass per row
// (cells/layer_norm.h) that takes the row statistics of that product, the gates, c_t, the
// statistics of c_t and h_t; with a projection, its GEMM. The backward mirrors it: per step one
// fused pass per row (the LayerNorm backwards inside it) and the GEMM of dh_{t-1}; after the
// loop the input side's LayerNorm backward and the weight gradients, as whole-call GEMMs and
// column sums.
//
// Rows of the state and of the workspace follow recurrence/steps.h: step t runs rows
// [0, n[t]) of the state and rows [off[t], off[t] + n[t]) of the input, output and workspace.
// The workspace keeps each row's state before its step (h_prev, c_prev), so the backward needs
// no bookkeeping of where a packed row's previous state came from.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "buffers.h"
#include "cells/layer_norm.h"
#include "execution/gemm.h"
#include "execution/step_device.h"
#include "ops/args.h"
#include "steps.h"

namespace fusedrnn {
namespace driver {
namespace {

using c10::optional;
namespace ln = fusedrnn::layer_norm;

// The workspace: one flat buffer of the op-math type, blocks of `rows` rows one after the other,
// block i of widths[i] columns.
struct Blocks {
  std::vector<int64_t> widths;
  int64_t row_values() const {
    int64_t w = 0;
    for (int64_t x : widths) w += x;
    return w;
  }
  // element offset of row r of block i in a buffer of `rows` rows
  int64_t at(size_t i, int64_t rows, int64_t r) const {
    int64_t off = 0;
    for (size_t k = 0; k < i; ++k) off += widths[k] * rows;
    return off + r * widths[i];
  }
};

enum LSTMBlock : size_t { kXhat, kHhat, kGates, kCPrev, kC, kChat, kHPrev, kR, kLSTMStats };
enum GRUBlock : size_t { kGXhat, kGHhat, kGGates, kGHPrev, kGRUStats };

Blocks lstm_blocks(int64_t H, int64_t Hout, bool proj) {
  return {{4 * H, 4 * H, 4 * H, H, H, H, Hout, proj ? H : 0, 3}};
}
Blocks gru_blocks(int64_t H) { return {{3 * H, 3 * H, 3 * H, H, 2}}; }

// Rows per task of the row loops: enough columns of work per task to repay a task.
int64_t row_grain(int64_t G) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(G, 1)); }

at::ScalarType acc_dtype(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

void check_cpu(const char* op, const Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor (the fused ",
              "layer-normalised cells run on the CPU; fusedrnn's modules run the reference ",
              "equations on other devices), got ", input.device());
}

void check_gain(const char* op, const char* name, const Tensor& t, const Tensor& input, int64_t n) {
  check_tensor(op, name, t, input, {n});
}

// The input side, for every row: xhat = (x W_ih^T - mean) * rstd per row, into the workspace
// block `xhat` (N x G) and column 0 of `stats`.
template <typename scalar_t, typename acc_t>
void normalise_input(const Tensor& x, const Tensor& w_ih, int64_t G, acc_t* xhat, acc_t* stats,
                     int64_t stats_cols) {
  const Tensor xp = at::mm(x, w_ih.t()).contiguous();
  const scalar_t* p = xp.const_data_ptr<scalar_t>();
  const int64_t N = xp.size(0);
  at::parallel_for(0, N, row_grain(G), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      acc_t mean, rstd;
      ln::row_stats<acc_t>(p + r * G, G, mean, rstd);
      acc_t* out = xhat + r * G;
      for (int64_t k = 0; k < G; ++k) out[k] = (static_cast<acc_t>(p[r * G + k]) - mean) * rstd;
      stats[r * stats_cols] = rstd;
    }
  });
}

// The input side's backward: dxp = the gradient of x W_ih^T from g = dL/d(γ_ih x̂) (N x G),
// row by row through x̂'s normalisation.
template <typename acc_t>
Tensor input_side_backward(const Tensor& g, const Tensor& g_ih, const acc_t* xhat,
                           const acc_t* stats, int64_t stats_cols) {
  const Tensor dxhat = (g * g_ih.to(g.scalar_type())).contiguous();
  const int64_t N = dxhat.size(0), G = dxhat.size(1);
  acc_t* d = dxhat.data_ptr<acc_t>();
  at::parallel_for(0, N, row_grain(G), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      ln::norm_backward<acc_t>(d + r * G, xhat + r * G, stats[r * stats_cols], G, d + r * G);
    }
  });
  return dxhat;
}

Tensor none_like(const Tensor& input) { return at::empty({0}, input.options()); }

// Block i of the workspace as an (N, width) matrix.
Tensor block_of(const Tensor& ws, const Blocks& blocks, size_t i, int64_t N) {
  return ws.narrow(0, blocks.at(i, N, 0), N * blocks.widths[i]).view({N, blocks.widths[i]});
}

// grad_input and grad_weight_ih (as output_mask asks) from g = dL/d(γ_ih x̂), every row.
template <typename acc_t>
void input_side_grads(const Tensor& g, const Tensor& g_ih, const Tensor& ws, const Blocks& blocks,
                      size_t xhat, size_t stats, const Tensor& input, const Tensor& w_ih,
                      std::array<bool, 2> mask, Tensor& grad_input, Tensor& grad_w_ih) {
  if (!mask[0] && !mask[1]) return;
  const int64_t N = g.size(0);
  const acc_t* w = ws.const_data_ptr<acc_t>();
  const Tensor dxp = input_side_backward<acc_t>(g, g_ih, w + blocks.at(xhat, N, 0),
                                                w + blocks.at(stats, N, 0), blocks.widths[stats]);
  const auto dt = input.scalar_type();
  if (mask[0]) grad_input = at::mm(dxp, w_ih.to(g.scalar_type())).to(dt).view(input.sizes());
  if (mask[1]) {
    grad_w_ih = at::mm(dxp.t(), input.reshape({N, input.size(-1)}).to(g.scalar_type())).to(dt);
  }
}

// The gradients of a call of no step (no rows): zeros, as autograd gives. `weights` pairs each
// weight gradient with its parameter (null where the parameter is absent).
void zero_grads(std::array<bool, 2> mask, const Tensor& input, Tensor& grad_input,
                const std::vector<std::pair<Tensor*, const Tensor*>>& weights) {
  if (mask[0]) grad_input = at::zeros(input.sizes(), input.options());
  if (!mask[1]) return;
  for (const auto& [grad, param] : weights) {
    if (param) *grad = at::zeros(param->sizes(), input.options());
  }
}

const Tensor* opt_param(const optional<Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// ---- LSTM ---------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> ln_lstm_forward(
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh, const Tensor& g_ih, const Tensor& g_hh, const Tensor& g_c,
    const Tensor& b_c, const optional<Tensor>& w_hr, const optional<Tensor>& hx,
    const optional<Tensor>& cx, const optional<Tensor>& batch_sizes, bool reverse,
    bool need_workspace) {
  const char* op = "layer_norm_lstm_forward";
  check_cpu(op, input);
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(CellKind::kLSTM, input, w_ih, w_hh, b_ih, b_hh, {}, w_hr, hx, cx, s);
  const int64_t H = d.H, Hout = d.Hout, G = 4 * H;
  const bool proj = w_hr.has_value();
  check_gain(op, "ln_weight_ih", g_ih, input, G);
  check_gain(op, "ln_weight_hh", g_hh, input, G);
  check_gain(op, "ln_weight_c", g_c, input, H);
  check_gain(op, "ln_bias_c", b_c, input, H);
  const auto opts = input.options();
  const at::ScalarType acc_st = acc_dtype(input.scalar_type());
  const auto acc_opts = opts.dtype(acc_st);
  const Blocks blocks = lstm_blocks(H, Hout, proj);
  const Tensor ws = at::empty({s.N * blocks.row_values()}, acc_opts);
  const Tensor output = at::empty(out_shape(input, Hout), opts);
  const Tensor h_state = state_or_zeros(hx, input, s.B, Hout);
  const Tensor c_state =
      cx.has_value() ? cx->to(acc_st).contiguous().clone() : at::zeros({s.B, H}, acc_opts);
  const Tensor hg = at::empty({s.B, G}, opts);
  const Tensor r_buf = proj ? at::empty({s.B, H}, opts) : Tensor();
  const Tensor bias =
      b_ih.has_value() ? bias_sum(b_ih->contiguous(), b_hh->contiguous()) : Tensor();
  const Tensor w_hh_c = w_hh.contiguous(), w_hr_c = proj ? w_hr->contiguous() : Tensor();
  const Tensor gi = g_ih.contiguous(), gh = g_hh.contiguous(), gc = g_c.contiguous(),
               bc = b_c.contiguous();
  const StepDevice dev(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "layer_norm_lstm_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (s.N == 0) return;
        acc_t* const w = ws.data_ptr<acc_t>();
        const int64_t N = s.N;
        normalise_input<scalar_t, acc_t>(input.reshape({N, d.I}), w_ih, G,
                                         w + blocks.at(kXhat, N, 0),
                                         w + blocks.at(kLSTMStats, N, 0), 3);
        scalar_t* const out = output.data_ptr<scalar_t>();
        scalar_t* const hs = h_state.data_ptr<scalar_t>();
        acc_t* const cs = c_state.data_ptr<acc_t>();
        scalar_t* const hgp = hg.data_ptr<scalar_t>();
        scalar_t* const rp = proj ? r_buf.data_ptr<scalar_t>() : nullptr;
        const scalar_t* const bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
        for (int64_t k = 0; k < s.T; ++k) {
          const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
          dev.gemm(n, G, Hout, hs, Hout, false, w_hh_c.const_data_ptr<scalar_t>(), Hout, true, hgp,
                   G, 0.0f);
          at::parallel_for(0, n, row_grain(G), [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t r = r0 + b;
              ln::LSTMRow::Ptrs<acc_t> p{
                  w + blocks.at(kXhat, N, r),     w + blocks.at(kHhat, N, r),
                  w + blocks.at(kGates, N, r),    w + blocks.at(kCPrev, N, r),
                  w + blocks.at(kC, N, r),        w + blocks.at(kChat, N, r),
                  w + blocks.at(kHPrev, N, r),    proj ? w + blocks.at(kR, N, r) : nullptr,
                  w + blocks.at(kLSTMStats, N, r)};
              ln::lstm_forward_row<scalar_t, acc_t>(
                  H, Hout, hgp + b * G, hs + b * Hout, gi.const_data_ptr<scalar_t>(),
                  gh.const_data_ptr<scalar_t>(), bp, gc.const_data_ptr<scalar_t>(),
                  bc.const_data_ptr<scalar_t>(), cs + b * H, p, proj ? rp + b * H : out + r * Hout,
                  proj ? nullptr : hs + b * Hout);
            }
          });
          if (proj) {
            dev.gemm(n, Hout, H, rp, H, false, w_hr_c.const_data_ptr<scalar_t>(), H, true,
                     out + r0 * Hout, Hout, 0.0f);
            dev.copy(hs, out + r0 * Hout, n * Hout);
          }
        }
      });
  return {output, h_state, c_state.to(input.scalar_type()),
          need_workspace ? ws : at::empty({0}, acc_opts)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor>
ln_lstm_backward(const optional<Tensor>& grad_output, const optional<Tensor>& grad_hy,
                 const optional<Tensor>& grad_cy, const Tensor& input, const Tensor& w_ih,
                 const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                 const Tensor& g_ih, const Tensor& g_hh, const Tensor& g_c, const Tensor& b_c,
                 const optional<Tensor>& w_hr, const optional<Tensor>& hx,
                 const optional<Tensor>& cx, const optional<Tensor>& batch_sizes, bool reverse,
                 const Tensor& workspace, std::array<bool, 2> output_mask) {
  const char* op = "layer_norm_lstm_backward";
  check_cpu(op, input);
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(CellKind::kLSTM, input, w_ih, w_hh, b_ih, b_hh, {}, w_hr, hx, cx, s);
  const int64_t H = d.H, Hout = d.Hout, G = 4 * H, N = s.N;
  const bool proj = w_hr.has_value();
  check_gain(op, "ln_weight_ih", g_ih, input, G);
  check_gain(op, "ln_weight_hh", g_hh, input, G);
  check_gain(op, "ln_weight_c", g_c, input, H);
  check_gain(op, "ln_bias_c", b_c, input, H);
  const auto opts = input.options();
  const at::ScalarType acc_st = acc_dtype(input.scalar_type());
  const auto acc_opts = opts.dtype(acc_st);
  const Blocks blocks = lstm_blocks(H, Hout, proj);
  TORCH_CHECK(workspace.dim() == 1 && workspace.numel() == N * blocks.row_values() &&
                  workspace.scalar_type() == acc_st && workspace.is_contiguous(),
              op, ": workspace must be the contiguous (", N * blocks.row_values(), ",) ", acc_st,
              " tensor returned by the forward, got ", workspace.scalar_type(), " of shape ",
              workspace.sizes());
  const bool has_dy = grad_output.has_value() && grad_output->defined();
  if (has_dy) check_tensor(op, "grad_output", *grad_output, input, out_shape(input, Hout));
  check_opt(op, "grad_hy", grad_hy, input, {s.B, Hout});
  check_opt(op, "grad_cy", grad_cy, input, {s.B, H});
  auto acc_state = [&](const optional<Tensor>& g, int64_t cols) {
    return (g.has_value() && g->defined()) ? g->to(acc_st).contiguous().clone()
                                           : at::zeros({s.B, cols}, acc_opts);
  };
  const Tensor dh_state = acc_state(grad_hy, Hout), dc_state = acc_state(grad_cy, H);
  const Tensor dy = has_dy ? grad_output->reshape({N, Hout}).to(acc_st).contiguous() : Tensor();
  const Tensor da = at::empty({N, G}, acc_opts), dhg = at::empty({N, G}, acc_opts),
               dyc = at::empty({N, H}, acc_opts);
  const Tensor dho = proj ? at::empty({N, Hout}, acc_opts) : Tensor();
  const Tensor dr = proj ? at::empty({s.B, H}, acc_opts) : Tensor();
  const Tensor w_hh_a = w_hh.to(acc_st).contiguous();
  const Tensor w_hr_a = proj ? w_hr->to(acc_st).contiguous() : Tensor();
  const Tensor gh = g_hh.contiguous(), gc = g_c.contiguous(), bc = b_c.contiguous();
  const StepDevice dev(dh_state);
  Tensor grad_input = none_like(input), grad_w_ih = none_like(input), grad_w_hh = none_like(input),
         grad_b_ih = none_like(input), grad_b_hh = none_like(input), grad_g_ih = none_like(input),
         grad_g_hh = none_like(input), grad_g_c = none_like(input), grad_b_c = none_like(input),
         grad_w_hr = none_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "layer_norm_lstm_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (N == 0) return;
        acc_t* const w = workspace.data_ptr<acc_t>();
        acc_t* const dhs = dh_state.data_ptr<acc_t>();
        acc_t* const dcs = dc_state.data_ptr<acc_t>();
        const acc_t* const dyp = has_dy ? dy.const_data_ptr<acc_t>() : nullptr;
        acc_t* const dap = da.data_ptr<acc_t>();
        acc_t* const dhgp = dhg.data_ptr<acc_t>();
        acc_t* const dycp = dyc.data_ptr<acc_t>();
        acc_t* const drp = proj ? dr.data_ptr<acc_t>() : nullptr;
        for (int64_t k = s.T - 1; k >= 0; --k) {
          const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
          if (dyp) {
            const acc_t* src = dyp + r0 * Hout;
            for (int64_t i = 0; i < n * Hout; ++i) dhs[i] += src[i];
          }
          if (proj) {
            dev.copy(dho.data_ptr<acc_t>() + r0 * Hout, dhs, n * Hout);
            dev.gemm(n, H, Hout, dhs, Hout, false, w_hr_a.const_data_ptr<acc_t>(), H, false, drp, H,
                     0.0f);
          }
          const acc_t* const dh_in = proj ? drp : dhs;
          at::parallel_for(0, n, row_grain(G), [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t r = r0 + b;
              ln::LSTMRow::Ptrs<acc_t> p{
                  w + blocks.at(kXhat, N, r),     w + blocks.at(kHhat, N, r),
                  w + blocks.at(kGates, N, r),    w + blocks.at(kCPrev, N, r),
                  w + blocks.at(kC, N, r),        w + blocks.at(kChat, N, r),
                  w + blocks.at(kHPrev, N, r),    proj ? w + blocks.at(kR, N, r) : nullptr,
                  w + blocks.at(kLSTMStats, N, r)};
              ln::lstm_backward_row<scalar_t, acc_t>(
                  H, dh_in + b * H, gh.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                  bc.const_data_ptr<scalar_t>(), dcs + b * H, p, dap + r * G, dycp + r * H,
                  dhgp + r * G);
            }
          });
          dev.gemm(n, Hout, G, dhgp + r0 * G, G, false, w_hh_a.const_data_ptr<acc_t>(), Hout, false,
                   dhs, Hout, 0.0f);
        }
        auto block = [&](size_t i) { return block_of(workspace, blocks, i, N); };
        input_side_grads<acc_t>(da, g_ih, workspace, blocks, kXhat, kLSTMStats, input, w_ih,
                                output_mask, grad_input, grad_w_ih);
        if (output_mask[1]) {
          const auto dt = input.scalar_type();
          grad_w_hh = at::mm(dhg.t(), block(kHPrev)).to(dt);
          if (b_ih.has_value()) {
            grad_b_ih = da.sum(0).to(dt);
            grad_b_hh = grad_b_ih.clone();
          }
          grad_g_ih = (da * block(kXhat)).sum(0).to(dt);
          grad_g_hh = (da * block(kHhat)).sum(0).to(dt);
          grad_g_c = (dyc * block(kChat)).sum(0).to(dt);
          grad_b_c = dyc.sum(0).to(dt);
          if (proj) grad_w_hr = at::mm(dho.t(), block(kR)).to(dt);
        }
      });
  if (N == 0) {
    zero_grads(output_mask, input, grad_input,
               {{&grad_w_ih, &w_ih},
                {&grad_w_hh, &w_hh},
                {&grad_b_ih, opt_param(b_ih)},
                {&grad_b_hh, opt_param(b_hh)},
                {&grad_g_ih, &g_ih},
                {&grad_g_hh, &g_hh},
                {&grad_g_c, &g_c},
                {&grad_b_c, &b_c},
                {&grad_w_hr, opt_param(w_hr)}});
  }
  return {grad_input,
          dh_state.to(input.scalar_type()),
          dc_state.to(input.scalar_type()),
          grad_w_ih,
          grad_w_hh,
          grad_b_ih,
          grad_b_hh,
          grad_g_ih,
          grad_g_hh,
          grad_g_c,
          grad_b_c,
          grad_w_hr};
}

// ---- GRU ----------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> ln_gru_forward(const Tensor& input, const Tensor& w_ih,
                                                  const Tensor& w_hh, const optional<Tensor>& b_ih,
                                                  const optional<Tensor>& b_hh, const Tensor& g_ih,
                                                  const Tensor& g_hh, const optional<Tensor>& hx,
                                                  const optional<Tensor>& batch_sizes, bool reverse,
                                                  bool need_workspace) {
  const char* op = "layer_norm_gru_forward";
  check_cpu(op, input);
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(CellKind::kGRU, input, w_ih, w_hh, b_ih, b_hh, {}, {}, hx, {}, s);
  const int64_t H = d.H, G = 3 * H;
  check_gain(op, "ln_weight_ih", g_ih, input, G);
  check_gain(op, "ln_weight_hh", g_hh, input, G);
  const auto opts = input.options();
  const at::ScalarType acc_st = acc_dtype(input.scalar_type());
  const auto acc_opts = opts.dtype(acc_st);
  const Blocks blocks = gru_blocks(H);
  const Tensor ws = at::empty({s.N * blocks.row_values()}, acc_opts);
  const Tensor output = at::empty(out_shape(input, H), opts);
  const Tensor h_state = state_or_zeros(hx, input, s.B, H);
  const Tensor hg = at::empty({s.B, G}, opts);
  const Tensor bi = b_ih.has_value() ? b_ih->contiguous() : Tensor();
  const Tensor bh = b_hh.has_value() ? b_hh->contiguous() : Tensor();
  const Tensor w_hh_c = w_hh.contiguous(), gi = g_ih.contiguous(), gh = g_hh.contiguous();
  const StepDevice dev(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "layer_norm_gru_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (s.N == 0) return;
        acc_t* const w = ws.data_ptr<acc_t>();
        const int64_t N = s.N;
        normalise_input<scalar_t, acc_t>(input.reshape({N, d.I}), w_ih, G,
                                         w + blocks.at(kGXhat, N, 0),
                                         w + blocks.at(kGRUStats, N, 0), 2);
        scalar_t* const out = output.data_ptr<scalar_t>();
        scalar_t* const hs = h_state.data_ptr<scalar_t>();
        scalar_t* const hgp = hg.data_ptr<scalar_t>();
        const scalar_t* const bip = bi.defined() ? bi.const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* const bhp = bh.defined() ? bh.const_data_ptr<scalar_t>() : nullptr;
        for (int64_t k = 0; k < s.T; ++k) {
          const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
          dev.gemm(n, G, H, hs, H, false, w_hh_c.const_data_ptr<scalar_t>(), H, true, hgp, G, 0.0f);
          at::parallel_for(0, n, row_grain(G), [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t r = r0 + b;
              ln::GRURow::Ptrs<acc_t> p{w + blocks.at(kGXhat, N, r), w + blocks.at(kGHhat, N, r),
                                        w + blocks.at(kGGates, N, r), w + blocks.at(kGHPrev, N, r),
                                        w + blocks.at(kGRUStats, N, r)};
              ln::gru_forward_row<scalar_t, acc_t>(H, hgp + b * G, gi.const_data_ptr<scalar_t>(),
                                                   gh.const_data_ptr<scalar_t>(), bip, bhp,
                                                   hs + b * H, p, out + r * H);
            }
          });
        }
      });
  return {output, h_state, need_workspace ? ws : at::empty({0}, acc_opts)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_backward(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_hy, const Tensor& input,
    const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh, const Tensor& g_ih, const Tensor& g_hh,
    const optional<Tensor>& hx, const optional<Tensor>& batch_sizes, bool reverse,
    const Tensor& workspace, std::array<bool, 2> output_mask) {
  const char* op = "layer_norm_gru_backward";
  check_cpu(op, input);
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(CellKind::kGRU, input, w_ih, w_hh, b_ih, b_hh, {}, {}, hx, {}, s);
  const int64_t H = d.H, G = 3 * H, N = s.N;
  check_gain(op, "ln_weight_ih", g_ih, input, G);
  check_gain(op, "ln_weight_hh", g_hh, input, G);
  const auto opts = input.options();
  const at::ScalarType acc_st = acc_dtype(input.scalar_type());
  const auto acc_opts = opts.dtype(acc_st);
  const Blocks blocks = gru_blocks(H);
  TORCH_CHECK(workspace.dim() == 1 && workspace.numel() == N * blocks.row_values() &&
                  workspace.scalar_type() == acc_st && workspace.is_contiguous(),
              op, ": workspace must be the contiguous (", N * blocks.row_values(), ",) ", acc_st,
              " tensor returned by the forward, got ", workspace.scalar_type(), " of shape ",
              workspace.sizes());
  const bool has_dy = grad_output.has_value() && grad_output->defined();
  if (has_dy) check_tensor(op, "grad_output", *grad_output, input, out_shape(input, H));
  check_opt(op, "grad_hy", grad_hy, input, {s.B, H});
  const Tensor dh_state = (grad_hy.has_value() && grad_hy->defined())
                              ? grad_hy->to(acc_st).contiguous().clone()
                              : at::zeros({s.B, H}, acc_opts);
  const Tensor dy = has_dy ? grad_output->reshape({N, H}).to(acc_st).contiguous() : Tensor();
  const Tensor dxs = at::empty({N, G}, acc_opts), dhs = at::empty({N, G}, acc_opts),
               dhg = at::empty({N, G}, acc_opts);
  const Tensor w_hh_a = w_hh.to(acc_st).contiguous();
  const Tensor gh = g_hh.contiguous();
  const Tensor bh = b_hh.has_value() ? b_hh->contiguous() : Tensor();
  const StepDevice dev(dh_state);
  Tensor grad_input = none_like(input), grad_w_ih = none_like(input), grad_w_hh = none_like(input),
         grad_b_ih = none_like(input), grad_b_hh = none_like(input), grad_g_ih = none_like(input),
         grad_g_hh = none_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "layer_norm_gru_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (N == 0) return;
        acc_t* const w = workspace.data_ptr<acc_t>();
        acc_t* const dhsp = dh_state.data_ptr<acc_t>();
        const acc_t* const dyp = has_dy ? dy.const_data_ptr<acc_t>() : nullptr;
        acc_t* const dxsp = dxs.data_ptr<acc_t>();
        acc_t* const dhsb = dhs.data_ptr<acc_t>();
        acc_t* const dhgp = dhg.data_ptr<acc_t>();
        const scalar_t* const bhp = bh.defined() ? bh.const_data_ptr<scalar_t>() : nullptr;
        for (int64_t k = s.T - 1; k >= 0; --k) {
          const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
          if (dyp) {
            const acc_t* src = dyp + r0 * H;
            for (int64_t i = 0; i < n * H; ++i) dhsp[i] += src[i];
          }
          at::parallel_for(0, n, row_grain(G), [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t r = r0 + b;
              ln::GRURow::Ptrs<acc_t> p{w + blocks.at(kGXhat, N, r), w + blocks.at(kGHhat, N, r),
                                        w + blocks.at(kGGates, N, r), w + blocks.at(kGHPrev, N, r),
                                        w + blocks.at(kGRUStats, N, r)};
              ln::gru_backward_row<scalar_t, acc_t>(H, gh.const_data_ptr<scalar_t>(), bhp,
                                                    dhsp + b * H, p, dxsp + r * G, dhsb + r * G,
                                                    dhgp + r * G);
            }
          });
          dev.gemm(n, H, G, dhgp + r0 * G, G, false, w_hh_a.const_data_ptr<acc_t>(), H, false, dhsp,
                   H, 1.0f);
        }
        auto block = [&](size_t i) { return block_of(workspace, blocks, i, N); };
        input_side_grads<acc_t>(dxs, g_ih, workspace, blocks, kGXhat, kGRUStats, input, w_ih,
                                output_mask, grad_input, grad_w_ih);
        if (output_mask[1]) {
          const auto dt = input.scalar_type();
          grad_w_hh = at::mm(dhg.t(), block(kGHPrev)).to(dt);
          if (b_ih.has_value()) {
            grad_b_ih = dxs.sum(0).to(dt);
            grad_b_hh = dhs.sum(0).to(dt);
          }
          grad_g_ih = (dxs * block(kGXhat)).sum(0).to(dt);
          grad_g_hh = (dhs * block(kGHhat)).sum(0).to(dt);
        }
      });
  if (N == 0) {
    zero_grads(output_mask, input, grad_input,
               {{&grad_w_ih, &w_ih},
                {&grad_w_hh, &w_hh},
                {&grad_b_ih, opt_param(b_ih)},
                {&grad_b_hh, opt_param(b_hh)},
                {&grad_g_ih, &g_ih},
                {&grad_g_hh, &g_hh}});
  }
  return {grad_input, dh_state.to(input.scalar_type()),
          grad_w_ih,  grad_w_hh,
          grad_b_ih,  grad_b_hh,
          grad_g_ih,  grad_g_hh};
}

}  // namespace
}  // namespace driver

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("layer_norm_lstm_forward", &driver::ln_lstm_forward);
  m.impl("layer_norm_lstm_backward", &driver::ln_lstm_backward);
  m.impl("layer_norm_gru_forward", &driver::ln_gru_forward);
  m.impl("layer_norm_gru_backward", &driver::ln_gru_backward);
}

}  // namespace fusedrnn
