#include "args.h"

namespace fusedrnn {
namespace driver {
namespace {

bool is_float_type(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

}  // namespace

const char* cell_name(CellKind cell) { return traits(cell).name; }

void check_tensor(const char* op, const char* name, const Tensor& t, const Tensor& input,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name,
              " must have the dtype of input (", input.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the device of input (",
              input.device(), "), got ", t.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_opt(const char* op, const char* name, const optional<Tensor>& t, const Tensor& input,
               at::IntArrayRef shape) {
  if (t.has_value()) check_tensor(op, name, *t, input, shape);
}

Zone check_zone(const char* op, const char* name, const optional<Tensor>& z, const Tensor& input,
                int64_t N, int64_t width) {
  if (!z.has_value()) return {};
  const Tensor& t = *z;
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name,
              " must have the dtype of input (", input.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the device of input (",
              input.device(), "), got ", t.device());
  TORCH_CHECK(t.dim() == 2 && (t.size(0) == N || t.size(0) == 1) && t.size(1) == width, op, ": ",
              name, " must have shape (", N, ", ", width, ") (one row per input row) or (1, ",
              width, ") (one row for all), got ", t.sizes());
  const Tensor c = t.contiguous();
  return {c, c.size(0) == 1 ? 0 : width};
}

std::pair<Zone, Zone> check_zones(const char* op, const optional<Tensor>& zoneout_c,
                                  const optional<Tensor>& zoneout_h, const Tensor& input, bool lstm,
                                  int64_t N, int64_t H, int64_t Hout) {
  if (!zoneout_c.has_value() && !zoneout_h.has_value()) return {};
  TORCH_CHECK(!lstm || (zoneout_c.has_value() && zoneout_h.has_value()), op,
              ": zoneout_c and zoneout_h must be given together (a state at rate 0: a row of "
              "zeros)");
  return {check_zone(op, "zoneout_c", zoneout_c, input, N, H),
          check_zone(op, "zoneout_h", zoneout_h, input, N, Hout)};
}

std::pair<Zone, Zone> check_lstm_zones(CellKind cell, const optional<Tensor>& zoneout_c,
                                       const optional<Tensor>& zoneout_h, const Tensor& input,
                                       int64_t N, const Dims& d) {
  return check_zones(cell_name(cell), zoneout_c, zoneout_h, input, true, N, d.H, d.Hout);
}

Dims check_args(CellKind cell, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                const optional<Tensor>& w_ch, const optional<Tensor>& w_hr,
                const optional<Tensor>& hx, const optional<Tensor>& cx, const Steps& s) {
  const char* op = cell_name(cell);
  const CellTraits& tr = traits(cell);
  const int64_t G = tr.gates;
  TORCH_CHECK(is_float_type(input.scalar_type()), op,
              ": input must be float32, float64, bfloat16 or float16, got ", input.scalar_type());
  TORCH_CHECK(input.device().is_cpu() || input.device().is_cuda(), op,
              ": input must be a CPU or CUDA tensor, got ", input.device());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % G == 0 && w_ih.size(0) > 0, op,
              ": weight_ih must be 2-D (", G, "*hidden_size, input_size), got shape ",
              w_ih.sizes());
  Dims d;
  d.I = input.size(-1);
  d.H = w_ih.size(0) / G;
  d.Hout = w_hr.has_value() ? w_hr->size(0) : d.H;
  check_tensor(op, "weight_ih", w_ih, input, {G * d.H, d.I});
  check_tensor(op, "weight_hh", w_hh, input, {G * d.H, d.Hout});
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), op,
              ": bias_ih and bias_hh must be given together");
  check_opt(op, "bias_ih", b_ih, input, {G * d.H});
  check_opt(op, "bias_hh", b_hh, input, {G * d.H});
  switch (tr.weight_ch) {
    case WeightCh::kNone:
      TORCH_CHECK(!w_ch.has_value(), op, ": weight_ch must be None for this cell");
      break;
    case WeightCh::kDiagonal:
      TORCH_CHECK(w_ch.has_value(), op, ": weight_ch (3, hidden_size) is required");
      check_tensor(op, "weight_ch", *w_ch, input, {weight_ch_rows(cell, d.H), d.H});
      break;
    case WeightCh::kFull:
      TORCH_CHECK(w_ch.has_value(), op, ": weight_ch (3*hidden_size, hidden_size) is required");
      check_tensor(op, "weight_ch", *w_ch, input, {weight_ch_rows(cell, d.H), d.H});
      break;
  }
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) > 0 && w_hr->size(0) < d.H, op,
                ": weight_hr must be 2-D (proj_size, hidden_size) with 0 < proj_size < "
                "hidden_size, got shape ",
                w_hr->sizes());
    check_tensor(op, "weight_hr", *w_hr, input, {d.Hout, d.H});
  }
  check_opt(op, "hx", hx, input, {s.B, d.Hout});
  check_opt(op, "cx", cx, input, {s.B, d.H});
  return d;
}

}  // namespace driver
}  // namespace fusedrnn
