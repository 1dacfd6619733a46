// Argument checks of the layer ops: every tensor against the sizes, dtype and device the input
// and weight_ih imply, with errors that name the argument, what was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

#include "kernels/kernels.h"
#include "recurrence/steps.h"

namespace fusedrnn {
namespace driver {

using c10::optional;

const char* cell_name(CellKind cell);

// Sizes of one layer call, checked against every argument.
struct Dims {
  int64_t I = 0, H = 0, Hout = 0;
};

// `name` has the dtype and device of input and the given shape.
void check_tensor(const char* op, const char* name, const Tensor& t, const Tensor& input,
                  at::IntArrayRef shape);
void check_opt(const char* op, const char* name, const optional<Tensor>& t, const Tensor& input,
               at::IntArrayRef shape);

// Zoneout's weights of one state (design.md §1.7), checked: `t` contiguous (N, width) (one row
// per input row: training's 0 / 1 masks) or (1, width) (one row for all: eval's rate), with
// the dtype and device of input; `ld` its row stride (0 for one row). Undefined when absent.
struct Zone {
  Tensor t;
  int64_t ld = 0;
};
Zone check_zone(const char* op, const char* name, const optional<Tensor>& z, const Tensor& input,
                int64_t N, int64_t width);

// The zoneout weights (zoneout_c, zoneout_h) of a call of `op`: an LSTM's (lstm) both or neither,
// a GRU's zoneout_h alone; zoneout_c H columns, zoneout_h Hout (the projection size, else H).
std::pair<Zone, Zone> check_zones(const char* op, const optional<Tensor>& zoneout_c,
                                  const optional<Tensor>& zoneout_h, const Tensor& input, bool lstm,
                                  int64_t N, int64_t H, int64_t Hout);
// check_zones for an LSTM-family cell of dimensions d (check_args).
std::pair<Zone, Zone> check_lstm_zones(CellKind cell, const optional<Tensor>& zoneout_c,
                                       const optional<Tensor>& zoneout_h, const Tensor& input,
                                       int64_t N, const Dims& d);

Dims check_args(CellKind cell, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                const optional<Tensor>& w_ch, const optional<Tensor>& w_hr,
                const optional<Tensor>& hx, const optional<Tensor>& cx, const Steps& s);

}  // namespace driver
}  // namespace fusedrnn
