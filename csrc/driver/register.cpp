// The drivers as the CPU and CUDA kernels of the operators declared in ops.cpp.
#include <torch/library.h>

#include "drivers.h"

namespace fusedrnn {
namespace driver {
namespace {

template <CellKind kCell>
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_op(
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh, const optional<Tensor>& w_ch, const optional<Tensor>& w_hr,
    const optional<Tensor>& hx, const optional<Tensor>& cx, const optional<Tensor>& batch_sizes,
    bool reverse, bool need_workspace) {
  return lstm_family_forward(kCell, input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx,
                             batch_sizes, reverse, need_workspace);
}

template <CellKind kCell>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
lstm_backward_op(const optional<Tensor>& grad_output, const optional<Tensor>& grad_hy,
                 const optional<Tensor>& grad_cy, const Tensor& input, const Tensor& w_ih,
                 const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                 const optional<Tensor>& w_ch, const optional<Tensor>& w_hr,
                 const optional<Tensor>& hx, const optional<Tensor>& cx,
                 const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output,
                 const Tensor& workspace, std::array<bool, 2> output_mask) {
  return lstm_family_backward(kCell, grad_output, grad_hy, grad_cy, input, w_ih, w_hh, b_ih,
                              b_hh, w_ch, w_hr, hx, cx, batch_sizes, reverse, output, workspace,
                              output_mask);
}

void register_impls(torch::Library& m) {
  m.impl("lstm_forward", &lstm_forward_op<CellKind::kLSTM>);
  m.impl("peephole_lstm_forward", &lstm_forward_op<CellKind::kPeephole>);
  m.impl("wm_lstm_forward", &lstm_forward_op<CellKind::kWorkingMemory>);
  m.impl("lstm_backward", &lstm_backward_op<CellKind::kLSTM>);
  m.impl("peephole_lstm_backward", &lstm_backward_op<CellKind::kPeephole>);
  m.impl("wm_lstm_backward", &lstm_backward_op<CellKind::kWorkingMemory>);
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
}

}  // namespace
}  // namespace driver

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) { driver::register_impls(m); }

#ifdef FUSEDRNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) { driver::register_impls(m); }
#endif

}  // namespace fusedrnn
