// The layer-normalised LSTM and GRU (design.md §1.6): one layer, one direction, forward and
// backward, on the CPU and on CUDA, as the ops layer_norm_lstm_* / layer_norm_gru_* of
// ops/schemas.cpp. The driver is the same on both devices: its GEMMs go through the call's
// StepDevice or ATen, its row passes to the CPU row loops (a task's rows on one thread) or the
// CUDA kernels (a thread block per row), run_rows below.
//
// Per call: the input product x W_ih^T of every row in one GEMM (it does not depend on the
// recurrence), which each row's step normalises. Per step: the recurrent product h_{t-1} W_hh^T
// (one GEMM through the call's StepDevice, as the other cells' GemmStep loops) and then ONE fused
// pass per row (cells/layer_norm.h) that takes the row statistics of both products, the gates,
// c_t, the statistics of c_t and h_t; with a projection, its GEMM. The backward mirrors it: per
// step one fused pass per row (the three LayerNorm backwards inside it, and the row's terms of
// the gains' and biases' column sums) and the GEMM of dh_{t-1}; per chunk of about a thousand
// rows of steps (ln_chunks), the chunk's part of the input and weight gradients as GEMMs.
//
// Rows of the state and of the workspace follow recurrence/steps.h: step t runs rows
// [0, n[t]) of the state and rows [off[t], off[t] + n[t]) of the input, output and workspace.
// The workspace keeps each row's state before its step (h_prev, c_prev), so the backward needs
// no bookkeeping of where a packed row's previous state came from.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "buffers.h"
#include "execution/buffer_pool.h"
#include "execution/gemm.h"
#include "execution/step_device.h"
#include "execution/strategy.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/layer_norm_rows.h"
#include "kernels/layer_norm_step.h"
#include "ops/args.h"
#include "steps.h"

namespace fusedrnn {
namespace driver {
namespace {

using c10::optional;
namespace ln = fusedrnn::layer_norm;  // the row math (cells/layer_norm.h)

// The workspace: one flat buffer of the op-math type, blocks one after the other, block i of
// widths[i] columns, each of `rows` rows: every row of the call in training (N), the step being
// run in inference (B).
struct Blocks {
  std::vector<int64_t> widths;
  int64_t row_values() const {
    int64_t w = 0;
    for (int64_t x : widths) w += x;
    return w;
  }
  int64_t numel(int64_t rows) const { return rows * row_values(); }
  // element offset of row r of block i in a buffer of `rows` rows a block
  int64_t at(size_t i, int64_t rows, int64_t r) const {
    int64_t off = 0;
    for (size_t k = 0; k < i; ++k) off += widths[k] * rows;
    return off + r * widths[i];
  }
};

using namespace cpu;  // NOLINT: the workspace blocks' names (kernels/cpu/layer_norm_table.h)

Blocks lstm_blocks(int64_t H, int64_t Hout, bool proj) {
  return {{4 * H, 4 * H, 4 * H, H, H, Hout, proj ? H : 0, 3}};
}
Blocks gru_blocks(int64_t H) { return {{3 * H, 3 * H, 3 * H, H, 2}}; }

// Rows per task of the row loops: enough columns of work per task to repay a task.
int64_t row_grain(int64_t G) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(G, 1)); }

// What every step of a call shares: sizes and the workspace blocks' places (`rows` rows a
// block: see Blocks).
template <typename scalar_t>
LNStep<scalar_t> step_base(int64_t H, int64_t Hout, const Blocks& blocks, int64_t rows,
                           at::opmath_type<scalar_t>* ws) {
  LNStep<scalar_t> p;
  p.H = H;
  p.Hout = Hout;
  p.ws = ws;
  for (size_t i = 0; i < blocks.widths.size(); ++i) {
    p.off[i] = blocks.at(i, rows, 0);
    p.width[i] = blocks.widths[i];
  }
  return p;
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

void check_gain(const char* op, const char* name, const Tensor& t, const Tensor& input, int64_t n) {
  check_tensor(op, name, t, input, {n});
}

// The input side's product x W_ih^T (G columns a row), which the rows' forward passes read
// (LNStep::xp) and normalise, through the other cells' InputProjection (buffers.h): training,
// every row's before the step loop, into the workspace block x̂ itself when the dtype is the
// op-math type (each row normalised in place), else into a tensor of its own; inference, a chunk
// of consecutive steps' rows at a time into a small buffer, still in cache when its steps read
// it (the whole call's product, 26 MB at T=100 B=64 H=256 in fp32, went to memory and back).
template <typename scalar_t, typename acc_t>
class LNInput {
 public:
  // xhat: the workspace's block x̂ (every row's, training) or undefined (inference)
  LNInput(const Steps& s, const Tensor& input, const Tensor& w_ih, int64_t gates,
          const Tensor& xhat)
      : x_(input.reshape({s.N, input.size(-1)})),
        w_ih_t_(w_ih.t()),
        proj_(s, x_, w_ih_t_, gates, full(s, input, w_ih, xhat), w_ih.size(0), input.options()) {}
  // The rows of the k-th processed step, G values each.
  const scalar_t* rows_of(int64_t k) { return proj_.rows_for<scalar_t>(k); }

 private:
  static Tensor full(const Steps& s, const Tensor& input, const Tensor& w_ih, const Tensor& xhat) {
    if (!xhat.defined() || std::is_same_v<scalar_t, acc_t>) return xhat;
    return at::empty({s.N, w_ih.size(0)}, input.options());
  }
  const Tensor x_, w_ih_t_;  // (N, I) the input, (I, G) W_ih^T
  InputProjection proj_;
};

// The input side's gradients of a backward, which its chunks accumulate (op-math type;
// undefined where output_mask does not ask): grad_input's rows, and grad_weight_ih, written by
// the first chunk's GEMM (beta 0) and accumulated by the others'.
struct InputSide {
  Tensor x, w_ih;                // (N, I) the input, (G, I) W_ih, as the GEMMs read them
  Tensor grad_input, grad_w_ih;  // (N, I), (G, I)
  InputSide(const Tensor& input, const Tensor& w, std::array<bool, 2> mask, at::ScalarType acc,
            int64_t N) {
    const auto opts = input.options().dtype(acc);
    if (mask[0]) {
      w_ih = w.to(acc).contiguous();
      grad_input = pooled_empty({N, w.size(1)}, opts);
    }
    if (mask[1]) {
      x = input.reshape({N, w.size(1)}).to(acc).contiguous();
      grad_w_ih = pooled_empty(w.sizes(), opts);
    }
  }
  // A chunk's part, rows [lo, lo + m), from dx (its rows: the gradient of x W_ih^T).
  void add_chunk(const Tensor& dx, int64_t lo, int64_t m, float beta) {
    const Tensor d = rows(dx, 0, m);
    if (grad_input.defined()) gemm(rows(grad_input, lo, m), d, w_ih);
    if (grad_w_ih.defined()) gemm(grad_w_ih, d.t(), rows(x, lo, m), beta);
  }
  // The results in the input's dtype and shape (none_like where not asked).
  void finish(const Tensor& input, Tensor& gi, Tensor& gw) const {
    if (grad_input.defined()) gi = grad_input.to(input.scalar_type()).view(input.sizes());
    if (grad_w_ih.defined()) gw = grad_w_ih.to(input.scalar_type());
  }
};

// The chunks of a layer-normalised backward: kBackwardChunkRows rows (at least one step's) of
// consecutive processed steps, whose per-row gradients (the gate pre-activations', the recurrent
// products', ...) are kept while the chunk runs, then turned into its part of the input and
// weight gradients while they are in cache, and their buffers reused by the next chunk (as the
// other cells' backward, design.md §3.3). Every dtype: the buffers and the partial sums are of
// the op-math type.
StepChunks ln_chunks(const Steps& s) {
  return StepChunks(s, std::max<int64_t>(kBackwardChunkRows, s.B));
}

Tensor none_like(const Tensor& input) { return at::empty({0}, input.options()); }

// w^T (a matrix) as a contiguous `dtype` tensor from the pool of the layers' buffers: a plain
// copy (a megabyte at H=256) took fresh pages from the system on every backward.
Tensor transposed(const Tensor& w, at::ScalarType dtype) {
  Tensor t = pooled_empty({w.size(1), w.size(0)}, w.options().dtype(dtype));
  t.copy_(w.t());
  return t;
}

// A CPU buffer of `numel` values from the pool of the layers' buffers (execution/buffer_pool.h),
// backed by transparent huge pages where the kernel allows them on request (madvise mode): the
// workspace and the backward's per-row buffers are large (~100 MB at T=100, B=64, H=256), and
// fresh from the system on every call they spent a third of the call in page faults with 4 KiB
// pages. The pool keeps them for the next call (within its limit); the advice costs one system
// call. Nothing is touched here.
Tensor large_buffer(at::IntArrayRef shape, const at::TensorOptions& opts) {
  Tensor t = pooled_empty(shape, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + t.nbytes()) & ~(kHuge - 1);
  if (t.device().is_cpu() && hi > lo) {
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice: failure is harmless
  }
#endif
  return t;
}

// The column sums of the gains' and biases' gradients (`width` values), which the backward's row
// passes add each row's terms to (cells/layer_norm.h). CPU: a set per thread, to which the rows
// of the thread's tasks add; CUDA: a set per row of the state (its thread block's at every
// step). The sets are added in order at the end, so that the result depends on the thread count
// only (CPU) or not at all (CUDA).
struct GradSums {
  Tensor t;  // (sets, width)
  int64_t width;
  bool per_row;
  GradSums(int64_t width_, int64_t B, const at::TensorOptions& opts)
      : width(width_), per_row(opts.device().is_cuda()) {
    t = at::zeros({per_row ? B : at::get_num_threads(), width}, opts);
  }
  // The sums of the running task's thread, in a CPU row loop's task.
  template <typename acc_t>
  acc_t* mine() const {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid >= 0 && tid < t.size(0), "fusedrnn: thread ", tid, " outside the ", t.size(0),
                " threads of a layer-normalised backward");
    return t.data_ptr<acc_t>() + tid * width;
  }
  // Where the rows of a step add, for a CUDA kernel: every row its own set.
  template <typename scalar_t>
  void per_row_sets(LNStep<scalar_t>& p) const {
    TORCH_INTERNAL_ASSERT(per_row, "fusedrnn: per-row gradient sums of a CPU call");
    p.sums = t.data_ptr<at::opmath_type<scalar_t>>();
    p.ld_sums = width;
  }
  Tensor total() const { return t.sum(0); }
};

// The row passes of a step.
enum class Pass { kLSTMForward, kLSTMBackward, kGRUForward, kGRUBackward };

// Pass `pass` over the rows [0, n) of step p (G gate columns a row), a backward's adding to
// `sums`: on CUDA one kernel on the call's stream, every row adding to its own set; on the CPU
// the ISA's row loops in tasks of enough columns of work each, each task adding to its thread's.
template <typename scalar_t>
void run_rows(Pass pass, const StepDevice& dev, const LNStep<scalar_t>& p, int64_t n, int64_t G,
              const GradSums* sums = nullptr) {
#ifdef FUSEDRNN_WITH_CUDA
  if (dev.cuda()) {
    LNStep<scalar_t> q = p;
    if (sums != nullptr) sums->per_row_sets(q);
    switch (pass) {
      case Pass::kLSTMForward:
        return cuda::ln_lstm_forward_rows(q, n, dev.stream());
      case Pass::kLSTMBackward:
        return cuda::ln_lstm_backward_rows(q, n, dev.stream());
      case Pass::kGRUForward:
        return cuda::ln_gru_forward_rows(q, n, dev.stream());
      case Pass::kGRUBackward:
        return cuda::ln_gru_backward_rows(q, n, dev.stream());
    }
  }
#endif
  TORCH_INTERNAL_ASSERT(!dev.cuda(), "fusedrnn: a CUDA layer-normalised step in a CPU-only build");
  const LayerNormFns<scalar_t>& fns = layer_norm_kernels().of<scalar_t>();
  void (*const fn)(const LNStep<scalar_t>&, int64_t, int64_t) =
      pass == Pass::kLSTMForward    ? fns.lstm_forward
      : pass == Pass::kLSTMBackward ? fns.lstm_backward
      : pass == Pass::kGRUForward   ? fns.gru_forward
                                    : fns.gru_backward;
  at::parallel_for(0, n, row_grain(G), [&](int64_t b0, int64_t b1) {
    if (sums == nullptr) return fn(p, b0, b1);
    LNStep<scalar_t> q = p;
    q.sums = sums->mine<at::opmath_type<scalar_t>>();
    fn(q, b0, b1);
  });
}

// The per-step product out (m x N) = beta * out + a (m x K) @ B of a call, B fixed for the call
// (h_{t-1} W_hh^T forward, dhg W_hh backward). In fp32 and bf16 on the CPU, where the call is
// long enough to repay packing B and the fused kernels take the dtype (cpu::fused_kernels_for),
// the fused kernels' panel GEMM from B packed once per call (cpu::FusedSteps::gemm); else the
// call's StepDevice (oneDNN, MKL or cuBLAS), which pack B again on every call: at T=100 B=64
// H=256, one thread, MKL's packing copies were a tenth of a layer-normalised LSTM's training
// pass (perf); in bf16 on a CPU without oneDNN's bf16 GEMM, it converted B to fp32 on every
// step (execution/gemm.cpp).
template <typename T>
class StepGemm {
  static constexpr bool kFusedType = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

 public:
  // b: B (K x N), a matrix, or with `gates` the transposed view of a weight W (gates * H, K)
  // (packed from W, gate-blocked as the tiles' weights: a plain packing of the view copied it
  // element by element first)
  StepGemm(const StepDevice& dev, const Tensor& b, const Steps& s, int64_t gates = 0)
      : dev_(dev), b_(b) {
    if constexpr (kFusedType) {
      if (!dev.cuda()) k_ = cpu::fused_kernels_for(b, s.T, s.N, s.B, /*wide_short_calls=*/false);
      if (k_ != nullptr) w_ = gates ? cpu::pack_weight(b.t(), gates, *k_) : cpu::pack_plain(b, *k_);
    }
  }
  void operator()(int64_t m, const T* a, int64_t lda, T* out, int64_t ldo, float beta) const {
    if constexpr (kFusedType) {
      if (k_ != nullptr) {
        return cpu::FusedSteps(*k_).gemm<T>(out, ldo, {a, lda, &w_}, m, beta != 0.0f);
      }
    }
    const bool trans = b_.stride(1) != 1;  // B stored as its transpose
    dev_.gemm(m, b_.size(1), b_.size(0), a, lda, false, b_.const_data_ptr<T>(),
              trans ? b_.stride(1) : b_.stride(0), trans, out, ldo, beta);
  }

 private:
  const StepDevice& dev_;
  const Tensor b_;
  const cpu::FusedStepKernels* k_ = nullptr;
  cpu::PackedWeight w_;
};

// Block i of the workspace as an (N, width) matrix.
Tensor block_of(const Tensor& ws, const Blocks& blocks, size_t i, int64_t N) {
  return ws.narrow(0, blocks.at(i, N, 0), N * blocks.widths[i]).view({N, blocks.widths[i]});
}

// The gradients of a call of no step (no rows): zeros, as autograd gives. `weights` pairs each
// weight gradient with its parameter (null where the parameter is absent).
void zero_grads(std::array<bool, 2> mask, const Tensor& input, Tensor& grad_input,
                const std::vector<std::pair<Tensor*, const Tensor*>>& weights) {
  if (mask[0]) grad_input = pooled_zeros(input.sizes(), input.options());
  if (!mask[1]) return;
  for (const auto& [grad, param] : weights) {
    if (param) *grad = at::zeros(param->sizes(), input.options());
  }
}

const Tensor* opt_param(const optional<Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// dst[i] += src[i], i < count: a step's output gradient added to its state's (CPU: a loop; CUDA:
// StepDevice::add on the call's stream).
template <typename acc_t>
void add_rows(const StepDevice& dev, acc_t* dst, const acc_t* src, int64_t count) {
  if (dev.cuda()) return dev.add(dst, dst, src, count);
  for (int64_t i = 0; i < count; ++i) dst[i] += src[i];
}

// The step's rows of zoneout's weights in `p` (from row r0 of the call).
template <typename scalar_t>
void set_zone_rows(LNStep<scalar_t>& p, const Zone& zc, const Zone& zh, int64_t r0) {
  if (zc.t.defined()) p.zone_c = zc.t.const_data_ptr<scalar_t>() + r0 * zc.ld;
  if (zh.t.defined()) p.zone_h = zh.t.const_data_ptr<scalar_t>() + r0 * zh.ld;
  p.ld_zone_c = zc.ld;
  p.ld_zone_h = zh.ld;
}

// ---- LSTM ---------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> ln_lstm_forward(
    const Tensor& input, const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh, const Tensor& g_ih, const Tensor& g_hh, const Tensor& g_c,
    const Tensor& b_c, const optional<Tensor>& w_hr, const optional<Tensor>& hx,
    const optional<Tensor>& cx, const optional<Tensor>& batch_sizes, bool reverse,
    bool need_workspace, const optional<Tensor>& zoneout_c, const optional<Tensor>& zoneout_h) {
  const char* op = "layer_norm_lstm_forward";
  auto guard = guard_for(input);
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(CellKind::kLSTM, input, w_ih, w_hh, b_ih, b_hh, {}, w_hr, hx, cx, s);
  const int64_t H = d.H, Hout = d.Hout, G = 4 * H;
  const bool proj = w_hr.has_value();
  // (named, not structured bindings: the step loop's lambda captures them, which C++17 refuses)
  const std::pair<Zone, Zone> zones =
      check_zones(op, zoneout_c, zoneout_h, input, true, s.N, H, Hout);
  const Zone &zone_c = zones.first, &zone_h = zones.second;
  check_gain(op, "ln_weight_ih", g_ih, input, G);
  check_gain(op, "ln_weight_hh", g_hh, input, G);
  check_gain(op, "ln_weight_c", g_c, input, H);
  check_gain(op, "ln_bias_c", b_c, input, H);
  const auto opts = input.options();
  const at::ScalarType acc_st = acc_dtype(input.scalar_type());
  const auto acc_opts = opts.dtype(acc_st);
  const Blocks blocks = lstm_blocks(H, Hout, proj);
  // training: every row's blocks; inference: the step's rows
  const int64_t rows = need_workspace ? s.N : s.B;
  const Tensor ws = large_buffer({blocks.numel(rows)}, acc_opts);
  const Tensor output = pooled_empty(out_shape(input, Hout), opts);
  const Tensor h_state = state_or_zeros(hx, input, s.B, Hout);
  const Tensor c_state =
      cx.has_value() ? cx->to(acc_st).contiguous().clone() : at::zeros({s.B, H}, acc_opts);
  const Tensor hg = pooled_empty({s.B, G}, opts);
  const Tensor r_buf = proj ? pooled_empty({s.B, H}, opts) : Tensor();
  // (zeros without biases: the row passes add a bias unconditionally, cells/layer_norm.h)
  const Tensor bias =
      b_ih.has_value() ? bias_sum(b_ih->contiguous(), b_hh->contiguous()) : at::zeros({G}, opts);
  const Tensor w_hh_c = w_hh.contiguous(), w_hr_c = proj ? w_hr->contiguous() : Tensor();
  const Tensor gi = g_ih.contiguous(), gh = g_hh.contiguous(), gc = g_c.contiguous(),
               bc = b_c.contiguous();
  const StepDevice dev(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "layer_norm_lstm_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (s.N == 0) return;
        acc_t* const w = ws.data_ptr<acc_t>();
        LNInput<scalar_t, acc_t> xp(s, input, w_ih, 4,
                                    need_workspace ? block_of(ws, blocks, 0, rows) : Tensor());
        scalar_t* const out = output.data_ptr<scalar_t>();
        scalar_t* const hs = h_state.data_ptr<scalar_t>();
        acc_t* const cs = c_state.data_ptr<acc_t>();
        scalar_t* const hgp = hg.data_ptr<scalar_t>();
        scalar_t* const rp = proj ? r_buf.data_ptr<scalar_t>() : nullptr;
        LNStep<scalar_t> base = step_base<scalar_t>(H, Hout, blocks, rows, w);
        base.keep = need_workspace;
        base.g_ih = gi.const_data_ptr<scalar_t>();
        base.g_hh = gh.const_data_ptr<scalar_t>();
        base.g_c = gc.const_data_ptr<scalar_t>();
        base.b_c = bc.const_data_ptr<scalar_t>();
        base.bias = bias.const_data_ptr<scalar_t>();
        base.hg = hgp;
        base.h_state = hs;
        base.c_state = cs;
        base.r_out = rp;
        const StepGemm<scalar_t> hh_product(dev, w_hh_c.t(), s, 4);  // h_{t-1} W_hh^T
        for (int64_t k = 0; k < s.T; ++k) {
          const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
          hh_product(n, hs, Hout, hgp, G, 0.0f);
          LNStep<scalar_t> p = base;
          p.r0 = need_workspace ? r0 : 0;
          p.xp = xp.rows_of(k);
          p.out = out + r0 * Hout;
          // projected: the rows zone c_t, h_t is zoned after the projection (ZoneStep)
          set_zone_rows(p, zone_c, proj ? Zone{} : zone_h, r0);
          run_rows(Pass::kLSTMForward, dev, p, n, G);
          if (proj) {
            scalar_t* const out_t = out + r0 * Hout;
            dev.gemm(n, Hout, H, rp, H, false, w_hr_c.const_data_ptr<scalar_t>(), H, true, out_t,
                     Hout, 0.0f);
            if (zone_h.t.defined()) {
              FUSEDRNN_LAUNCH(dev, zone_forward_step,
                              zone_rows<scalar_t, scalar_t>(zone_h, r0, n, Hout, out_t, hs));
            } else {
              dev.copy(hs, out_t, n * Hout);
            }
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
                 const Tensor& workspace, std::array<bool, 2> output_mask,
                 const optional<Tensor>& zoneout_c, const optional<Tensor>& zoneout_h) {
  const char* op = "layer_norm_lstm_backward";
  auto guard = guard_for(input);
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(CellKind::kLSTM, input, w_ih, w_hh, b_ih, b_hh, {}, w_hr, hx, cx, s);
  const int64_t H = d.H, Hout = d.Hout, G = 4 * H, N = s.N;
  const bool proj = w_hr.has_value();
  const std::pair<Zone, Zone> zones =
      check_zones(op, zoneout_c, zoneout_h, input, true, N, H, Hout);
  const Zone &zone_c = zones.first, &zone_h = zones.second;
  // zoned: the row pass leaves the direct part of dh_{t-1} in dh_state, the GEMM adds onto it
  const float dh_beta = zone_h.t.defined() ? 1.0f : 0.0f;
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
  const StepChunks sc = ln_chunks(s);
  const Tensor dx = large_buffer({sc.buf_rows, G}, acc_opts),
               dhg = large_buffer({sc.buf_rows, G}, acc_opts);
  const Tensor dho = proj ? pooled_empty({N, Hout}, acc_opts) : Tensor();
  const Tensor dr = proj ? at::empty({s.B, H}, acc_opts) : Tensor();
  // W_hh^T (Hout, G), so that the per-step dh_{t-1} = dhg W_hh reads it transposed, as the
  // forward's GEMM reads W_hh (a plain W_hh made MKL repack it on every step)
  const Tensor w_hh_t = transposed(w_hh, acc_st);
  const Tensor w_hr_a = proj ? w_hr->to(acc_st).contiguous() : Tensor();
  const Tensor gi = g_ih.contiguous(), gh = g_hh.contiguous(), gc = g_c.contiguous(),
               bc = b_c.contiguous();
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
        acc_t* const dhgp = dhg.data_ptr<acc_t>();
        acc_t* const drp = proj ? dr.data_ptr<acc_t>() : nullptr;
        auto block = [&](size_t i) { return block_of(workspace, blocks, i, N); };
        InputSide in(input, w_ih, output_mask, acc_st, N);
        // the chunks' weight gradients (op-math type), and the column sums Σda, Σda x̂, Σda ĥ,
        // Σdyc, Σdyc ĉ that the row passes add to (cells/layer_norm.h)
        Tensor gw_hh, gw_hr;
        if (output_mask[1]) {
          gw_hh = pooled_empty({G, Hout}, acc_opts);
          if (proj) gw_hr = pooled_empty({Hout, H}, acc_opts);
        }
        const GradSums sums(3 * G + 2 * H, s.B, acc_opts);
        auto finish_chunk = [&](const StepChunks::Chunk& ch) {
          const int64_t lo = ch.lo, m = ch.hi - ch.lo;
          const float beta = &ch == &sc.chunks.front() ? 0.0f : 1.0f;
          if (output_mask[1]) {
            gemm(gw_hh, rows(dhg, 0, m).t(), rows(block(kHPrev), lo, m), beta);
            if (proj) gemm(gw_hr, rows(dho, lo, m).t(), rows(block(kR), lo, m), beta);
          }
          in.add_chunk(dx, lo, m, beta);
        };
        LNStep<scalar_t> base = step_base<scalar_t>(H, Hout, blocks, N, w);
        base.g_ih = gi.const_data_ptr<scalar_t>();
        base.g_hh = gh.const_data_ptr<scalar_t>();
        base.g_c = gc.const_data_ptr<scalar_t>();
        base.b_c = bc.const_data_ptr<scalar_t>();
        base.dc_state = dcs;
        base.dx = dx.data_ptr<acc_t>();
        base.dhg = dhgp;
        const StepGemm<acc_t> dh_product(dev, w_hh_t.t(), s);  // dhg W_hh
        for (int64_t k = s.T - 1; k >= 0; --k) {
          const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
          const StepChunks::Chunk& ch = sc.of(k);
          if (dyp) add_rows(dev, dhs, dyp + r0 * Hout, n * Hout);
          if (proj) {
            // dL/dh_t kept per chunk for the gradient of W_hr; zoned, (1 - d_h) of it (the
            // gradient of h̃_t) and d_h of it left in dh_state (ZoneStep)
            acc_t* const dho_t = dho.data_ptr<acc_t>() + r0 * Hout;
            if (zone_h.t.defined()) {
              FUSEDRNN_LAUNCH(dev, zone_backward_step,
                              zone_rows<acc_t, scalar_t>(zone_h, r0, n, Hout, dho_t, dhs));
            } else {
              dev.copy(dho_t, dhs, n * Hout);
            }
            dev.gemm(n, H, Hout, dho_t, Hout, false, w_hr_a.const_data_ptr<acc_t>(), H, false, drp,
                     H, 0.0f);
          }
          const acc_t* const dh_in = proj ? drp : dhs;
          LNStep<scalar_t> p = base;
          p.r0 = r0;
          p.g0 = r0 - ch.lo;
          p.dh = const_cast<acc_t*>(dh_in);
          set_zone_rows(p, zone_c, proj ? Zone{} : zone_h, r0);
          run_rows(Pass::kLSTMBackward, dev, p, n, G, &sums);
          dh_product(n, dhgp + p.g0 * G, G, dhs, Hout, dh_beta);
          if (k == ch.k_lo) finish_chunk(ch);
        }
        in.finish(input, grad_input, grad_w_ih);
        if (output_mask[1]) {
          const auto dt = input.scalar_type();
          grad_w_hh = gw_hh.to(dt);
          const Tensor total = sums.total();
          if (b_ih.has_value()) {
            grad_b_ih = total.narrow(0, 0, G).to(dt);
            grad_b_hh = grad_b_ih.clone();
          }
          grad_g_ih = total.narrow(0, G, G).to(dt);
          grad_g_hh = total.narrow(0, 2 * G, G).to(dt);
          grad_b_c = total.narrow(0, 3 * G, H).to(dt);
          grad_g_c = total.narrow(0, 3 * G + H, H).to(dt);
          if (proj) grad_w_hr = gw_hr.to(dt);
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
                                                  bool need_workspace,
                                                  const optional<Tensor>& zoneout_h) {
  const char* op = "layer_norm_gru_forward";
  auto guard = guard_for(input);
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(CellKind::kGRU, input, w_ih, w_hh, b_ih, b_hh, {}, {}, hx, {}, s);
  const int64_t H = d.H, G = 3 * H;
  const Zone zone_h = check_zone(op, "zoneout_h", zoneout_h, input, s.N, H);
  check_gain(op, "ln_weight_ih", g_ih, input, G);
  check_gain(op, "ln_weight_hh", g_hh, input, G);
  const auto opts = input.options();
  const at::ScalarType acc_st = acc_dtype(input.scalar_type());
  const auto acc_opts = opts.dtype(acc_st);
  const Blocks blocks = gru_blocks(H);
  const int64_t rows = need_workspace ? s.N : s.B;  // as in the LSTM
  const Tensor ws = large_buffer({blocks.numel(rows)}, acc_opts);
  const Tensor output = pooled_empty(out_shape(input, H), opts);
  const Tensor h_state = state_or_zeros(hx, input, s.B, H);
  const Tensor hg = pooled_empty({s.B, G}, opts);
  // (zeros without biases, as in the LSTM)
  const Tensor bi = b_ih.has_value() ? b_ih->contiguous() : at::zeros({G}, opts);
  const Tensor bh = b_hh.has_value() ? b_hh->contiguous() : at::zeros({G}, opts);
  const Tensor w_hh_c = w_hh.contiguous(), gi = g_ih.contiguous(), gh = g_hh.contiguous();
  const StepDevice dev(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "layer_norm_gru_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (s.N == 0) return;
        acc_t* const w = ws.data_ptr<acc_t>();
        LNInput<scalar_t, acc_t> xp(s, input, w_ih, 3,
                                    need_workspace ? block_of(ws, blocks, 0, rows) : Tensor());
        scalar_t* const out = output.data_ptr<scalar_t>();
        scalar_t* const hs = h_state.data_ptr<scalar_t>();
        scalar_t* const hgp = hg.data_ptr<scalar_t>();
        const scalar_t* const bip = bi.const_data_ptr<scalar_t>();
        const scalar_t* const bhp = bh.const_data_ptr<scalar_t>();
        LNStep<scalar_t> base = step_base<scalar_t>(H, H, blocks, rows, w);
        base.keep = need_workspace;
        base.g_ih = gi.const_data_ptr<scalar_t>();
        base.g_hh = gh.const_data_ptr<scalar_t>();
        base.b_ih = bip;
        base.b_hh = bhp;
        base.hg = hgp;
        base.h_state = hs;
        const StepGemm<scalar_t> hh_product(dev, w_hh_c.t(), s, 3);  // h_{t-1} W_hh^T
        for (int64_t k = 0; k < s.T; ++k) {
          const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
          hh_product(n, hs, H, hgp, G, 0.0f);
          LNStep<scalar_t> p = base;
          p.r0 = need_workspace ? r0 : 0;
          p.xp = xp.rows_of(k);
          p.out = out + r0 * H;
          set_zone_rows(p, Zone{}, zone_h, r0);
          run_rows(Pass::kGRUForward, dev, p, n, G);
        }
      });
  return {output, h_state, need_workspace ? ws : at::empty({0}, acc_opts)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_backward(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_hy, const Tensor& input,
    const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh, const Tensor& g_ih, const Tensor& g_hh,
    const optional<Tensor>& hx, const optional<Tensor>& batch_sizes, bool reverse,
    const Tensor& workspace, std::array<bool, 2> output_mask, const optional<Tensor>& zoneout_h) {
  const char* op = "layer_norm_gru_backward";
  auto guard = guard_for(input);
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(CellKind::kGRU, input, w_ih, w_hh, b_ih, b_hh, {}, {}, hx, {}, s);
  const int64_t H = d.H, G = 3 * H, N = s.N;
  const Zone zone_h = check_zone(op, "zoneout_h", zoneout_h, input, N, H);
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
  const StepChunks sc = ln_chunks(s);
  const Tensor dx = large_buffer({sc.buf_rows, G}, acc_opts),
               dhg = large_buffer({sc.buf_rows, G}, acc_opts);
  const Tensor w_hh_t = transposed(w_hh, acc_st);  // as in the LSTM's backward
  const Tensor gi = g_ih.contiguous(), gh = g_hh.contiguous();
  const Tensor bh = b_hh.has_value() ? b_hh->contiguous() : at::zeros({G}, opts);
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
        acc_t* const dhgp = dhg.data_ptr<acc_t>();
        InputSide in(input, w_ih, output_mask, acc_st, N);
        // the chunks' grad_weight_hh, and the column sums Σdxs, Σdxs x̂, Σdhs, Σdhs ĥ that the
        // row passes add to (cells/layer_norm.h)
        Tensor gw_hh;
        if (output_mask[1]) gw_hh = pooled_empty({G, H}, acc_opts);
        const GradSums sums(4 * G, s.B, acc_opts);
        auto finish_chunk = [&](const StepChunks::Chunk& ch) {
          const int64_t lo = ch.lo, m = ch.hi - ch.lo;
          const float beta = &ch == &sc.chunks.front() ? 0.0f : 1.0f;
          if (output_mask[1]) {
            gemm(gw_hh, rows(dhg, 0, m).t(), rows(block_of(workspace, blocks, kGHPrev, N), lo, m),
                 beta);
          }
          in.add_chunk(dx, lo, m, beta);
        };
        LNStep<scalar_t> base = step_base<scalar_t>(H, H, blocks, N, w);
        base.g_ih = gi.const_data_ptr<scalar_t>();
        base.g_hh = gh.const_data_ptr<scalar_t>();
        base.b_hh = bh.const_data_ptr<scalar_t>();
        base.dh = dhsp;
        base.dx = dx.data_ptr<acc_t>();
        base.dhg = dhgp;
        const StepGemm<acc_t> dh_product(dev, w_hh_t.t(), s);  // dhg W_hh
        for (int64_t k = s.T - 1; k >= 0; --k) {
          const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
          const StepChunks::Chunk& ch = sc.of(k);
          if (dyp) add_rows(dev, dhsp, dyp + r0 * H, n * H);
          LNStep<scalar_t> p = base;
          p.r0 = r0;
          p.g0 = r0 - ch.lo;
          set_zone_rows(p, Zone{}, zone_h, r0);
          run_rows(Pass::kGRUBackward, dev, p, n, G, &sums);
          dh_product(n, dhgp + p.g0 * G, G, dhsp, H, 1.0f);
          if (k == ch.k_lo) finish_chunk(ch);
        }
        in.finish(input, grad_input, grad_w_ih);
        if (output_mask[1]) {
          const auto dt = input.scalar_type();
          grad_w_hh = gw_hh.to(dt);
          const Tensor total = sums.total();
          if (b_ih.has_value()) {
            grad_b_ih = total.narrow(0, 0, G).to(dt);
            grad_b_hh = total.narrow(0, 2 * G, G).to(dt);
          }
          grad_g_ih = total.narrow(0, G, G).to(dt);
          grad_g_hh = total.narrow(0, 3 * G, G).to(dt);
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

const cpu::LayerNormKernels& cpu::layer_norm_kernels() {
  switch (current_isa()) {
    case Isa::kAVX512BF16:  // the row loops have no use for the bf16 dot products
    case Isa::kAVX512:
      return *layer_norm_kernels_avx512();
    case Isa::kAVX2:
      return *layer_norm_kernels_avx2();
    case Isa::kBaseline:
      break;
  }
  return portable::kLayerNormKernels;
}

namespace {
void register_layer_norm(torch::Library& m) {
  m.impl("layer_norm_lstm_forward", &driver::ln_lstm_forward);
  m.impl("layer_norm_lstm_backward", &driver::ln_lstm_backward);
  m.impl("layer_norm_gru_forward", &driver::ln_gru_forward);
  m.impl("layer_norm_gru_backward", &driver::ln_gru_backward);
}
}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) { register_layer_norm(m); }
#ifdef FUSEDRNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) { register_layer_norm(m); }
#endif

}  // namespace fusedrnn
