// The LSTM-family recurrence (LSTM, peephole LSTM, working-memory LSTM): one layer, one
// direction, forward and backward, for every dtype and device.
//
// The loops here are shared by the strategies (strategy.h); what differs is the step executor:
// - GemmStep: per step the recurrent GEMM and ONE fused step kernel (two for the working-memory
//   cell, whose o gate needs a GEMM of the new cell state), through the call's StepDevice
//   (step_device.h) on pointers and row strides computed once per call: no tensor is built per
//   step. The input projection of every step is one GEMM before the loop (on the CPU without a
//   workspace: chunks of steps).
// - Tiles (fp32 CPU): the step's GEMMs, input projection included, and its kernel in one tiled
//   pass over weights packed once per call.
// All buffers are allocated once per call, before the loop; the weight gradients are GEMMs over
// chunks of steps in the backward (StepChunks).
#include <ATen/ATen.h>

#include <array>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "buffers.h"
#include "execution/buffer_pool.h"
#include "execution/strategy.h"
#include "ops/args.h"
#include "recurrence.h"

namespace fusedrnn {
namespace driver {
namespace {

// What one forward call holds for its loop.
struct ForwardCall {
  CellKind cell;
  Steps s;
  Dims d;
  bool proj, wm, need_workspace;
  Tensor w_ih, w_hh;
  optional<Tensor> w_ch, w_hr;
  Tensor x, output, out, hy, cy, bias, peep, hg, p_buf, r_scratch, u_scratch;
  LSTMWorkspace ws;
  Zone zone_c, zone_h;  // zoneout's weights (design.md §1.7), undefined without
  Tensor c_own;         // WM under zoneout: the step's c̃_t (LSTMForwardStep::c_own)
};

// h_{t-1} for the GEMM of a fused forward step that writes h_t into `state` (width columns),
// so that the GEMM must not read the state itself. The previous processed step's output rows
// hold h_{t-1} of every row of this step when that step ran at least as many rows (every step
// but the first of padded and forward-packed input), and this step does not write them; otherwise
// (the first step; reverse-packed steps whose batch grows) a copy of the state in `copy`.
template <typename T>
const T* fused_h_prev(const Steps& s, int64_t k, const Tensor& out, const Tensor& state,
                      const Tensor& copy, int64_t width) {
  const int64_t n = s.n[s.at(k)];
  if (k > 0 && s.n[s.at(k - 1)] >= n) return ptr<T>(out) + s.off[s.at(k - 1)] * width;
  std::memcpy(ptr<T>(copy), ptr<T>(state), sizeof(T) * n * width);
  return ptr<T>(copy);
}

// GemmStep forward: the input projection before the loop (or per chunk of steps), then per step
// h_{t-1} W_hh^T into hg and the step kernel.
template <typename scalar_t>
class ForwardGemmStep {
 public:
  ForwardGemmStep(const ForwardCall& c, const StepDevice& dev)
      : c_(c),
        dev_(dev),
        w_ih_t_(c.w_ih.t()),
        xproj_(c.s, c.x, w_ih_t_, 4, c.need_workspace ? c.ws.gates : Tensor(), 4 * c.d.H,
               c.x.options()),
        w_hh_(ptr<scalar_t>(c.w_hh)),
        w_ch_(c.wm ? ptr<scalar_t>(*c.w_ch) : nullptr),
        hy_(ptr<scalar_t>(c.hy)),
        cy_(ptr<scalar_t>(c.cy)),
        hg_(ptr<scalar_t>(c.hg)),
        p_buf_(maybe_ptr<scalar_t>(c.p_buf)) {}
  // The step's gate rows (its input projection), with hg = h_{t-1} W_hh^T beside them: the
  // state's n rows (n x Hout) times W_hh (4H x Hout) transposed.
  scalar_t* gates(int64_t k, int64_t n, int64_t) {
    scalar_t* g = xproj_.template rows_for<scalar_t>(k);
    const int64_t H = c_.d.H, Hout = c_.d.Hout;
    dev_.gemm(n, 4 * H, Hout, hy_, Hout, false, w_hh_, Hout, true, hg_, 4 * H, 0.0f);
    return g;
  }
  void step(int64_t, LSTMForwardStep<scalar_t>& p) {
    if (c_.wm) {
      const int64_t H = c_.d.H;
      FUSEDRNN_LAUNCH(dev_, lstm_forward_step, c_.cell, Phase::kIFG, p);
      if (p.zone_c != nullptr) {
        // zoned: u_o reads the cell's own c̃_t, the next step's u_i, u_f the zoned c_t
        dev_.gemm(p.n, H, H, p.c_own, H, false, w_ch_ + 2 * H * H, H, true, p_buf_ + 2 * H, 3 * H,
                  0.0f);
        dev_.gemm(p.n, 2 * H, H, cy_, H, false, w_ch_, H, true, p_buf_, 3 * H, 0.0f);
      } else {
        // p = c_t W_ch^T for [i | f | o]: the new cell state (n x H) times W_ch (3H x H)
        // transposed
        dev_.gemm(p.n, 3 * H, H, cy_, H, false, w_ch_, H, true, p_buf_, 3 * H, 0.0f);
      }
      FUSEDRNN_LAUNCH(dev_, lstm_forward_step, c_.cell, Phase::kO, p);
    } else {
      FUSEDRNN_LAUNCH(dev_, lstm_forward_step, c_.cell, Phase::kWhole, p);
    }
  }

 private:
  const ForwardCall& c_;
  const StepDevice& dev_;
  const Tensor w_ih_t_;
  InputProjection xproj_;
  const scalar_t* const w_hh_;
  const scalar_t* const w_ch_;
  const scalar_t* const hy_;
  const scalar_t* const cy_;
  scalar_t* const hg_;
  scalar_t* const p_buf_;
};

// Tiles forward: each step is one pass that computes x_t W_ih^T + h_{t-1} W_hh^T tile by tile
// from weights packed here, once per call, and runs the cell on each tile (no input projection
// before the loop). The LSTM / peephole step writes h_t into the state its GEMM reads h_{t-1}
// from, so that GEMM reads the previous step's output rows or a copy (fused_h_prev); the WM step
// writes h_t in its second phase only, after the GEMMs, and with a projection the step writes
// r_t, projected into the state after the GEMM. fp32 and bf16.
//
// The zoned WM step: its kIFG tiles zone c_t (and keep c̃_t); u_o reads c̃_t and the next
// step's u_i, u_f the zoned c_t, so the products with W_ch are two GEMMs from W_co and
// [W_ci; W_cf] packed plain, and the o phase runs as the step kernel after them (its gates hold
// the whole pre-activation: `hg` is a row of zeros).
template <typename scalar_t>
class ForwardTiles {
 public:
  ForwardTiles(const ForwardCall& c, const cpu::FusedStepKernels& k)
      : c_(c), f_(k), x_rows_(c.x.contiguous()) {
    const int64_t H = c.d.H;
    w_ih_ = cpu::pack_weight(c.w_ih, 4, k);
    w_hh_ = cpu::pack_weight(c.w_hh, 4, k);
    if (c.wm && c.c_own.defined()) {
      w_cif_ = cpu::pack_plain(c.w_ch->narrow(0, 0, 2 * H).t(), k);
      w_co_ = cpu::pack_plain(c.w_ch->narrow(0, 2 * H, H).t(), k);
      no_hg_ = at::zeros({c.s.B, 4 * H}, c.x.options());
    } else if (c.wm) {
      w_ch_ = cpu::pack_weight(*c.w_ch, 3, k);
    }
    if (!c.wm && !c.proj) h_prev_ = at::empty({c.s.B, c.d.Hout}, c.x.options());
  }
  // The step's gate rows: the workspace's (training) or a scratch buffer.
  scalar_t* gates(int64_t, int64_t, int64_t r0) {
    return c_.need_workspace ? ptr<scalar_t>(c_.ws.gates) + r0 * 4 * c_.d.H : ptr<scalar_t>(c_.hg);
  }
  void step(int64_t k, LSTMForwardStep<scalar_t>& p) {
    const int64_t H = c_.d.H, Hout = c_.d.Hout, r0 = c_.s.off[c_.s.at(k)];
    p.hg = nullptr;  // the GEMM tile is the whole pre-activation, written into p.gates
    const cpu::GemmSource x_src{ptr<scalar_t>(x_rows_) + r0 * c_.d.I, c_.d.I, &w_ih_};
    if (c_.wm && p.zone_c != nullptr) {
      f_.lstm_forward(c_.cell, Phase::kIFG, p, p.gates, 4 * H, x_src,
                      {ptr<scalar_t>(c_.hy), Hout, &w_hh_});
      scalar_t* const p_buf = ptr<scalar_t>(c_.p_buf);
      f_.gemm(p_buf + 2 * H, 3 * H, {p.c_own, H, &w_co_}, p.n, false);
      f_.gemm(p_buf, 3 * H, {ptr<scalar_t>(c_.cy), H, &w_cif_}, p.n, false);
      p.hg = ptr<scalar_t>(no_hg_);
      cpu::lstm_forward_step(c_.cell, Phase::kO, p);
    } else if (c_.wm) {
      f_.lstm_forward(c_.cell, Phase::kIFG, p, p.gates, 4 * H, x_src,
                      {ptr<scalar_t>(c_.hy), Hout, &w_hh_});
      f_.lstm_forward(c_.cell, Phase::kO, p, ptr<scalar_t>(c_.p_buf), 3 * H,
                      {ptr<scalar_t>(c_.cy), H, &w_ch_});
    } else {
      const scalar_t* h_src = h_prev_.defined()
                                  ? fused_h_prev<scalar_t>(c_.s, k, c_.out, c_.hy, h_prev_, Hout)
                                  : ptr<scalar_t>(c_.hy);
      f_.lstm_forward(c_.cell, Phase::kWhole, p, p.gates, 4 * H, x_src, {h_src, Hout, &w_hh_});
    }
  }

 private:
  const ForwardCall& c_;
  const cpu::FusedSteps f_;
  const Tensor x_rows_;
  cpu::PackedWeight w_ih_, w_hh_, w_ch_, w_cif_, w_co_;
  Tensor h_prev_, no_hg_;
};

template <typename scalar_t, typename Exec>
void forward_loop(const ForwardCall& c, const StepDevice& dev, Exec& exec) {
  const int64_t H = c.d.H, Hout = c.d.Hout;
  const Steps& s = c.s;
  // What every step shares, once per call; per step only the rows' pointers are computed.
  LSTMForwardStep<scalar_t> base;
  base.H = H;
  base.ld_gates = 4 * H;
  base.hg = ptr<scalar_t>(c.hg);
  base.save_gates = c.need_workspace;
  base.bias = opt_ptr<scalar_t>(c.bias);
  base.peephole = opt_ptr<scalar_t>(c.peep);
  base.c_state = ptr<scalar_t>(c.cy);
  base.ld_c_save = H;
  base.ld_h_out = c.proj ? H : Hout;
  if (!c.proj) base.h_state = ptr<scalar_t>(c.hy);
  if (c.wm) {
    base.p = ptr<scalar_t>(c.p_buf);
    base.ld_p = 3 * H;
    base.ld_u = 3 * H;
  }
  scalar_t* const out = ptr<scalar_t>(c.out);
  scalar_t* const hy = ptr<scalar_t>(c.hy);
  const scalar_t* const zone_c = opt_ptr<scalar_t>(c.zone_c.t);
  const scalar_t* const zone_h = opt_ptr<scalar_t>(c.zone_h.t);
  base.ld_zone_c = c.zone_c.ld;
  base.ld_zone_h = c.zone_h.ld;
  base.c_own = maybe_ptr<scalar_t>(c.c_own);
  // Training: the step's rows of the workspace blocks; inference: scratch rows every step reuses
  // (row step 0).
  const bool ws = c.need_workspace;
  scalar_t* const c_save = ws ? ptr<scalar_t>(c.ws.c) : base.c_state;
  scalar_t* const r_rows = c.proj ? ptr<scalar_t>(ws ? c.ws.r : c.r_scratch) : nullptr;
  scalar_t* const u_rows = c.wm ? ptr<scalar_t>(ws ? c.ws.u : c.u_scratch) : nullptr;
  const int64_t row_step = ws ? 1 : 0;
  const scalar_t* const w_hr = c.proj ? ptr<scalar_t>(*c.w_hr) : nullptr;
  for (int64_t k = 0; k < s.T; ++k) {
    const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
    LSTMForwardStep<scalar_t> p = base;
    p.n = n;
    p.gates = exec.gates(k, n, r0);
    // without a workspace c_t is stored twice into the state, harmlessly
    p.c_save = c_save + row_step * r0 * H;
    p.h_out = c.proj ? r_rows + row_step * r0 * H : out + r0 * Hout;
    if (c.wm) p.u = u_rows + row_step * r0 * 3 * H;
    if (zone_c != nullptr) {
      p.zone_c = zone_c + r0 * c.zone_c.ld;
      // projected: the step zones c_t, h_t is zoned after the projection
      if (!c.proj) p.zone_h = zone_h + r0 * c.zone_h.ld;
    }
    exec.step(k, p);
    if (c.proj) {
      // h_t = r_t W_hr^T: r_t (n x H) times W_hr (Hout x H) transposed, into the output rows,
      // then (zoned, ZoneStep) into the state the next step's GEMM reads
      scalar_t* const out_t = out + r0 * Hout;
      dev.gemm(n, Hout, H, p.h_out, H, false, w_hr, H, true, out_t, Hout, 0.0f);
      if (zone_h != nullptr) {
        FUSEDRNN_LAUNCH(dev, zone_forward_step,
                        zone_rows<scalar_t, scalar_t>(c.zone_h, r0, n, Hout, out_t, hy));
      } else {
        dev.copy(hy, out_t, n * Hout);
      }
    }
  }
}

// What one backward call holds for its loop.
struct BackwardCall {
  CellKind cell;
  Steps s;
  Dims d;
  bool proj, wm, has_dy;
  Tensor w_hh;
  optional<Tensor> w_ch, w_hr;
  Tensor out, dy, dh_state, dc_state, c0, peep, dr, dp;
  LSTMWorkspace ws;
  StepChunks sc;
  Zone zone_c, zone_h;  // zoneout's weights, undefined without
  Tensor dgates_buf[2], dh_buf[2], dp_buf[2];
  // WM under zoneout: the direct part of dc_{t-1} between the phases (n x H); WM and peephole
  // under zoneout: per chunk the recomputed c̃_t of its rows, which the gradient of W_co / w_co
  // reads
  Tensor dc_carry, c_own_buf[2];
  Tensor dgates_rows(int64_t k, int64_t r, int64_t count) const {
    return sc.rows_of(dgates_buf, k, r, count);
  }
};

// GemmStep backward: per step the step kernel (the WM cell: its o phase, the GEMM that carries
// dc back through weight_ch, its i/f/g phase), then dh_{t-1} = dgates W_hh.
template <typename scalar_t>
class BackwardGemmStep {
 public:
  BackwardGemmStep(BackwardCall& c, const StepDevice& dev)
      : c_(c),
        dev_(dev),
        w_hh_(ptr<scalar_t>(c.w_hh)),
        w_ch_(c.wm ? ptr<scalar_t>(*c.w_ch) : nullptr),
        dh_state_(ptr<scalar_t>(c.dh_state)),
        dc_state_(ptr<scalar_t>(c.dc_state)),
        dp_(maybe_ptr<scalar_t>(c.dp)) {}
  // WM: the gradients of the cell-connection pre-activations in flight (one buffer here).
  scalar_t* dp() const { return dp_; }
  // WM under zoneout, before kO: dc_t += [dp_i, dp_f](next step) [W_ci; W_cf] (the next step's
  // u_i, u_f read the zoned c_t, whose gradient kO splits); rows of dp whose next step did not
  // run them are still zero.
  void dh_phase(int64_t, Phase phase, const LSTMBackwardStep<scalar_t>& p) {
    if (c_.wm && p.zone_c != nullptr) {
      const int64_t H = c_.d.H;
      dev_.gemm(p.n, H, 2 * H, dp_, 3 * H, false, w_ch_, H, false, dc_state_, H, 1.0f);
    }
    FUSEDRNN_LAUNCH(dev_, lstm_backward_step, c_.cell, phase, p);
  }
  // dc_t += dp_o(t) W_co + [dp_i, dp_f](next step) [W_ci; W_cf]: dp (n x 3H) times W_ch
  // (3H x H); zoned, dc (then the gradient of c̃_t) += dp_o(t) W_co only.
  void dc_phase(int64_t, LSTMBackwardStep<scalar_t>& p) {
    const int64_t H = c_.d.H;
    if (p.zone_c != nullptr) {
      dev_.gemm(p.n, H, H, dp_ + 2 * H, 3 * H, false, w_ch_ + 2 * H * H, H, false, dc_state_, H,
                1.0f);
    } else {
      dev_.gemm(p.n, H, 3 * H, dp_, 3 * H, false, w_ch_, H, false, dc_state_, H, 1.0f);
    }
    FUSEDRNN_LAUNCH(dev_, lstm_backward_step, c_.cell, Phase::kIFG, p);
  }
  // dh_{t-1} = dgates (n x 4H) times W_hh (4H x Hout); under zoneout added to the direct part
  // d_h * dh_t the step kernel (projected: the ZoneStep) wrote there
  void finish_step(int64_t, const LSTMBackwardStep<scalar_t>& p) {
    const int64_t H = c_.d.H, Hout = c_.d.Hout;
    const float beta = c_.zone_h.t.defined() ? 1.0f : 0.0f;
    dev_.gemm(p.n, Hout, 4 * H, p.dgates, 4 * H, false, w_hh_, Hout, false, dh_state_, Hout, beta);
  }

 private:
  BackwardCall& c_;
  const StepDevice& dev_;
  const scalar_t* const w_hh_;
  const scalar_t* const w_ch_;
  scalar_t* const dh_state_;
  scalar_t* const dc_state_;
  scalar_t* const dp_;
};

// Tiles backward (fp32, without projection): the GEMM that carries dh back through weight_hh
// runs tile by tile from weight_hh packed here, each tile followed by the previous step's kernel
// on its rows and units; for the WM cell likewise the GEMM that carries dc back through
// weight_ch, followed by the kIFG phase. That phase writes the dp_i, dp_f the next step's GEMM
// reads while this step's GEMM still reads the previous ones: it writes them into a second dp
// buffer (`dp_next`), and the two swap after each step. fp32 and bf16.
template <typename scalar_t>
class BackwardTiles {
 public:
  BackwardTiles(BackwardCall& c, const cpu::FusedStepKernels& k) : c_(c), f_(k) {
    w_hh_ = cpu::pack_plain(c.w_hh, k);
    if (c.wm) {
      w_ch_ = cpu::pack_plain(*c.w_ch, k);
      dp_next_ = at::zeros({c.s.B, 3 * c.d.H}, c.dp.options());
    }
  }
  // The phase that reads dh_t (kWhole; WM kO): dh_t = dgates(next processed step) W_hh tile by
  // tile, each tile's step kernel after it; the first processed step's dh_t is already there.
  void dh_phase(int64_t k, Phase phase, const LSTMBackwardStep<scalar_t>& p) {
    const Steps& s = c_.s;
    if (k + 1 < s.T) {
      const int64_t t_next = s.at(k + 1);
      f_.lstm_backward(
          c_.cell, phase, p, ptr<scalar_t>(c_.dh_state), c_.d.Hout,
          {ptr<scalar_t>(c_.dgates_rows(k + 1, s.off[t_next], s.n[t_next])), 4 * c_.d.H, &w_hh_},
          s.n[t_next]);
    } else {
      cpu::lstm_backward_step(c_.cell, phase, p);
    }
  }
  void dc_phase(int64_t k, LSTMBackwardStep<scalar_t>& p) {
    const int64_t H = c_.d.H, n = p.n;
    p.dp = ptr<scalar_t>(dp_next_);
    f_.lstm_backward(c_.cell, Phase::kIFG, p, ptr<scalar_t>(c_.dc_state), H,
                     {ptr<scalar_t>(c_.dp), 3 * H, &w_ch_}, n);
    // Rows the next processed step does not run keep this step's dp_i, dp_f for good (the
    // gradient of c0 adds them after the loop): both buffers must hold them.
    const int64_t n_next = k > 0 ? c_.s.n[c_.s.at(k - 1)] : n;
    if (n_next < n) {
      rows(c_.dp, n_next, n - n_next)
          .narrow(1, 0, 2 * H)
          .copy_(rows(dp_next_, n_next, n - n_next).narrow(1, 0, 2 * H));
    }
    std::swap(c_.dp, dp_next_);
  }
  scalar_t* dp() const { return ptr<scalar_t>(c_.dp); }  // swapped after every step (dc_phase)
  // dh_{t-1}'s W_hh part is computed in the next processed step's call; the last one's here.
  void finish_step(int64_t k, const LSTMBackwardStep<scalar_t>& p) {
    if (k == 0) {
      gemm(rows(c_.dh_state, 0, p.n), c_.dgates_rows(k, c_.s.off[c_.s.at(k)], p.n), c_.w_hh,
           c_.zone_h.t.defined() ? 1.0f : 0.0f);
    }
  }

 private:
  BackwardCall& c_;
  const cpu::FusedSteps f_;
  cpu::PackedWeight w_hh_, w_ch_;
  Tensor dp_next_;
};

template <typename scalar_t, typename Exec, typename FinishChunk>
void backward_loop(BackwardCall& c, const StepDevice& dev, Exec& exec, const Tensor& c_all,
                   const FinishChunk& finish_chunk) {
  const Steps& s = c.s;
  const int64_t H = c.d.H, Hout = c.d.Hout;
  // What every step shares, once per call; per step only the rows' pointers are computed.
  LSTMBackwardStep<scalar_t> base;
  base.H = H;
  base.ld_gates = 4 * H;
  base.ld_c = H;
  base.ld_c_prev = H;
  base.c_init = ptr<scalar_t>(c.c0);
  base.peephole = opt_ptr<scalar_t>(c.peep);
  base.dh = c.proj ? ptr<scalar_t>(c.dr) : ptr<scalar_t>(c.dh_state);  // read by the kernel
  base.ld_dh = c.proj ? H : Hout;
  base.ld_dy = Hout;
  base.dc_state = ptr<scalar_t>(c.dc_state);
  base.ld_dgates = 4 * H;
  if (c.wm) {
    base.ld_u = 3 * H;
    base.ld_dp = 3 * H;
    base.ld_dp_saved = 3 * H;
  }
  const scalar_t* const gates = ptr<scalar_t>(c.ws.gates);
  const scalar_t* const c_saved = ptr<scalar_t>(c.ws.c);
  const scalar_t* const c_prev = ptr<scalar_t>(c_all);
  const scalar_t* const u = c.wm ? ptr<scalar_t>(c.ws.u) : nullptr;
  const scalar_t* const dy = c.has_dy ? ptr<scalar_t>(c.dy) : nullptr;
  scalar_t* const dh_state = ptr<scalar_t>(c.dh_state);
  scalar_t* const dr = maybe_ptr<scalar_t>(c.dr);
  const scalar_t* const w_hr = c.proj ? ptr<scalar_t>(*c.w_hr) : nullptr;
  const scalar_t* const zone_c = opt_ptr<scalar_t>(c.zone_c.t);
  const scalar_t* const zone_h = opt_ptr<scalar_t>(c.zone_h.t);
  base.ld_zone_c = c.zone_c.ld;
  base.ld_zone_h = c.zone_h.ld;
  if (zone_h != nullptr && !c.proj) base.dh_carry = dh_state;
  scalar_t* const dgates_bufs[2] = {maybe_ptr<scalar_t>(c.dgates_buf[0]),
                                    maybe_ptr<scalar_t>(c.dgates_buf[1])};
  scalar_t* const dh_bufs[2] = {maybe_ptr<scalar_t>(c.dh_buf[0]), maybe_ptr<scalar_t>(c.dh_buf[1])};
  scalar_t* const dp_bufs[2] = {maybe_ptr<scalar_t>(c.dp_buf[0]), maybe_ptr<scalar_t>(c.dp_buf[1])};
  scalar_t* const c_own_bufs[2] = {maybe_ptr<scalar_t>(c.c_own_buf[0]),
                                   maybe_ptr<scalar_t>(c.c_own_buf[1])};
  base.dc_carry = maybe_ptr<scalar_t>(c.dc_carry);
  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
    LSTMBackwardStep<scalar_t> p = base;
    p.n = n;
    p.gates = gates + r0 * 4 * H;
    p.c = c_saved + r0 * H;
    const auto [m_prev, prev_row0] = prev_rows(s, k);
    p.c_prev = c_prev + prev_row0 * H;
    p.m_prev = m_prev;
    if (c.proj) {
      // dh_t = dh_state + dy_t (kept per chunk for the gradient of W_hr), then
      // dr = dh_t (n x Hout) times W_hr (Hout x H); zoned, dh_t's part (1 - d_h) dh_t, the
      // gradient of h̃_t, and d_h dh_t left in dh_state (ZoneStep)
      scalar_t* const dh_t = c.sc.row_ptr(dh_bufs, Hout, k, r0);
      if (zone_h != nullptr) {
        FUSEDRNN_LAUNCH(dev, zone_backward_step,
                        zone_rows<scalar_t, scalar_t>(c.zone_h, r0, n, Hout, dh_t, dh_state,
                                                      c.has_dy ? dy + r0 * Hout : nullptr));
      } else if (c.has_dy) {
        dev.add(dh_t, dh_state, dy + r0 * Hout, n * Hout);
      } else {
        dev.copy(dh_t, dh_state, n * Hout);
      }
      dev.gemm(n, H, Hout, dh_t, Hout, false, w_hr, H, false, dr, H, 0.0f);
    } else {
      p.dy = c.has_dy ? dy + r0 * Hout : nullptr;
    }
    p.dgates = c.sc.row_ptr(dgates_bufs, 4 * H, k, r0);
    if (zone_c != nullptr) {
      p.zone_c = zone_c + r0 * c.zone_c.ld;
      if (!c.proj) p.zone_h = zone_h + r0 * c.zone_h.ld;  // projected: the ZoneStep above
      if (c_own_bufs[0] != nullptr) p.c_own = c.sc.row_ptr(c_own_bufs, H, k, r0);
    }
    if (c.wm) {
      p.u = u + r0 * 3 * H;
      p.dp = exec.dp();
      p.dp_saved = c.sc.row_ptr(dp_bufs, 3 * H, k, r0);
      exec.dh_phase(k, Phase::kO, p);
      exec.dc_phase(k, p);
    } else {
      exec.dh_phase(k, Phase::kWhole, p);
    }
    exec.finish_step(k, p);
    if (k == c.sc.of(k).k_lo) finish_chunk(c.sc.of(k));
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_family_forward(
    CellKind cell, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& w_ch,
    const optional<Tensor>& w_hr, const optional<Tensor>& hx, const optional<Tensor>& cx,
    const optional<Tensor>& batch_sizes, bool reverse, bool need_workspace,
    const optional<Tensor>& zoneout_c, const optional<Tensor>& zoneout_h) {
  const Steps s = make_steps(cell_name(cell), input, batch_sizes, reverse);
  const Dims d = check_args(cell, input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx, s);
  const auto [zone_c, zone_h] = check_lstm_zones(cell, zoneout_c, zoneout_h, input, s.N, d);
  auto guard = guard_for(input);
  const StepDevice dev(input);  // the per-step GEMMs, copies and launches (step_device.h)
  const int64_t H = d.H, Hout = d.Hout;
  const bool proj = w_hr.has_value();
  // the operands of the cell (cells/traits.h): a full weight_ch in a two-phase step (working
  // memory), or diagonal peepholes
  const bool wm = traits(cell).two_phase;
  const bool peepholes = traits(cell).weight_ch == WeightCh::kDiagonal;
  const auto opts = input.options();
  // Training keeps every step's gates, c_t (and r_t, u_*) in the workspace; inference keeps
  // only the current step's, in per-call scratch buffers. The output is allocated in its final
  // shape (not returned as a view, so that callers may modify it in place); `out` is its
  // (N, H_out) row view.
  const Tensor output = pooled_empty(out_shape(input, Hout), opts);
  ForwardCall c{
      // the weights the steps read through raw pointers, contiguous
      cell, s, d, proj, wm, need_workspace, w_ih, w_hh.contiguous(), contiguous_opt(w_ch),
      contiguous_opt(w_hr),
      /*x=*/input.reshape({s.N, d.I}), output, /*out=*/output.view({s.N, Hout}),
      /*hy=*/state_or_zeros(hx, input, s.B, Hout), /*cy=*/state_or_zeros(cx, input, s.B, H),
      /*bias=*/b_ih.has_value() ? bias_sum(*b_ih, *b_hh) : Tensor(),
      /*peep=*/peepholes ? w_ch->contiguous() : Tensor(),
      // GemmStep: h_{t-1} W_hh^T of the current step. Tiles: the step's gates without a
      // workspace.
      /*hg=*/at::empty({s.B, 4 * H}, opts),
      /*p_buf=*/wm ? at::empty({s.B, 3 * H}, opts) : Tensor(),  // WM: c W_ch^T for [i | f | o]
      /*r_scratch=*/!need_workspace && proj ? at::empty({s.B, H}, opts) : Tensor(),
      /*u_scratch=*/!need_workspace && wm ? at::empty({s.B, 3 * H}, opts) : Tensor(),
      need_workspace ? LSTMWorkspace(pooled_empty({LSTMWorkspace::numel(cell, s.N, H, proj)}, opts),
                                     cell, s.N, H, proj)
                     : LSTMWorkspace(opts),
      zone_c, zone_h};
  if (wm) gemm(c.p_buf.narrow(1, 0, 2 * H), c.cy, w_ch->narrow(0, 0, 2 * H).t());
  const bool wm_zoned = wm && zone_h.t.defined();
  if (wm_zoned) c.c_own = at::empty({s.B, H}, opts);

  const Plan plan = plan_call(input, s, TilesFor::kAlsoWideShortCalls);
  if (plan.strategy == Strategy::kFusedTiles) {
    dispatch_tiles(input.scalar_type(), [&](auto type) {
      ForwardTiles<decltype(type)> exec(c, *plan.kernels);
      forward_loop<decltype(type)>(c, dev, exec);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "lstm_forward",
                                    [&] {
                                      ForwardGemmStep<scalar_t> exec(c, dev);
                                      forward_loop<scalar_t>(c, dev, exec);
                                    });
  }
  return {output, c.hy, c.cy, c.ws.flat};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
lstm_family_backward(CellKind cell, const optional<Tensor>& grad_output,
                     const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy,
                     const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                     const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                     const optional<Tensor>& w_ch, const optional<Tensor>& w_hr,
                     const optional<Tensor>& hx, const optional<Tensor>& cx,
                     const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output,
                     const Tensor& workspace, std::array<bool, 2> output_mask,
                     const optional<Tensor>& zoneout_c, const optional<Tensor>& zoneout_h) {
  const char* op = cell_name(cell);
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(cell, input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx, s);
  const auto [zone_c, zone_h] = check_lstm_zones(cell, zoneout_c, zoneout_h, input, s.N, d);
  auto guard = guard_for(input);
  const StepDevice dev(input);  // the per-step GEMMs, copies and launches (step_device.h)
  const int64_t H = d.H, Hout = d.Hout;
  const bool proj = w_hr.has_value();
  // the operands of the cell (cells/traits.h): a full weight_ch in a two-phase step (working
  // memory), or diagonal peepholes
  const bool wm = traits(cell).two_phase;
  const bool peepholes = traits(cell).weight_ch == WeightCh::kDiagonal;
  const auto opts = input.options();
  const int64_t ws_numel = LSTMWorkspace::numel(cell, s.N, H, proj);
  TORCH_CHECK(workspace.dim() == 1 && workspace.numel() == ws_numel && workspace.is_contiguous() &&
                  workspace.scalar_type() == input.scalar_type(),
              op, "_backward: workspace must be the contiguous (", ws_numel,
              ",) tensor returned by the forward, got shape ", workspace.sizes());
  TORCH_CHECK(output.numel() == s.N * Hout, op, "_backward: output must be the forward's output");
  const bool has_dy = grad_output.has_value() && grad_output->defined();
  if (has_dy) check_tensor(op, "grad_output", *grad_output, input, output.sizes());
  check_opt(op, "grad_hy", grad_hy, input, {s.B, Hout});
  check_opt(op, "grad_cy", grad_cy, input, {s.B, H});

  const Tensor x = input.reshape({s.N, d.I});
  const Tensor h0 = hx.has_value() ? hx->contiguous() : at::zeros({s.B, Hout}, opts);
  const std::vector<PrevSegment> segs = prev_segments(s);
  // The gradients of the gate pre-activations, dgates, are kept for a chunk of consecutive
  // processed steps at a time (see StepChunks): when a chunk is done, its part of the input and
  // weight gradients is computed (accumulated) from it while it is still in cache. Per chunk as
  // dgates: the projection's gradient of h_t (all rows), the WM's gradients of the
  // cell-connection pre-activations.
  BackwardCall c{
      // the weights the steps read through raw pointers, contiguous
      cell, s, d, proj, wm, has_dy, w_hh.contiguous(), contiguous_opt(w_ch), contiguous_opt(w_hr),
      /*out=*/output.reshape({s.N, Hout}),
      /*dy=*/has_dy ? grad_output->reshape({s.N, Hout}).contiguous() : Tensor(),
      /*dh_state=*/grad_or_zeros(grad_hy, input, s.B, Hout),
      /*dc_state=*/grad_or_zeros(grad_cy, input, s.B, H),
      /*c0=*/cx.has_value() ? cx->contiguous() : at::zeros({s.B, H}, opts),
      /*peep=*/peepholes ? w_ch->contiguous() : Tensor(),
      // projection: gradient of r_t (current step); WM: the cell-connection gradients in flight
      /*dr=*/proj ? at::empty({s.B, H}, opts) : Tensor(),
      /*dp=*/wm ? at::zeros({s.B, 3 * H}, opts) : Tensor(),
      LSTMWorkspace(workspace, cell, s.N, H, proj), StepChunks(s, input), zone_c, zone_h};
  const bool wm_zoned = wm && zone_h.t.defined();
  const bool keeps_c_own = (wm || peepholes) && zone_h.t.defined();
  for (int i = 0; i < 2; ++i) {
    c.dgates_buf[i] = c.sc.buffer(4 * H, opts, i);
    if (proj) c.dh_buf[i] = c.sc.buffer(Hout, opts, i);
    if (wm) c.dp_buf[i] = c.sc.buffer(3 * H, opts, i);
    if (keeps_c_own) c.c_own_buf[i] = c.sc.buffer(H, opts, i);
  }
  if (wm_zoned) c.dc_carry = at::empty({s.B, H}, opts);
  const Tensor& c_all = c.ws.c;

  // The gradients the chunks accumulate into.
  auto none = [&] { return at::empty({0}, opts); };  // one tensor per absent gradient: no aliasing
  Tensor grad_input = output_mask[0] ? pooled_empty(input.sizes(), opts) : none();
  Tensor grad_w_ih = none(), grad_w_hh = none(), grad_b = none(), grad_w_ch = none(),
         grad_w_hr = none();
  // The matrices are written by the first chunk's GEMMs (beta 0) and accumulated by the
  // others': no zero fill, which for a cell's single step is as much memory traffic as the
  // GEMM itself. Zeros where no chunk runs.
  auto weight_grad = [&](at::IntArrayRef shape) {
    return c.sc.chunks.empty() ? at::zeros(shape, opts) : pooled_empty(shape, opts);
  };
  if (output_mask[1]) {
    grad_w_ih = weight_grad({4 * H, d.I});
    grad_w_hh = weight_grad({4 * H, Hout});
    if (b_ih.has_value()) grad_b = at::zeros({4 * H}, opts);
    if (peepholes) grad_w_ch = at::zeros({weight_ch_rows(cell, H), H}, opts);
    if (wm) grad_w_ch = weight_grad({weight_ch_rows(cell, H), H});
    if (proj) grad_w_hr = weight_grad({Hout, H});
  }
  auto finish_chunk = [&](const StepChunks::Chunk& ch) {
    const int64_t m = ch.hi - ch.lo;
    const Tensor dg = rows(c.dgates_buf[ch.buf], 0, m);
    if (output_mask[0]) gemm(rows(grad_input.view({s.N, d.I}), ch.lo, m), dg, w_ih);
    if (!output_mask[1]) return;
    const float beta = &ch == &c.sc.chunks.front() ? 0.0f : 1.0f;
    gemm(grad_w_ih, dg.t(), rows(x, ch.lo, m), beta);
    const std::vector<PrevSegment> cs = clip_segments(segs, ch.lo, ch.hi);
    gemm_prev(grad_w_hh, dg, cs, c.out, h0, beta);
    if (grad_b.numel()) grad_b += dg.sum(0);
    if (peepholes) {
      grad_w_ch[0] += colsum_prev(dg.narrow(1, 0, H), cs, c_all, c.c0);
      grad_w_ch[1] += colsum_prev(dg.narrow(1, H, H), cs, c_all, c.c0);
      const Tensor dg_o = dg.narrow(1, 3 * H, H);
      if (keeps_c_own) {
        // o read the cell's own c̃_t = f c_{t-1} + i g, which the step kernels kept for the
        // chunk, not the zoned c_t the workspace keeps
        grad_w_ch[2] += (dg_o * rows(c.c_own_buf[ch.buf], 0, m)).sum(0);
      } else {
        grad_w_ch[2] += (dg_o * rows(c_all, ch.lo, m)).sum(0);
      }
    } else if (wm) {
      const Tensor dp_c = rows(c.dp_buf[ch.buf], 0, m);
      gemm_prev(grad_w_ch.narrow(0, 0, 2 * H), dp_c.narrow(1, 0, 2 * H), cs, c_all, c.c0, beta);
      // u_o read c̃_t: the zoned steps' own, kept per chunk; else the saved c_t
      const Tensor c_o = wm_zoned ? rows(c.c_own_buf[ch.buf], 0, m) : rows(c_all, ch.lo, m);
      gemm(grad_w_ch.narrow(0, 2 * H, H), dp_c.narrow(1, 2 * H, H).t(), c_o, beta);
    }
    if (proj) gemm(grad_w_hr, rows(c.dh_buf[ch.buf], 0, m).t(), rows(c.ws.r, ch.lo, m), beta);
  };

  const Plan plan = plan_call(input, s, proj || wm_zoned ? TilesFor::kNone : TilesFor::kLongCalls);
  if (plan.strategy == Strategy::kFusedTiles) {
    dispatch_tiles(input.scalar_type(), [&](auto type) {
      BackwardTiles<decltype(type)> exec(c, *plan.kernels);
      backward_loop<decltype(type)>(c, dev, exec, c_all, finish_chunk);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "lstm_backward",
                                    [&] {
                                      BackwardGemmStep<scalar_t> exec(c, dev);
                                      backward_loop<scalar_t>(c, dev, exec, c_all, finish_chunk);
                                    });
  }

  if (wm && s.B > 0) {
    gemm(c.dc_state, c.dp.narrow(1, 0, 2 * H), w_ch->narrow(0, 0, 2 * H), 1.0f);
  }
  if (!output_mask[1]) {
    return {grad_input, c.dh_state, c.dc_state, none(), none(), none(), none(), none(), none()};
  }
  Tensor grad_b_ih = none(), grad_b_hh = none();
  if (b_ih.has_value()) {
    grad_b_ih = grad_b;
    grad_b_hh = grad_b.clone();
  }
  return {grad_input, c.dh_state, c.dc_state, grad_w_ih, grad_w_hh,
          grad_b_ih,  grad_b_hh,  grad_w_ch,  grad_w_hr};
}

}  // namespace driver
}  // namespace fusedrnn
