// The eager entry of the layer ops: `_<cell>_eager`, one op call per layer or cell call of an
// eager (not compiled, not traced) program, whose autograd is a C++ node.
//
// The forward ops of ops.cpp carry their autograd as a Python kernel (torch.library's
// register_autograd, in fusedrnn/_ops.py), which is what torch.compile, export and opcheck see.
// Entering a Python autograd kernel, or a Python torch.autograd.Function, costs tens of
// microseconds per call, forward and backward: at a cell's serving sizes as much as the step's
// arithmetic (scripts/profile_cell_call.py). The eager op runs the same forward and backward ops
// under a torch::autograd::Function instead: the forward op below the Autograd key, the node's
// backward the backward op, so that a training step is one op call forward and one C++ node
// backward. It computes exactly what the registered autograd computes (tests/test_eager_path.py).
//
// - Without a gradient to record (no_grad, or nothing requires one) the forward op runs below
//   the Autograd key without a workspace, and no node is made.
// - `exposed`: the output is handed to the caller; with a graph it is then a copy of the tensor
//   the backward saves, so that an in-place operation on it does not invalidate the backward.
// - A differentiable backward (create_graph=True) recomputes the layer through the forward op as
//   registered, whose autograd differentiates the reference equations, and differentiates that.
//
// fusedrnn/_layer.py calls these ops only for plain tensors outside torch.compile / export /
// torch.jit.trace, without autocast or a torch function mode; torch.func transforms run the
// reference (a C++ autograd Function is not supported under them).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../kernels.h"

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

// The first-order gradients of `outputs` (with `grads`, undefined where none flows in) with
// respect to the first `n` saved arguments that need one, as a differentiable graph: `outputs`
// are those of the forward op as registered, recomputed from the saved arguments in grad mode.
// Unused arguments get zeros, as the fused backward gives.
variable_list differentiable_grads(const std::vector<Tensor>& outputs, const variable_list& grads,
                                   const variable_list& args, const std::vector<bool>& needs,
                                   size_t n_total) {
  std::vector<Tensor> outs, gouts, wrt;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (grads[i].defined()) {
      outs.push_back(outputs[i]);
      gouts.push_back(grads[i]);
    }
  }
  std::vector<size_t> index;
  for (size_t i = 0; i < needs.size(); ++i) {
    if (needs[i]) {
      wrt.push_back(args[i]);
      index.push_back(i);
    }
  }
  variable_list result(n_total);
  if (wrt.empty()) return result;
  variable_list g;
  if (!outs.empty()) {
    g = torch::autograd::grad(outs, wrt, gouts, /*retain_graph=*/true, /*create_graph=*/true,
                              /*allow_unused=*/true);
  } else {
    g.resize(wrt.size());
  }
  for (size_t j = 0; j < index.size(); ++j) {
    result[index[j]] = g[j].defined() ? g[j] : at::zeros_like(args[index[j]]);
  }
  return result;
}

// ---- the LSTM family ----------------------------------------------------------------------

using LstmForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    bool, bool);
using LstmBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                   Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, bool, const Tensor&, const Tensor&,
    std::array<bool, 2>);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* cell, const char* suffix) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("fusedrnn::") + cell + suffix).c_str(), "")
      .template typed<Sig>();
}

template <CellKind kCell>
const c10::TypedOperatorHandle<LstmForwardSig>& lstm_forward_op() {
  static const auto op = find_op<LstmForwardSig>(traits(kCell).name, "_forward");
  return op;
}

template <CellKind kCell>
const c10::TypedOperatorHandle<LstmBackwardSig>& lstm_backward_op() {
  static const auto op = find_op<LstmBackwardSig>(traits(kCell).name, "_backward");
  return op;
}

// Saved: the 10 tensor arguments (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
// weight_hr, hx, cx, batch_sizes; absent ones undefined), then the output and the workspace.
template <CellKind kCell>
struct EagerLSTMFamily : public torch::autograd::Function<EagerLSTMFamily<kCell>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& w_ch, const OptTensor& w_hr, const OptTensor& hx,
                               const OptTensor& cx, const OptTensor& batch_sizes, bool reverse) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, hy, cy, ws] = lstm_forward_op<kCell>().call(
        input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx, batch_sizes, reverse, true);
    ctx->save_for_backward({input, w_ih, w_hh, value(b_ih), value(b_hh), value(w_ch),
                            value(w_hr), value(hx), value(cx), value(batch_sizes), out, ws});
    ctx->saved_data["reverse"] = reverse;
    ctx->set_materialize_grads(false);
    return {out, hy, cy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const std::vector<bool> needs = needs_grad(ctx, s, 10);
    const bool reverse = ctx->saved_data["reverse"].toBool();
    if (at::GradMode::is_enabled()) {  // create_graph=True
      auto [out, hy, cy, ws] = lstm_forward_op<kCell>().call(
          s[0], s[1], s[2], opt(s[3]), opt(s[4]), opt(s[5]), opt(s[6]), opt(s[7]), opt(s[8]),
          opt(s[9]), reverse, true);
      return differentiable_grads({out, hy, cy}, grads, s, needs, 11);
    }
    at::AutoDispatchBelowADInplaceOrView below;
    const bool weights = needs[1] || needs[2] || needs[3] || needs[4] || needs[5] || needs[6];
    auto [g_in, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_ch, g_w_hr] =
        lstm_backward_op<kCell>().call(opt(grads[0]), opt(grads[1]), opt(grads[2]), s[0], s[1],
                                       s[2], opt(s[3]), opt(s[4]), opt(s[5]), opt(s[6]),
                                       opt(s[7]), opt(s[8]), opt(s[9]), reverse, s[10], s[11],
                                       {needs[0], weights});
    const Tensor g[9] = {g_in, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_ch, g_w_hr, g_hx, g_cx};
    variable_list result(11);  // + batch_sizes, reverse: none
    for (size_t i = 0; i < 9; ++i) {
      if (needs[i]) result[i] = g[i];
    }
    return result;
  }
};

template <CellKind kCell>
std::tuple<Tensor, Tensor, Tensor> lstm_eager(const Tensor& input, const Tensor& w_ih,
                                              const Tensor& w_hh, const OptTensor& b_ih,
                                              const OptTensor& b_hh, const OptTensor& w_ch,
                                              const OptTensor& w_hr, const OptTensor& hx,
                                              const OptTensor& cx,
                                              const OptTensor& batch_sizes, bool reverse,
                                              bool exposed) {
  if (!(at::GradMode::is_enabled() &&
        any_wants_grad(input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx))) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, hy, cy, ws] = lstm_forward_op<kCell>().call(
        input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx, batch_sizes, reverse, false);
    return {out, hy, cy};
  }
  variable_list r = EagerLSTMFamily<kCell>::apply(input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx,
                                                  cx, batch_sizes, reverse);
  return {exposed ? r[0].clone() : r[0], r[1], r[2]};
}

// ---- the GRU ------------------------------------------------------------------------------

using GruForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const Tensor&, const OptTensor&,
                                                         const OptTensor&, const OptTensor&,
                                                         const OptTensor&, bool, bool);
using GruBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, const Tensor&,
    const Tensor&, std::array<bool, 2>);

const c10::TypedOperatorHandle<GruForwardSig>& gru_forward_op() {
  static const auto op = find_op<GruForwardSig>("gru", "_forward");
  return op;
}

const c10::TypedOperatorHandle<GruBackwardSig>& gru_backward_op() {
  static const auto op = find_op<GruBackwardSig>("gru", "_backward");
  return op;
}

// Saved: the 7 tensor arguments (input, weight_ih, weight_hh, bias_ih, bias_hh, hx,
// batch_sizes), then the output and the workspace.
struct EagerGRU : public torch::autograd::Function<EagerGRU> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& hx, const OptTensor& batch_sizes, bool reverse) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, hy, ws] =
        gru_forward_op().call(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, true);
    ctx->save_for_backward({input, w_ih, w_hh, value(b_ih), value(b_hh), value(hx),
                            value(batch_sizes), out, ws});
    ctx->saved_data["reverse"] = reverse;
    ctx->set_materialize_grads(false);
    return {out, hy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const std::vector<bool> needs = needs_grad(ctx, s, 7);
    const bool reverse = ctx->saved_data["reverse"].toBool();
    if (at::GradMode::is_enabled()) {  // create_graph=True
      auto [out, hy, ws] = gru_forward_op().call(s[0], s[1], s[2], opt(s[3]), opt(s[4]),
                                                 opt(s[5]), opt(s[6]), reverse, true);
      return differentiable_grads({out, hy}, grads, s, needs, 8);
    }
    at::AutoDispatchBelowADInplaceOrView below;
    const bool weights = needs[1] || needs[2] || needs[3] || needs[4];
    auto [g_in, g_hx, g_w_ih, g_w_hh, g_b_ih, g_b_hh] = gru_backward_op().call(
        opt(grads[0]), opt(grads[1]), s[0], s[1], s[2], opt(s[3]), opt(s[4]), opt(s[5]),
        opt(s[6]), reverse, s[7], s[8], {needs[0], weights});
    const Tensor g[6] = {g_in, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_hx};
    variable_list result(8);  // + batch_sizes, reverse: none
    for (size_t i = 0; i < 6; ++i) {
      if (needs[i]) result[i] = g[i];
    }
    return result;
  }
};

std::tuple<Tensor, Tensor> gru_eager(const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                                     const OptTensor& b_ih, const OptTensor& b_hh,
                                     const OptTensor& hx, const OptTensor& batch_sizes,
                                     bool reverse, bool exposed) {
  if (!(at::GradMode::is_enabled() && any_wants_grad(input, w_ih, w_hh, b_ih, b_hh, hx))) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, hy, ws] =
        gru_forward_op().call(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse, false);
    return {out, hy};
  }
  variable_list r = EagerGRU::apply(input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse);
  return {exposed ? r[0].clone() : r[0], r[1]};
}

template <int... kIndex>
void register_eager(torch::Library& m, std::integer_sequence<int, kIndex...>) {
  auto one = [&](auto tag) {
    constexpr CellKind kCell = decltype(tag)::value;
    const std::string name = std::string("_") + traits(kCell).name + "_eager";
    if constexpr (traits(kCell).has_cell_state) {
      m.impl(name.c_str(), &lstm_eager<kCell>);
    } else {
      static_assert(kCell == CellKind::kGRU, "a cell without a cell state is the GRU");
      m.impl(name.c_str(), &gru_eager);
    }
  };
  (one(CellTag<static_cast<CellKind>(kIndex)>{}), ...);
}

}  // namespace

// CompositeImplicitAutograd: the kernel runs at the Autograd key, for every backend, and makes
// its own node.
TORCH_LIBRARY_IMPL(fusedrnn, CompositeImplicitAutograd, m) {
  register_eager(m, std::make_integer_sequence<int, kNumCells>{});
}

}  // namespace driver
}  // namespace fusedrnn
