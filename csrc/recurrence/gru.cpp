// The GRU recurrence: one layer, one direction, forward and backward, for every dtype and
// device, with the step executors of strategy.h (as lstm.cpp: the GemmStep executors run their
// GEMMs and kernels through the call's StepDevice on pointers computed once per call).
#include <ATen/ATen.h>

#include <array>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "buffers.h"
#include "execution/buffer_pool.h"
#include "execution/strategy.h"
#include "ops/args.h"
#include "recurrence.h"

namespace fusedrnn {
namespace driver {
namespace {

struct ForwardCall {
  Steps s;
  Dims d;
  bool need_workspace;
  Tensor w_ih, w_hh, x, ws, out, hy, hg, bias_ih, bias_hh;
  Zone zone_h;  // zoneout's weights (design.md §1.7), undefined without
};

// GemmStep forward: hg = h_{t-1} W_hh^T (the state's n rows times W_hh (3H x H) transposed),
// then the step kernel.
template <typename scalar_t>
class ForwardGemmStep {
 public:
  ForwardGemmStep(const ForwardCall& c, const StepDevice& dev)
      : c_(c),
        dev_(dev),
        w_hh_(ptr<scalar_t>(c.w_hh)),
        hy_(ptr<scalar_t>(c.hy)),
        hg_(ptr<scalar_t>(c.hg)) {}
  void step(int64_t, GRUForwardStep<scalar_t>& p) {
    const int64_t H = c_.d.H;
    dev_.gemm(p.n, 3 * H, H, hy_, H, false, w_hh_, H, true, hg_, 3 * H, 0.0f);
    FUSEDRNN_LAUNCH(dev_, gru_forward_step, p);
  }

 private:
  const ForwardCall& c_;
  const StepDevice& dev_;
  const scalar_t* const w_hh_;
  const scalar_t* const hy_;
  scalar_t* const hg_;
};

// Tiles forward (fp32 and bf16 CPU), as in the LSTM forward: the step writes h_t into the state,
// so the GEMM reads h_{t-1} from the previous step's output rows or a copy.
template <typename scalar_t>
class ForwardTiles {
 public:
  ForwardTiles(const ForwardCall& c, const cpu::FusedStepKernels& k)
      : c_(c),
        f_(k),
        w_hh_(cpu::pack_weight(c.w_hh, 3, k)),
        h_prev_(at::empty({c.s.B, c.d.H}, c.x.options())) {}
  void step(int64_t k, GRUForwardStep<scalar_t>& p) {
    const Steps& s = c_.s;
    const int64_t H = c_.d.H;
    const scalar_t* a;
    if (k > 0 && s.n[s.at(k - 1)] >= p.n) {
      a = ptr<scalar_t>(c_.out) + s.off[s.at(k - 1)] * H;
    } else {
      std::memcpy(ptr<scalar_t>(h_prev_), ptr<scalar_t>(c_.hy), sizeof(scalar_t) * p.n * H);
      a = ptr<scalar_t>(h_prev_);
    }
    f_.gru_forward(p, a, H, w_hh_);
  }

 private:
  const ForwardCall& c_;
  const cpu::FusedSteps f_;
  const cpu::PackedWeight w_hh_;
  const Tensor h_prev_;
};

template <typename scalar_t, typename Exec>
void forward_loop(const ForwardCall& c, InputProjection& xproj, Exec& exec) {
  const Steps& s = c.s;
  const int64_t H = c.d.H;
  // What every step shares, once per call; per step only the rows' pointers are computed.
  GRUForwardStep<scalar_t> base;
  base.H = H;
  base.ld_gates = 4 * H;
  base.hg = ptr<scalar_t>(c.hg);
  base.ld_hg = 3 * H;
  base.bias_ih = opt_ptr<scalar_t>(c.bias_ih);
  base.bias_hh = opt_ptr<scalar_t>(c.bias_hh);
  base.h_state = ptr<scalar_t>(c.hy);
  base.ld_h_out = H;
  base.ld_zone_h = c.zone_h.ld;
  scalar_t* const out = ptr<scalar_t>(c.out);
  const scalar_t* const zone_h = opt_ptr<scalar_t>(c.zone_h.t);
  for (int64_t k = 0; k < s.T; ++k) {
    const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
    GRUForwardStep<scalar_t> p = base;
    p.n = n;
    p.gates = xproj.rows_for<scalar_t>(k);
    p.h_out = out + r0 * H;
    if (zone_h != nullptr) p.zone_h = zone_h + r0 * c.zone_h.ld;
    exec.step(k, p);
  }
}

struct BackwardCall {
  Steps s;
  Dims d;
  Tensor w_hh, out, dy, dh_state, h0;
  StepChunks sc;
  Zone zone_h;  // zoneout's weights, undefined without
  Tensor dx_buf[2], dhg_buf[2];
};

// GemmStep backward: the step kernel, then dh_{t-1} += dhg W_hh (dhg (n x 3H) times W_hh
// (3H x H)).
template <typename scalar_t>
class BackwardGemmStep {
 public:
  BackwardGemmStep(const BackwardCall& c, const StepDevice& dev)
      : c_(c), dev_(dev), w_hh_(ptr<scalar_t>(c.w_hh)), dh_state_(ptr<scalar_t>(c.dh_state)) {}
  void step(int64_t, const GRUBackwardStep<scalar_t>& p, int64_t) {
    const int64_t H = c_.d.H;
    FUSEDRNN_LAUNCH(dev_, gru_backward_step, p);
    dev_.gemm(p.n, H, 3 * H, p.dhg, 3 * H, false, w_hh_, H, false, dh_state_, H, 1.0f);
  }

 private:
  const BackwardCall& c_;
  const StepDevice& dev_;
  const scalar_t* const w_hh_;
  scalar_t* const dh_state_;
};

// Tiles backward (fp32 and bf16 CPU): dh_t += dhg(next processed step) W_hh, tile by tile, each
// tile's step kernel after it; the last processed step's W_hh part of dh_{t-1} after its kernel.
template <typename scalar_t>
class BackwardTiles {
 public:
  BackwardTiles(const BackwardCall& c, const cpu::FusedStepKernels& k)
      : c_(c), f_(k), w_hh_(cpu::pack_plain(c.w_hh, k)) {}
  void step(int64_t k, const GRUBackwardStep<scalar_t>& p, int64_t r0) {
    const Steps& s = c_.s;
    if (k + 1 < s.T) {
      const int64_t t_next = s.at(k + 1);
      f_.gru_backward(p,
                      {ptr<scalar_t>(c_.sc.rows_of(c_.dhg_buf, k + 1, s.off[t_next], s.n[t_next])),
                       3 * c_.d.H, &w_hh_},
                      s.n[t_next]);
    } else {
      cpu::gru_backward_step(p);
    }
    if (k == 0) {
      gemm(rows(c_.dh_state, 0, p.n), c_.sc.rows_of(c_.dhg_buf, k, r0, p.n), c_.w_hh, 1.0f);
    }
  }

 private:
  const BackwardCall& c_;
  const cpu::FusedSteps f_;
  const cpu::PackedWeight w_hh_;
};

template <typename scalar_t, typename Exec, typename FinishChunk>
void backward_loop(const BackwardCall& c, const Tensor& workspace, Exec& exec,
                   const FinishChunk& finish_chunk) {
  const Steps& s = c.s;
  const int64_t H = c.d.H;
  // What every step shares, once per call; per step only the rows' pointers are computed.
  GRUBackwardStep<scalar_t> base;
  base.H = H;
  base.ld_gates = 4 * H;
  base.ld_h_prev = H;
  base.h_init = ptr<scalar_t>(c.h0);
  base.ld_dy = H;
  base.dh_state = ptr<scalar_t>(c.dh_state);
  base.ld_dx = 3 * H;
  base.ld_dhg = 3 * H;
  base.ld_zone_h = c.zone_h.ld;
  const scalar_t* const zone_h = opt_ptr<scalar_t>(c.zone_h.t);
  const scalar_t* const ws_p = s.N > 0 ? workspace.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* const h_prev = ptr<scalar_t>(c.out);
  const scalar_t* const dy = maybe_ptr<scalar_t>(c.dy);
  scalar_t* const dx_bufs[2] = {maybe_ptr<scalar_t>(c.dx_buf[0]), maybe_ptr<scalar_t>(c.dx_buf[1])};
  scalar_t* const dhg_bufs[2] = {maybe_ptr<scalar_t>(c.dhg_buf[0]),
                                 maybe_ptr<scalar_t>(c.dhg_buf[1])};
  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
    GRUBackwardStep<scalar_t> p = base;
    p.n = n;
    p.gates = ws_p + r0 * 4 * H;
    const auto [m_prev, prev_row0] = prev_rows(s, k);
    p.h_prev = h_prev + prev_row0 * H;
    p.m_prev = m_prev;
    p.dy = dy ? dy + r0 * H : nullptr;
    p.dx = c.sc.row_ptr(dx_bufs, 3 * H, k, r0);
    p.dhg = c.sc.row_ptr(dhg_bufs, 3 * H, k, r0);
    if (zone_h != nullptr) p.zone_h = zone_h + r0 * c.zone_h.ld;
    exec.step(k, p, r0);
    if (k == c.sc.of(k).k_lo) finish_chunk(c.sc.of(k));
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> gru_family_forward(
    CellKind cell, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& hx,
    const optional<Tensor>& batch_sizes, bool reverse, bool need_workspace,
    const optional<Tensor>& zoneout_h) {
  const Steps s = make_steps(cell_name(cell), input, batch_sizes, reverse);
  const Dims d = check_args(cell, input, w_ih, w_hh, b_ih, b_hh, {}, {}, hx, {}, s);
  const Zone zone_h = check_zone(cell_name(cell), "zoneout_h", zoneout_h, input, s.N, d.H);
  auto guard = guard_for(input);
  const StepDevice dev(input);  // the per-step GEMMs and launches (step_device.h)
  const int64_t H = d.H;
  const auto opts = input.options();
  const Tensor output = pooled_empty(out_shape(input, H), opts);
  // The workspace keeps every step's r, z, n and h_n (training); inference keeps none.
  // w_hh contiguous: the steps read it through a raw pointer
  const ForwardCall c{
      s,
      d,
      need_workspace,
      w_ih,
      w_hh.contiguous(),
      /*x=*/input.reshape({s.N, d.I}),
      /*ws=*/pooled_empty({need_workspace ? s.N : 0, workspace_row(cell, H, /*proj=*/false)}, opts),
      /*out=*/output.view({s.N, H}),
      /*hy=*/state_or_zeros(hx, input, s.B, H),
      /*hg=*/at::empty({s.B, 3 * H}, opts),
      b_ih.has_value() ? b_ih->contiguous() : Tensor(),
      b_hh.has_value() ? b_hh->contiguous() : Tensor(),
      zone_h};
  const Tensor w_ih_t = w_ih.t();
  InputProjection xproj(s, c.x, w_ih_t, 3, need_workspace ? c.ws : Tensor(), 4 * H, opts);
  const Plan plan = plan_call(input, s, TilesFor::kLongCalls);
  if (plan.strategy == Strategy::kFusedTiles) {
    dispatch_tiles(input.scalar_type(), [&](auto type) {
      ForwardTiles<decltype(type)> exec(c, *plan.kernels);
      forward_loop<decltype(type)>(c, xproj, exec);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "gru_forward",
                                    [&] {
                                      ForwardGemmStep<scalar_t> exec(c, dev);
                                      forward_loop<scalar_t>(c, xproj, exec);
                                    });
  }
  return {output, c.hy, c.ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_family_backward(
    CellKind cell, const optional<Tensor>& grad_output, const optional<Tensor>& grad_hy,
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh, const optional<Tensor>& hx, const optional<Tensor>& batch_sizes,
    bool reverse, const Tensor& output, const Tensor& workspace, std::array<bool, 2> output_mask,
    const optional<Tensor>& zoneout_h) {
  const std::string op_name = std::string(cell_name(cell)) + "_backward";
  const char* op = op_name.c_str();
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(cell, input, w_ih, w_hh, b_ih, b_hh, {}, {}, hx, {}, s);
  const Zone zone_h = check_zone(op, "zoneout_h", zoneout_h, input, s.N, d.H);
  auto guard = guard_for(input);
  const StepDevice dev(input);  // the per-step GEMMs and launches (step_device.h)
  const int64_t H = d.H;
  const auto opts = input.options();
  const int64_t ws_cols = workspace_row(cell, H, /*proj=*/false);
  TORCH_CHECK(workspace.dim() == 2 && workspace.size(0) == s.N && workspace.size(1) == ws_cols &&
                  workspace.is_contiguous() && workspace.scalar_type() == input.scalar_type(),
              op, ": workspace must be the contiguous (", s.N, ", ", ws_cols,
              ") tensor returned by the forward, got shape ", workspace.sizes());
  TORCH_CHECK(output.numel() == s.N * H, op, ": output must be the forward's output");
  const bool has_dy = grad_output.has_value() && grad_output->defined();
  if (has_dy) check_tensor(op, "grad_output", *grad_output, input, output.sizes());
  check_opt(op, "grad_hy", grad_hy, input, {s.B, H});
  const Tensor x = input.reshape({s.N, d.I});
  const std::vector<PrevSegment> segs = prev_segments(s);
  // dx and dhg (the gradients of the x-side and h-side pre-activations) chunk by chunk, as
  // dgates in the LSTM-family backward.
  BackwardCall c{s,
                 d,
                 w_hh.contiguous(),
                 /*out=*/output.reshape({s.N, H}),
                 /*dy=*/has_dy ? grad_output->reshape({s.N, H}).contiguous() : Tensor(),
                 /*dh_state=*/grad_or_zeros(grad_hy, input, s.B, H),
                 /*h0=*/hx.has_value() ? hx->contiguous() : at::zeros({s.B, H}, opts),
                 StepChunks(s, input),
                 zone_h};
  for (int i = 0; i < 2; ++i) {
    c.dx_buf[i] = c.sc.buffer(3 * H, opts, i);
    c.dhg_buf[i] = c.sc.buffer(3 * H, opts, i);
  }
  auto none = [&] { return at::empty({0}, opts); };  // one tensor per output: no aliasing
  Tensor grad_input = output_mask[0] ? pooled_empty(input.sizes(), opts) : none();
  Tensor grad_w_ih = none(), grad_w_hh = none(), grad_b_ih = none(), grad_b_hh = none();
  if (output_mask[1]) {
    // written by the first chunk's GEMMs (beta 0): no zero fill (see lstm.cpp)
    auto weight_grad = [&](at::IntArrayRef shape) {
      return c.sc.chunks.empty() ? at::zeros(shape, opts) : pooled_empty(shape, opts);
    };
    grad_w_ih = weight_grad({3 * H, d.I});
    grad_w_hh = weight_grad({3 * H, H});
    if (b_ih.has_value()) {
      grad_b_ih = at::zeros({3 * H}, opts);
      grad_b_hh = at::zeros({3 * H}, opts);
    }
  }
  auto finish_chunk = [&](const StepChunks::Chunk& ch) {
    const int64_t m = ch.hi - ch.lo;
    const Tensor dx = rows(c.dx_buf[ch.buf], 0, m), dhg = rows(c.dhg_buf[ch.buf], 0, m);
    if (output_mask[0]) gemm(rows(grad_input.view({s.N, d.I}), ch.lo, m), dx, w_ih);
    if (!output_mask[1]) return;
    const float beta = &ch == &c.sc.chunks.front() ? 0.0f : 1.0f;
    gemm(grad_w_ih, dx.t(), rows(x, ch.lo, m), beta);
    gemm_prev(grad_w_hh, dhg, clip_segments(segs, ch.lo, ch.hi), c.out, c.h0, beta);
    if (grad_b_ih.numel()) {
      // r and z: the input and hidden sides share their gate's gradient (dhg's first 2H
      // columns are dx's, kernels/step_elements.h), so one column sum serves both
      const Tensor sum_x = dx.sum(0);
      grad_b_ih += sum_x;
      grad_b_hh.narrow(0, 0, 2 * H) += sum_x.narrow(0, 0, 2 * H);
      grad_b_hh.narrow(0, 2 * H, H) += dhg.narrow(1, 2 * H, H).sum(0);
    }
  };
  const Plan plan = plan_call(input, s, TilesFor::kLongCalls);
  if (plan.strategy == Strategy::kFusedTiles) {
    dispatch_tiles(input.scalar_type(), [&](auto type) {
      BackwardTiles<decltype(type)> exec(c, *plan.kernels);
      backward_loop<decltype(type)>(c, workspace, exec, finish_chunk);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "gru_backward",
                                    [&] {
                                      BackwardGemmStep<scalar_t> exec(c, dev);
                                      backward_loop<scalar_t>(c, workspace, exec, finish_chunk);
                                    });
  }
  return {grad_input, c.dh_state, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace driver
}  // namespace fusedrnn
