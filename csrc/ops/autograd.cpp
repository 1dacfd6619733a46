// The autograd of the layer ops: the kernel of every `<cell>_forward` op at the Autograd key.
//
// One autograd per op family, for every caller: eager calls, torch.compile (AOTAutograd traces
// this node's forward and backward on fake tensors), torch.export, torch.jit.trace (the trace
// records the forward op; on replay this kernel decides again) and opcheck all go through it.
// A C++ node rather than a Python autograd kernel because entering Python costs tens of
// microseconds per call, as much as a cell step's arithmetic at serving sizes
// (scripts/profile_cell_call.py).
//
// - No gradient to record (no_grad, or nothing requires one): the forward op runs below the
//   Autograd key, with a workspace only if the caller asked for it (`need_workspace`), and no
//   node is made.
// - Otherwise a torch::autograd::Function: its forward runs the forward op below the Autograd
//   key with the workspace, its backward the backward op. The workspace is returned too, marked
//   non-differentiable.
// - A differentiable backward (create_graph=True): the fused backward op has no derivative of
//   its own, so the node's backward then calls `_differentiable_backward`, whose kernel
//   (fusedrnn/_ops.py) recomputes the layer with the reference equations and differentiates
//   them with create_graph=True (design.md §3, "Autograd").
// - Zoneout's weights (zoneout_c, zoneout_h) are saved and passed to the backward as they are:
//   no gradient reaches them (masks and rates are not parameters).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/kernels.h"

namespace fusedrnn {
namespace driver {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
Tensor value(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
bool wants_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool wants_grad(const OptTensor& t) { return t.has_value() && wants_grad(*t); }

template <typename... Ts>
bool any_wants_grad(const Ts&... ts) {
  return (wants_grad(ts) || ...);
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const std::string& name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(("fusedrnn::" + name).c_str(), "")
      .template typed<Sig>();
}

// Which of the forward's first `n` arguments need a gradient. The node has an edge for each
// defined tensor argument, in order (absent optionals have none); `args` are those arguments
// as saved, absent ones undefined.
std::vector<bool> needs_grad(const AutogradContext* ctx, const variable_list& args, size_t n) {
  std::vector<bool> needs(n, false);
  size_t edge = 0;
  for (size_t i = 0; i < n; ++i) {
    if (args[i].defined()) needs[i] = ctx->needs_input_grad(edge++);
  }
  return needs;
}

using DifferentiableBackwardSig = std::vector<Tensor>(const std::string&,
                                                      const std::vector<OptTensor>&,
                                                      const std::vector<OptTensor>&, bool,
                                                      const std::vector<bool>&);

// The first-order gradients of the layer as a differentiable graph (create_graph=True):
// `grads` flow into the forward's differentiable outputs, `args` are its saved tensor arguments
// (batch_sizes, then the zoneout weights, last). Returns one tensor per argument (undefined where
// `needs` is false) and `n_total` entries in all, as a node's backward returns.
variable_list differentiable_backward(const char* cell, const variable_list& grads,
                                      const variable_list& args, bool reverse,
                                      const std::vector<bool>& needs, size_t n_total) {
  static const auto op = find_op<DifferentiableBackwardSig>("_differentiable_backward");
  std::vector<OptTensor> g, a;
  for (const Tensor& t : grads) g.push_back(opt(t));
  for (const Tensor& t : args) a.push_back(opt(t));
  const std::vector<Tensor> r = op.call(cell, g, a, reverse, needs);
  variable_list result(n_total);
  for (size_t i = 0; i < needs.size(); ++i) {
    if (needs[i]) result[i] = r[i];
  }
  return result;
}

// ---- the LSTM family ----------------------------------------------------------------------

using LstmForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
    bool, const OptTensor&, const OptTensor&);
using LstmBackwardSig =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
        const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
        const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
        const OptTensor&, const OptTensor&, const OptTensor&, bool, const Tensor&, const Tensor&,
        std::array<bool, 2>, const OptTensor&, const OptTensor&);

template <CellKind kCell>
const c10::TypedOperatorHandle<LstmForwardSig>& lstm_forward_op() {
  static const auto op = find_op<LstmForwardSig>(std::string(traits(kCell).name) + "_forward");
  return op;
}

template <CellKind kCell>
const c10::TypedOperatorHandle<LstmBackwardSig>& lstm_backward_op() {
  static const auto op = find_op<LstmBackwardSig>(std::string(traits(kCell).name) + "_backward");
  return op;
}

// Saved: the 10 tensor arguments (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
// weight_hr, hx, cx, batch_sizes; absent ones undefined), then the output and the workspace,
// then zoneout_c and zoneout_h.
template <CellKind kCell>
struct LSTMFamilyFunction : public torch::autograd::Function<LSTMFamilyFunction<kCell>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& w_ch, const OptTensor& w_hr, const OptTensor& hx,
                               const OptTensor& cx, const OptTensor& batch_sizes, bool reverse,
                               const OptTensor& zone_c, const OptTensor& zone_h) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, hy, cy, ws] =
        lstm_forward_op<kCell>().call(input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx,
                                      batch_sizes, reverse, true, zone_c, zone_h);
    ctx->save_for_backward({input, w_ih, w_hh, value(b_ih), value(b_hh), value(w_ch), value(w_hr),
                            value(hx), value(cx), value(batch_sizes), out, ws, value(zone_c),
                            value(zone_h)});
    ctx->saved_data["reverse"] = reverse;
    ctx->mark_non_differentiable({ws});
    ctx->set_materialize_grads(false);
    return {out, hy, cy, ws};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const std::vector<bool> needs = needs_grad(ctx, s, 9);
    const bool reverse = ctx->saved_data["reverse"].toBool();
    if (at::GradMode::is_enabled()) {  // create_graph=True
      variable_list args(s.begin(), s.begin() + 10);
      args.push_back(s[12]);
      args.push_back(s[13]);
      return differentiable_backward(traits(kCell).name, {grads[0], grads[1], grads[2]}, args,
                                     reverse, needs, 13);
    }
    at::AutoDispatchBelowADInplaceOrView below;
    const bool weights = needs[1] || needs[2] || needs[3] || needs[4] || needs[5] || needs[6];
    auto [g_in, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_ch, g_w_hr] =
        lstm_backward_op<kCell>().call(opt(grads[0]), opt(grads[1]), opt(grads[2]), s[0], s[1],
                                       s[2], opt(s[3]), opt(s[4]), opt(s[5]), opt(s[6]), opt(s[7]),
                                       opt(s[8]), opt(s[9]), reverse, s[10], s[11],
                                       {needs[0], weights}, opt(s[12]), opt(s[13]));
    const Tensor g[9] = {g_in, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_ch, g_w_hr, g_hx, g_cx};
    variable_list result(13);  // + batch_sizes, reverse, zoneout_c, zoneout_h: none
    for (size_t i = 0; i < 9; ++i) {
      if (needs[i]) result[i] = g[i];
    }
    return result;
  }
};

template <CellKind kCell>
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_autograd(
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
    const OptTensor& b_hh, const OptTensor& w_ch, const OptTensor& w_hr, const OptTensor& hx,
    const OptTensor& cx, const OptTensor& batch_sizes, bool reverse, bool need_workspace,
    const OptTensor& zone_c, const OptTensor& zone_h) {
  if (!(at::GradMode::is_enabled() &&
        any_wants_grad(input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx))) {
    at::AutoDispatchBelowADInplaceOrView below;
    return lstm_forward_op<kCell>().call(input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx,
                                         batch_sizes, reverse, need_workspace, zone_c, zone_h);
  }
  variable_list r = LSTMFamilyFunction<kCell>::apply(input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx,
                                                     cx, batch_sizes, reverse, zone_c, zone_h);
  return {r[0], r[1], r[2], r[3]};
}

// ---- the GRU ------------------------------------------------------------------------------

using GruForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const Tensor&, const OptTensor&,
                                                         const OptTensor&, const OptTensor&,
                                                         const OptTensor&, bool, bool,
                                                         const OptTensor&);
using GruBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, const Tensor&,
    const Tensor&, std::array<bool, 2>, const OptTensor&);

template <CellKind kCell>
const c10::TypedOperatorHandle<GruForwardSig>& gru_forward_op() {
  static const auto op = find_op<GruForwardSig>(std::string(traits(kCell).name) + "_forward");
  return op;
}

template <CellKind kCell>
const c10::TypedOperatorHandle<GruBackwardSig>& gru_backward_op() {
  static const auto op = find_op<GruBackwardSig>(std::string(traits(kCell).name) + "_backward");
  return op;
}

// Saved: the 7 tensor arguments (input, weight_ih, weight_hh, bias_ih, bias_hh, hx,
// batch_sizes), then the output and the workspace, then zoneout_h.
template <CellKind kCell>
struct GRUFamilyFunction : public torch::autograd::Function<GRUFamilyFunction<kCell>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& hx, const OptTensor& batch_sizes, bool reverse,
                               const OptTensor& zone_h) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, hy, ws] = gru_forward_op<kCell>().call(input, w_ih, w_hh, b_ih, b_hh, hx,
                                                      batch_sizes, reverse, true, zone_h);
    ctx->save_for_backward({input, w_ih, w_hh, value(b_ih), value(b_hh), value(hx),
                            value(batch_sizes), out, ws, value(zone_h)});
    ctx->saved_data["reverse"] = reverse;
    ctx->mark_non_differentiable({ws});
    ctx->set_materialize_grads(false);
    return {out, hy, ws};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const std::vector<bool> needs = needs_grad(ctx, s, 6);
    const bool reverse = ctx->saved_data["reverse"].toBool();
    if (at::GradMode::is_enabled()) {  // create_graph=True
      variable_list args(s.begin(), s.begin() + 7);
      args.push_back(s[9]);
      return differentiable_backward(traits(kCell).name, {grads[0], grads[1]}, args, reverse, needs,
                                     9);
    }
    at::AutoDispatchBelowADInplaceOrView below;
    const bool weights = needs[1] || needs[2] || needs[3] || needs[4];
    auto [g_in, g_hx, g_w_ih, g_w_hh, g_b_ih, g_b_hh] = gru_backward_op<kCell>().call(
        opt(grads[0]), opt(grads[1]), s[0], s[1], s[2], opt(s[3]), opt(s[4]), opt(s[5]), opt(s[6]),
        reverse, s[7], s[8], {needs[0], weights}, opt(s[9]));
    const Tensor g[6] = {g_in, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_hx};
    variable_list result(9);  // + batch_sizes, reverse, zoneout_h: none
    for (size_t i = 0; i < 6; ++i) {
      if (needs[i]) result[i] = g[i];
    }
    return result;
  }
};

template <CellKind kCell>
std::tuple<Tensor, Tensor, Tensor> gru_forward_autograd(const Tensor& input, const Tensor& w_ih,
                                                        const Tensor& w_hh, const OptTensor& b_ih,
                                                        const OptTensor& b_hh, const OptTensor& hx,
                                                        const OptTensor& batch_sizes, bool reverse,
                                                        bool need_workspace,
                                                        const OptTensor& zone_h) {
  if (!(at::GradMode::is_enabled() && any_wants_grad(input, w_ih, w_hh, b_ih, b_hh, hx))) {
    at::AutoDispatchBelowADInplaceOrView below;
    return gru_forward_op<kCell>().call(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse,
                                        need_workspace, zone_h);
  }
  variable_list r = GRUFamilyFunction<kCell>::apply(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes,
                                                    reverse, zone_h);
  return {r[0], r[1], r[2]};
}

template <int... kIndex>
void register_autograd(torch::Library& m, std::integer_sequence<int, kIndex...>) {
  auto one = [&](auto tag) {
    constexpr CellKind kCell = decltype(tag)::value;
    const std::string name = std::string(traits(kCell).name) + "_forward";
    if constexpr (traits(kCell).has_cell_state) {
      m.impl(name.c_str(), &lstm_forward_autograd<kCell>);
    } else {
      m.impl(name.c_str(), &gru_forward_autograd<kCell>);
    }
  };
  (one(CellTag<static_cast<CellKind>(kIndex)>{}), ...);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, Autograd, m) {
  register_autograd(m, std::make_integer_sequence<int, kNumCells>{});
}

}  // namespace driver
}  // namespace fusedrnn
