// The buffers of one layer call: states, the LSTM-family workspace layout, the input projection,
// and the raw-pointer helpers the step structs are filled with.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "execution/gemm.h"
#include "execution/buffer_pool.h"
#include "kernels/cpu/fused_step.h"
#include "kernels/kernels.h"
#include "ops/args.h"
#include "steps.h"

namespace fusedrnn {
namespace driver {

// A contiguous copy of t (its own memory: the steps write the state in place). A contiguous
// CPU tensor is copied with memcpy: a cell call copies its states on every step, and clone()
// costs a microsecond of dispatch each.
inline Tensor fresh_copy(const Tensor& t) {
  if (t.device().is_cpu() && t.is_contiguous()) {
    Tensor out = at::empty(t.sizes(), t.options());
    if (t.numel() > 0) std::memcpy(out.data_ptr(), t.const_data_ptr(), t.nbytes());
    return out;
  }
  return t.clone(at::MemoryFormat::Contiguous);
}

// The ZoneStep (kernels.h: a projected LSTM's zoneout of h_t) of rows [r0, r0 + n) of
// zoneout's weights z (of type W), over `width` columns of out, state and dy.
template <typename T, typename W>
ZoneStep<T, W> zone_rows(const Zone& z, int64_t r0, int64_t n, int64_t width, T* out, T* state,
                         const T* dy = nullptr) {
  ZoneStep<T, W> p;
  p.n = n;
  p.H = width;
  p.zone = z.t.const_data_ptr<W>() + r0 * z.ld;
  p.ld_zone = z.ld;
  p.out = out;
  p.state = state;
  p.dy = dy;
  return p;
}

inline Tensor state_or_zeros(const c10::optional<Tensor>& t, const Tensor& like, int64_t B,
                             int64_t H) {
  if (t.has_value()) return fresh_copy(*t);
  return at::zeros({B, H}, like.options());
}

// b_ih + b_hh, contiguous, rounded once to the dtype as at::add does; on the CPU a loop (one
// call per step of a cell: at::add's dispatch would cost as much as the loop's arithmetic).
inline Tensor bias_sum(const Tensor& b_ih, const Tensor& b_hh) {
  if (!(b_ih.device().is_cpu() && b_ih.is_contiguous() && b_hh.is_contiguous())) {
    return at::add(b_ih, b_hh).contiguous();
  }
  Tensor out = at::empty(b_ih.sizes(), b_ih.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, b_ih.scalar_type(), "bias_sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = b_ih.const_data_ptr<scalar_t>();
    const scalar_t* b = b_hh.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < out.numel(); ++i) {
      o[i] = static_cast<scalar_t>(static_cast<acc_t>(a[i]) + static_cast<acc_t>(b[i]));
    }
  });
  return out;
}

inline Tensor grad_or_zeros(const c10::optional<Tensor>& g, const Tensor& like, int64_t B,
                            int64_t H) {
  if (g.has_value() && g->defined()) return fresh_copy(*g);
  return at::zeros({B, H}, like.options());
}

template <typename scalar_t>
scalar_t* ptr(const Tensor& t) {
  return t.data_ptr<scalar_t>();
}

template <typename scalar_t>
const scalar_t* opt_ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
scalar_t* maybe_ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

inline c10::optional<Tensor> contiguous_opt(const c10::optional<Tensor>& t) {
  return t.has_value() ? c10::optional<Tensor>(t->contiguous()) : c10::nullopt;
}

// input's shape with the last dimension replaced by `features`
inline std::vector<int64_t> out_shape(const Tensor& input, int64_t features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = features;
  return shape;
}

// The LSTM-family workspace: one flat buffer holding, one after the other, the row-major blocks
// gates (N, 4H) [i | f | g | o], c (N, H), with projection r (N, H) = o * tanh(c), and for the
// working-memory cell u (N, 3H) = tanh outputs [u_i | u_f | u_o]. Each block contiguous, so that
// a step's rows of each are one dense matrix for the GEMMs.
struct LSTMWorkspace {
  Tensor flat, gates, c, r, u;
  static int64_t numel(CellKind cell, int64_t N, int64_t H, bool proj) {
    return N * workspace_row(cell, H, proj);  // cells/traits.h
  }
  // No workspace (inference): the empty buffer the op returns, no blocks.
  explicit LSTMWorkspace(const at::TensorOptions& opts) : flat(at::empty({0}, opts)) {}
  LSTMWorkspace(const Tensor& buffer, CellKind cell, int64_t N, int64_t H, bool proj)
      : flat(buffer) {
    int64_t off = 0;
    auto block = [&](int64_t cols) {
      Tensor t = flat.narrow(0, off, N * cols).view({N, cols});
      off += N * cols;
      return t;
    };
    gates = block(4 * H);
    c = block(H);
    if (proj) r = block(H);
    if (keeps_connection_outputs(cell)) u = block(3 * H);
    TORCH_INTERNAL_ASSERT(off == numel(cell, N, H, proj), "LSTMWorkspace: the blocks (", off,
                          " values) do not fill the workspace of cells/traits.h");
  }
};

// The input projection x W_ih^T of the rows a step reads (`width` columns a row, the first
// w_ih_t.size(1) of them written). With a workspace (training) it is one GEMM over all rows,
// before the loop, into the workspace's gate block; on CUDA it is that one GEMM always (into a
// buffer of all rows without a workspace): one large GEMM, and no GEMM of ATen's between the
// steps. Without a workspace on the CPU, it is computed for a chunk of consecutive steps at a
// time into a small reused buffer: less memory, and the projection is still in cache when its
// steps run. Both give the same bits: the small GEMMs (gemm.h) project only calls of at most
// kSmallGemmMaxRowsNt rows in all (one chunk either way), never a short chunk of a longer call.
// On the CPU in fp32 and bf16, for a call the fused tiles would take (cpu::fused_kernels_for),
// the GEMM is the tiles' panel GEMM from W_ih^T packed once per call, kChunkRows rows at a time
// in both cases (each output row's sums in the same order, however the rows are grouped): a
// GEMM library packs both operands again on every call, which cost 4-15% of the GRU's and the
// layer-normalised layers' inference forward at T=100 B=64 H=256 on a Zen 1 core
// (docs/performance.md).
class InputProjection {
 public:
  // w_ih_t: W_ih^T, the transposed view of W_ih (gates * H, I), its rows `gates` blocks of H
  InputProjection(const Steps& s, const Tensor& x, const Tensor& w_ih_t, int64_t gates, Tensor full,
                  int64_t width, const at::TensorOptions& opts)
      : s_(s), x_(x), w_ih_t_(w_ih_t), width_(width), small_ok_(s.N <= kSmallGemmMaxRowsNt) {
    TORCH_INTERNAL_ASSERT(w_ih_t.dim() == 2 && w_ih_t.size(1) % gates == 0,
                          "InputProjection: W_ih^T of ", w_ih_t.size(1), " columns, not ", gates,
                          " gates");
    if (!small_ok_ && x.is_contiguous() && x.dim() == 2 && x.size(1) == w_ih_t.size(0)) {
      k_ = cpu::fused_kernels_for(x, s.T, s.N, s.B, /*wide_short_calls=*/false);
      // packed from W_ih itself, gate-blocked as the tiles' weights (through the registers; a
      // plain packing of the transposed view copied it element by element first)
      if (k_ != nullptr) w_ = cpu::pack_weight(w_ih_t.t(), gates, *k_);
    }
    if (!full.defined() && x.is_cuda()) full = at::empty({s.N, width}, opts);
    if (full.defined()) {
      buf_ = full;
      if (s.N > 0) project(buf_, 0, s.N);
      lo_ = 0;
      hi_ = s.N;
    } else {
      cap_ = std::max<int64_t>(kChunkRows, s.B);
      buf_ = pooled_empty({std::min(cap_, s.N), width}, opts);
    }
    base_ = buf_.data_ptr();
  }
  // The projection's rows of the k-th processed step (row stride `width`).
  template <typename scalar_t>
  scalar_t* rows_for(int64_t k) {
    const int64_t t = s_.at(k);
    if (s_.off[t] < lo_ || s_.off[t] + s_.n[t] > hi_) {
      int64_t k1 = k + 1;
      while (k1 < s_.T && span(k, k1 + 1).second - span(k, k1 + 1).first <= cap_) ++k1;
      std::tie(lo_, hi_) = span(k, k1);
      project(buf_, lo_, hi_ - lo_);
    }
    return static_cast<scalar_t*>(base_) + (s_.off[t] - lo_) * width_;
  }

 private:
  // Rows [0, m) of dst (first G columns) = rows [lo, lo + m) of x times W_ih^T. The rows of a
  // short fp32 call with contiguous operands (a cell call's step) go to the small GEMMs on the
  // pointers, without the row views.
  void project(const Tensor& dst, int64_t lo, int64_t m) {
    const int64_t G = w_ih_t_.size(1), I = w_ih_t_.size(0);
    if (k_ != nullptr) {
      // (fused_kernels_for takes float and bf16 only)
      if (x_.scalar_type() == at::kFloat) return packed<float>(dst, lo, m);
      return packed<c10::BFloat16>(dst, lo, m);
    }
    if (small_ok_ && x_.scalar_type() == at::kFloat && x_.device().is_cpu() && x_.is_contiguous() &&
        dst.is_contiguous() && w_ih_t_.stride(0) == 1 && w_ih_t_.stride(1) == I && I > 0 &&
        small_gemm_f32(m, G, I, x_.const_data_ptr<float>() + lo * I, I,
                       w_ih_t_.const_data_ptr<float>(), I, /*w_transposed=*/true,
                       dst.data_ptr<float>(), width_, 0.0f)) {
      return;
    }
    gemm(rows(dst, 0, m).narrow(1, 0, G), rows(x_, lo, m), w_ih_t_, 0.0f, small_ok_);
  }
  // project()'s rows through the fused kernels' panel GEMM from W_ih^T packed once per call,
  // kChunkRows rows at a time (a chunk's input rows stay in cache across the panels).
  template <typename T>
  void packed(const Tensor& dst, int64_t lo, int64_t m) const {
    const int64_t I = w_ih_t_.size(0);
    TORCH_INTERNAL_ASSERT(
        dst.scalar_type() == x_.scalar_type() && dst.stride(0) == width_ && dst.stride(1) == 1,
        "InputProjection: a buffer of another layout");
    const T* x = x_.const_data_ptr<T>() + lo * I;
    T* out = dst.data_ptr<T>();
    const cpu::FusedSteps f(*k_);
    for (int64_t r = 0; r < m; r += kChunkRows) {
      f.gemm<T>(out + r * width_, width_, {x + r * I, I, &w_}, std::min(kChunkRows, m - r), false);
    }
  }
  // The input rows owned by the processed steps [k0, k1): one contiguous range.
  std::pair<int64_t, int64_t> span(int64_t k0, int64_t k1) const {
    int64_t a = s_.at(k0), b = s_.at(k1 - 1);
    if (a > b) std::swap(a, b);
    return {s_.off[a], s_.off[b] + s_.n[b]};
  }
  static constexpr int64_t kChunkRows = 128;
  const Steps& s_;
  const Tensor& x_;
  const Tensor& w_ih_t_;
  int64_t width_;
  bool small_ok_;
  const cpu::FusedStepKernels* k_ = nullptr;  // the fused kernels' GEMM, where they take the call
  cpu::PackedWeight w_;
  Tensor buf_;
  void* base_ = nullptr;
  int64_t lo_ = 0, hi_ = 0, cap_ = 0;
};

}  // namespace driver
}  // namespace fusedrnn
