// The drivers as the CPU and CUDA kernels of the operators declared in ops/schemas.cpp.
#include <torch/library.h>

#include <string>
#include <utility>

#include "recurrence/recurrence.h"

namespace fusedrnn {
namespace driver {
namespace {

// The op kernels of the cell kCell: its family's driver with the cell's kind bound. A family
// is the facts of cells/traits.h: a cell state or not.
template <CellKind kCell>
struct Kernels {
  static std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward(
      const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
      const optional<Tensor>& b_hh, const optional<Tensor>& w_ch, const optional<Tensor>& w_hr,
      const optional<Tensor>& hx, const optional<Tensor>& cx, const optional<Tensor>& batch_sizes,
      bool reverse, bool need_workspace, const optional<Tensor>& zoneout_c,
      const optional<Tensor>& zoneout_h) {
    return lstm_family_forward(kCell, input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx,
                               batch_sizes, reverse, need_workspace, zoneout_c, zoneout_h);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
  lstm_backward(const optional<Tensor>& grad_output, const optional<Tensor>& grad_hy,
                const optional<Tensor>& grad_cy, const Tensor& input, const Tensor& w_ih,
                const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                const optional<Tensor>& w_ch, const optional<Tensor>& w_hr,
                const optional<Tensor>& hx, const optional<Tensor>& cx,
                const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output,
                const Tensor& workspace, std::array<bool, 2> output_mask,
                const optional<Tensor>& zoneout_c, const optional<Tensor>& zoneout_h) {
    return lstm_family_backward(kCell, grad_output, grad_hy, grad_cy, input, w_ih, w_hh, b_ih, b_hh,
                                w_ch, w_hr, hx, cx, batch_sizes, reverse, output, workspace,
                                output_mask, zoneout_c, zoneout_h);
  }

  static std::tuple<Tensor, Tensor, Tensor> gru_forward(
      const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
      const optional<Tensor>& b_hh, const optional<Tensor>& hx, const optional<Tensor>& batch_sizes,
      bool reverse, bool need_workspace, const optional<Tensor>& zoneout_h) {
    return gru_family_forward(kCell, input, w_ih, w_hh, b_ih, b_hh, hx, batch_sizes, reverse,
                              need_workspace, zoneout_h);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward(
      const optional<Tensor>& grad_output, const optional<Tensor>& grad_hy, const Tensor& input,
      const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
      const optional<Tensor>& b_hh, const optional<Tensor>& hx, const optional<Tensor>& batch_sizes,
      bool reverse, const Tensor& output, const Tensor& workspace, std::array<bool, 2> output_mask,
      const optional<Tensor>& zoneout_h) {
    return gru_family_backward(kCell, grad_output, grad_hy, input, w_ih, w_hh, b_ih, b_hh, hx,
                               batch_sizes, reverse, output, workspace, output_mask, zoneout_h);
  }
};

std::string op_name(CellKind cell, const char* suffix) {
  return std::string(traits(cell).name) + suffix;
}

// Every cell of cells/traits.h: a cell with a cell state through the LSTM-family driver, one
// without through the GRU-family driver.
template <int... kIndex>
void register_cells(torch::Library& m, std::integer_sequence<int, kIndex...>) {
  auto one = [&](auto tag) {
    constexpr CellKind kCell = decltype(tag)::value;
    if constexpr (traits(kCell).has_cell_state) {
      m.impl(op_name(kCell, "_forward").c_str(), &Kernels<kCell>::lstm_forward);
      m.impl(op_name(kCell, "_backward").c_str(), &Kernels<kCell>::lstm_backward);
    } else {
      m.impl(op_name(kCell, "_forward").c_str(), &Kernels<kCell>::gru_forward);
      m.impl(op_name(kCell, "_backward").c_str(), &Kernels<kCell>::gru_backward);
    }
  };
  (one(CellTag<static_cast<CellKind>(kIndex)>{}), ...);
}

void register_impls(torch::Library& m) {
  register_cells(m, std::make_integer_sequence<int, kNumCells>{});
}

}  // namespace
}  // namespace driver

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) { driver::register_impls(m); }

#ifdef FUSEDRNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) { driver::register_impls(m); }
#endif

}  // namespace fusedrnn
