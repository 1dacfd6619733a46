// The layer drivers (lstm.cpp, gru.cpp), registered as the CPU and CUDA kernels of the
// operators of ops/schemas.cpp by register.cpp.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "kernels/kernels.h"

namespace fusedrnn {
namespace driver {

using at::Tensor;
using c10::optional;

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_family_forward(
    CellKind cell, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& w_ch,
    const optional<Tensor>& w_hr, const optional<Tensor>& hx, const optional<Tensor>& cx,
    const optional<Tensor>& batch_sizes, bool reverse, bool need_workspace,
    const optional<Tensor>& zoneout_c, const optional<Tensor>& zoneout_h);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
lstm_family_backward(CellKind cell, const optional<Tensor>& grad_output,
                     const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy,
                     const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                     const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                     const optional<Tensor>& w_ch, const optional<Tensor>& w_hr,
                     const optional<Tensor>& hx, const optional<Tensor>& cx,
                     const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output,
                     const Tensor& workspace, std::array<bool, 2> output_mask,
                     const optional<Tensor>& zoneout_c, const optional<Tensor>& zoneout_h);

std::tuple<Tensor, Tensor, Tensor> gru_family_forward(
    CellKind cell, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& hx,
    const optional<Tensor>& batch_sizes, bool reverse, bool need_workspace,
    const optional<Tensor>& zoneout_h);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_family_backward(
    CellKind cell, const optional<Tensor>& grad_output, const optional<Tensor>& grad_hy,
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh, const optional<Tensor>& hx, const optional<Tensor>& batch_sizes,
    bool reverse, const Tensor& output, const Tensor& workspace, std::array<bool, 2> output_mask,
    const optional<Tensor>& zoneout_h);

}  // namespace driver
}  // namespace fusedrnn
