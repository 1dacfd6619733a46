// The recurrence: one layer, one direction, forward and backward, for every cell and device.
//
// Per step the recurrent GEMM goes through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA) and the
// pointwise part through ONE fused step kernel (two for the working-memory cell, whose o gate
// needs a GEMM of the new cell state). All buffers are allocated once per call, before the loop;
// the input projection of every step is one GEMM before the loop and the weight gradients are
// GEMMs over all rows after the backward loop.
//
// fp32 on an AVX-512 CPU takes the fused steps of cpu/fused_step.h instead: the step's GEMM
// (in the forward with the input projection folded in) and its pointwise kernel in one tiled
// pass over weights packed once per call. The loop, buffers and weight gradients stay the same.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <array>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/fused_step.h"
#include "kernels.h"

#ifdef FUSEDRNN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fusedrnn {
namespace {

using at::Tensor;
using c10::optional;

const char* cell_name(CellKind cell) {
  switch (cell) {
    case CellKind::kLSTM: return "lstm";
    case CellKind::kPeephole: return "peephole_lstm";
    case CellKind::kWorkingMemory: return "wm_lstm";
    case CellKind::kGRU: return "gru";
  }
  return "?";
}

// Row layout of the steps: step t owns rows [off[t], off[t] + n[t]) of the input, the output and
// the workspace, and processes rows [0, n[t]) of the state.
struct Steps {
  int64_t T = 0, B = 0, N = 0;
  std::vector<int64_t> n, off;
  bool reverse = false;
  // time index of the k-th processed step
  int64_t at(int64_t k) const { return reverse ? T - 1 - k : k; }
};

Steps make_steps(const char* op, const Tensor& input, const optional<Tensor>& batch_sizes,
                 bool reverse) {
  Steps s;
  s.reverse = reverse;
  if (batch_sizes.has_value()) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(input.dim() == 2, op, ": with batch_sizes, input must be packed 2-D (sum(batch_sizes), input_size), got ", input.dim(), "-D input of shape ", input.sizes());
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(), op, ": batch_sizes must be a 1-D int64 CPU tensor, got ", bs.dim(), "-D ", bs.scalar_type(), " on ", bs.device());
    auto bs_c = bs.contiguous();
    const int64_t* p = bs_c.data_ptr<int64_t>();
    s.T = bs_c.numel();
    s.n.resize(s.T);
    s.off.resize(s.T);
    int64_t total = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      TORCH_CHECK(p[t] > 0, op, ": batch_sizes must be positive, got batch_sizes[", t, "] = ", p[t]);
      TORCH_CHECK(t == 0 || p[t] <= p[t - 1], op, ": batch_sizes must be non-increasing, got batch_sizes[", t - 1, "] = ", p[t - 1], " followed by ", p[t]);
      s.n[t] = p[t];
      s.off[t] = total;
      total += p[t];
    }
    TORCH_CHECK(total == input.size(0), op, ": sum(batch_sizes) = ", total, " must equal input.size(0) = ", input.size(0));
    s.B = s.T > 0 ? s.n[0] : 0;
    s.N = total;
  } else {
    TORCH_CHECK(input.dim() == 3, op, ": input must be 3-D (seq_len, batch, input_size) when batch_sizes is None, got ", input.dim(), "-D input of shape ", input.sizes());
    s.T = input.size(0);
    s.B = input.size(1);
    s.N = s.T * s.B;
    s.n.assign(s.T, s.B);
    s.off.resize(s.T);
    for (int64_t t = 0; t < s.T; ++t) s.off[t] = t * s.B;
  }
  return s;
}

void check_tensor(const char* op, const char* name, const Tensor& t, const Tensor& input,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " must have the dtype of input (", input.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the device of input (", input.device(), "), got ", t.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_opt(const char* op, const char* name, const optional<Tensor>& t, const Tensor& input,
               at::IntArrayRef shape) {
  if (t.has_value()) check_tensor(op, name, *t, input, shape);
}

bool is_float_type(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

// Sizes of one layer call, checked against every argument.
struct Dims {
  int64_t I = 0, H = 0, Hout = 0;
};

Dims check_args(CellKind cell, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                const optional<Tensor>& w_ch, const optional<Tensor>& w_hr,
                const optional<Tensor>& hx, const optional<Tensor>& cx, const Steps& s) {
  const char* op = cell_name(cell);
  const int64_t G = cell == CellKind::kGRU ? 3 : 4;
  TORCH_CHECK(is_float_type(input.scalar_type()), op, ": input must be float32, float64, bfloat16 or float16, got ", input.scalar_type());
  TORCH_CHECK(input.device().is_cpu() || input.device().is_cuda(), op, ": input must be a CPU or CUDA tensor, got ", input.device());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % G == 0 && w_ih.size(0) > 0, op, ": weight_ih must be 2-D (", G, "*hidden_size, input_size), got shape ", w_ih.sizes());
  Dims d;
  d.I = input.size(-1);
  d.H = w_ih.size(0) / G;
  d.Hout = w_hr.has_value() ? w_hr->size(0) : d.H;
  check_tensor(op, "weight_ih", w_ih, input, {G * d.H, d.I});
  check_tensor(op, "weight_hh", w_hh, input, {G * d.H, d.Hout});
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), op, ": bias_ih and bias_hh must be given together");
  check_opt(op, "bias_ih", b_ih, input, {G * d.H});
  check_opt(op, "bias_hh", b_hh, input, {G * d.H});
  switch (cell) {
    case CellKind::kLSTM:
      TORCH_CHECK(!w_ch.has_value(), op, ": weight_ch must be None for the plain LSTM");
      break;
    case CellKind::kPeephole:
      TORCH_CHECK(w_ch.has_value(), op, ": weight_ch (3, hidden_size) is required");
      check_tensor(op, "weight_ch", *w_ch, input, {3, d.H});
      break;
    case CellKind::kWorkingMemory:
      TORCH_CHECK(w_ch.has_value(), op, ": weight_ch (3*hidden_size, hidden_size) is required");
      check_tensor(op, "weight_ch", *w_ch, input, {3 * d.H, d.H});
      break;
    case CellKind::kGRU: break;
  }
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) > 0 && w_hr->size(0) < d.H, op, ": weight_hr must be 2-D (proj_size, hidden_size) with 0 < proj_size < hidden_size, got shape ", w_hr->sizes());
    check_tensor(op, "weight_hr", *w_hr, input, {d.Hout, d.H});
  }
  check_opt(op, "hx", hx, input, {s.B, d.Hout});
  check_opt(op, "cx", cx, input, {s.B, d.H});
  return d;
}

Tensor state_or_zeros(const optional<Tensor>& t, const Tensor& like, int64_t B, int64_t H) {
  if (t.has_value()) return t->clone(at::MemoryFormat::Contiguous);
  return at::zeros({B, H}, like.options());
}

Tensor grad_or_zeros(const optional<Tensor>& g, const Tensor& like, int64_t B, int64_t H) {
  if (g.has_value() && g->defined()) return g->clone(at::MemoryFormat::Contiguous);
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

#ifdef FUSEDRNN_WITH_CUDA
void* current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
#define FUSEDRNN_LAUNCH(dev, fn, ...)                                  \
  do {                                                                 \
    if ((dev).is_cuda()) {                                             \
      cuda::fn(__VA_ARGS__, current_stream());                         \
    } else {                                                           \
      cpu::fn(__VA_ARGS__);                                            \
    }                                                                  \
  } while (0)
#else
#define FUSEDRNN_LAUNCH(dev, fn, ...)                                                 \
  do {                                                                                \
    TORCH_CHECK(!(dev).is_cuda(), "fusedrnn was built without CUDA support");          \
    cpu::fn(__VA_ARGS__);                                                             \
  } while (0)
#endif

std::unique_ptr<c10::DeviceGuard> guard_for(const Tensor& t) {
  return std::make_unique<c10::DeviceGuard>(t.device());
}

// The LSTM-family workspace: one flat buffer holding, one after the other, the row-major blocks
// gates (N, 4H) [i | f | g | o], c (N, H), with projection r (N, H) = o * tanh(c), and for the
// working-memory cell u (N, 3H) = tanh outputs [u_i | u_f | u_o]. Each block contiguous, so that
// a step's rows of each are one dense matrix for the GEMMs.
struct LSTMWorkspace {
  Tensor flat, gates, c, r, u;
  static int64_t numel(CellKind cell, int64_t N, int64_t H, bool proj) {
    return N * H * (5 + (proj ? 1 : 0) + (cell == CellKind::kWorkingMemory ? 3 : 0));
  }
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
    if (cell == CellKind::kWorkingMemory) u = block(3 * H);
  }
};

}  // namespace
}  // namespace fusedrnn

// ATen's oneDNN matmul (result = beta * result + alpha * mat1 @ mat2). It is exported by
// libtorch_cpu but has no installed header; declared weak so that a torch built without it
// still loads this library, which then uses at::mm. On CPUs where MKL's sgemm does not pick its
// best kernels (non-Intel x86), oneDNN is ~25% faster at the shapes of a recurrence.
namespace at::native {
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2,
                                         const at::Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace fusedrnn {
namespace {

// oneDNN's matmul costs ~20 us per call on top of the arithmetic (descriptor and primitive
// cache look-ups), MKL's ~2 us: the small per-step GEMMs of short hidden sizes and batches go to
// at::mm, the large ones (input projection, weight gradients, big steps) to oneDNN.
constexpr int64_t kOneDnnMinMacs = int64_t{1} << 22;

bool use_onednn_gemm(const Tensor& out, int64_t k) {
  static const bool enabled = [] {
    const char* env = std::getenv("FUSEDRNN_CPU_GEMM");
    return &at::native::mkldnn_matmul != nullptr && at::hasMKLDNN() &&
           !(env && std::string(env) == "aten");
  }();
  return enabled && out.device().is_cpu() && out.numel() * k >= kOneDnnMinMacs &&
         (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16);
}

// out = beta * out + a @ b, written into `out` (often a view: rows of a state, columns of the
// workspace). beta is 0 or 1.
void gemm(Tensor out, const Tensor& a, const Tensor& b, float beta = 0.0f) {
  if (out.numel() == 0) return;
  if (a.size(1) == 0) {
    if (beta == 0.0f) out.zero_();
    return;
  }
  if (use_onednn_gemm(out, a.size(1))) {
    at::native::mkldnn_matmul(a, b, out, beta, 1.0f);
  } else if (beta == 0.0f) {
    at::mm_out(out, a, b);
  } else {
    out.addmm_(a, b);
  }
}

// input's shape with the last dimension replaced by `features`
std::vector<int64_t> out_shape(const Tensor& input, int64_t features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = features;
  return shape;
}

// rows [start, start + n) of a 2-D tensor
Tensor rows(const Tensor& t, int64_t start, int64_t n) { return t.narrow(0, start, n); }

// Where the state before each step comes from, for the weight gradients of the recurrent and
// cell-connection matrices (sums over all rows of grad^T @ prev_state). Row r of step t has as
// previous state the previous processed step's saved row r if that step ran row r, else the
// initial state's row r. Segments map rows [dst, dst + count) of the step-ordered row space to
// rows [src, src + count) of the saved sequence (from_init false) or of the initial state;
// adjacent segments are merged, so a padded sequence has just two.
struct PrevSegment {
  int64_t dst, count, src;
  bool from_init;
};

// The previous processed step of step t's rows: (row count taken from it, its first row);
// count 0 for the first processed step.
std::pair<int64_t, int64_t> prev_rows(const Steps& s, int64_t k) {
  if (k == 0) return {0, 0};
  const int64_t t = s.at(k), tp = s.at(k - 1);
  return {std::min(s.n[t], s.n[tp]), s.off[tp]};
}

std::vector<PrevSegment> prev_segments(const Steps& s) {
  std::vector<PrevSegment> segs;
  auto push = [&](int64_t dst, int64_t count, int64_t src, bool from_init) {
    if (count <= 0) return;
    if (!segs.empty()) {
      PrevSegment& last = segs.back();
      if (last.from_init == from_init && last.dst + last.count == dst &&
          last.src + last.count == src) {
        last.count += count;
        return;
      }
    }
    segs.push_back({dst, count, src, from_init});
  };
  // Walk the steps in row order (time order), which is the order of `dst`.
  std::vector<int64_t> k_of_t(s.T);
  for (int64_t k = 0; k < s.T; ++k) k_of_t[s.at(k)] = k;
  for (int64_t t = 0; t < s.T; ++t) {
    const auto [m, src] = prev_rows(s, k_of_t[t]);
    push(s.off[t], m, src, false);
    push(s.off[t] + m, s.n[t] - m, m, true);
  }
  return segs;
}

// The (N, width) matrix of previous states, materialised only where the segments are many
// (packed sequences with many distinct lengths).
Tensor gather_prev(const std::vector<PrevSegment>& segs, const Tensor& seq, const Tensor& init,
                   int64_t N) {
  Tensor prev = at::empty({N, init.size(1)}, init.options());
  for (const PrevSegment& g : segs) {
    rows(prev, g.dst, g.count).copy_(rows(g.from_init ? init : seq, g.src, g.count));
  }
  return prev;
}

// h_{t-1} for the GEMM of a fused forward step that writes h_t into `state` (width columns),
// so that the GEMM must not read the state itself. The previous processed step's output rows
// hold h_{t-1} of every row of this step when that step ran at least as many rows (every step
// but the first of padded and forward-packed input), and this step does not write them; otherwise
// (the first step; reverse-packed steps whose batch grows) a copy of the state in `copy`.
const float* fused_h_prev(const Steps& s, int64_t k, const Tensor& out, const Tensor& state,
                          const Tensor& copy, int64_t width) {
  const int64_t n = s.n[s.at(k)];
  if (k > 0 && s.n[s.at(k - 1)] >= n) return ptr<float>(out) + s.off[s.at(k - 1)] * width;
  std::memcpy(ptr<float>(copy), ptr<float>(state), sizeof(float) * n * width);
  return ptr<float>(copy);
}

constexpr size_t kMaxSegmentGemms = 8;

// The backward loops keep the per-row gradients that the weight gradients need (dgates) for a
// chunk of consecutive processed steps at a time, fp32 / fp64 on the CPU (other dtypes would
// round each chunk's partial weight gradients): a chunk's part of the input and weight gradients
// is computed, accumulated, when it is done, while it is still in cache, and its buffers are
// reused two chunks later (the next chunk's first step reads the previous chunk's last rows).
// Less memory, fewer fresh pages to fault in. Otherwise one chunk holds every step.
constexpr int64_t kBackwardChunkRows = 1024;

struct StepChunks {
  struct Chunk {
    int64_t k_lo, lo, hi;  // the chunk's last processed step; its rows [lo, hi)
    int buf;               // which of the two buffers holds it
  };
  std::vector<Chunk> chunks;
  std::vector<int64_t> chunk_of;  // the chunk of each processed step
  int64_t buf_rows = 0;

  StepChunks(const Steps& s, const Tensor& input) : chunk_of(s.T) {
    const bool chunked = input.device().is_cpu() && (input.scalar_type() == at::kFloat ||
                                                     input.scalar_type() == at::kDouble);
    const int64_t cap = chunked ? std::max<int64_t>(kBackwardChunkRows, s.B) : s.N;
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = s.at(k), lo = s.off[t], hi = lo + s.n[t];
      if (chunks.empty() ||
          std::max(hi, chunks.back().hi) - std::min(lo, chunks.back().lo) > cap) {
        chunks.push_back({k, lo, hi, static_cast<int>(chunks.size() % 2)});
      } else {
        Chunk& c = chunks.back();
        c.k_lo = k;
        c.lo = std::min(lo, c.lo);
        c.hi = std::max(hi, c.hi);
      }
      chunk_of[k] = static_cast<int64_t>(chunks.size()) - 1;
    }
    for (const Chunk& c : chunks) buf_rows = std::max(buf_rows, c.hi - c.lo);
  }
  // Buffer `which` (0 or 1) of `width` columns; undefined when there is no second chunk.
  Tensor buffer(int64_t width, const at::TensorOptions& opts, int which) const {
    if (which == 1 && chunks.size() < 2) return Tensor();
    return at::empty({buf_rows, width}, opts);
  }
  const Chunk& of(int64_t k) const { return chunks[chunk_of[k]]; }
  // rows [r, r + count) of a per-row buffer pair, for a row r of processed step k
  Tensor rows_of(const Tensor (&bufs)[2], int64_t k, int64_t r, int64_t count) const {
    const Chunk& c = of(k);
    return bufs[c.buf].narrow(0, r - c.lo, count);
  }
};

// The segments of rows [lo, hi) of the row space, renumbered from 0.
std::vector<PrevSegment> clip_segments(const std::vector<PrevSegment>& segs, int64_t lo,
                                       int64_t hi) {
  std::vector<PrevSegment> out;
  for (const PrevSegment& g : segs) {
    const int64_t a = std::max(g.dst, lo), b = std::min(g.dst + g.count, hi);
    if (a < b) out.push_back({a - lo, b - a, g.src + (a - g.dst), g.from_init});
  }
  return out;
}

// out = beta * out + grad^T @ prev_state over all rows; grad is (N, G), out (G, width).
void gemm_prev(Tensor out, const Tensor& grad, const std::vector<PrevSegment>& segs,
               const Tensor& seq, const Tensor& init, float beta = 0.0f) {
  if (segs.size() > kMaxSegmentGemms) {
    gemm(out, grad.t(), gather_prev(segs, seq, init, grad.size(0)), beta);
    return;
  }
  if (segs.empty() && beta == 0.0f) out.zero_();
  for (size_t i = 0; i < segs.size(); ++i) {
    const PrevSegment& g = segs[i];
    gemm(out, rows(grad, g.dst, g.count).t(), rows(g.from_init ? init : seq, g.src, g.count),
         i == 0 ? beta : 1.0f);
  }
}

// sum over all rows of grad * prev_state; grad is (N, width), result (width,).
Tensor colsum_prev(const Tensor& grad, const std::vector<PrevSegment>& segs, const Tensor& seq,
                   const Tensor& init) {
  if (segs.size() > kMaxSegmentGemms) {
    return (grad * gather_prev(segs, seq, init, grad.size(0))).sum(0);
  }
  Tensor acc = at::zeros({grad.size(1)}, grad.options());
  for (const PrevSegment& g : segs) {
    acc += (rows(grad, g.dst, g.count) * rows(g.from_init ? init : seq, g.src, g.count)).sum(0);
  }
  return acc;
}

// The input projection x W_ih^T of the rows a step reads. With a workspace (training) it is one
// GEMM over all rows, before the loop, into the workspace's gate block. Without (inference), it
// is computed for a chunk of consecutive steps at a time into a small reused buffer: less memory,
// and the projection is still in cache when its steps run.
class InputProjection {
 public:
  InputProjection(const Steps& s, const Tensor& x, const Tensor& w_ih_t, Tensor full,
                  int64_t width, const at::TensorOptions& opts)
      : s_(s), x_(x), w_ih_t_(w_ih_t), width_(width) {
    const int64_t G = w_ih_t.size(1);
    if (full.defined()) {
      buf_ = full;
      if (s.N > 0) gemm(buf_.narrow(1, 0, G), x, w_ih_t);
      lo_ = 0;
      hi_ = s.N;
    } else {
      cap_ = std::max<int64_t>(kChunkRows, s.B);
      buf_ = at::empty({std::min(cap_, s.N), width}, opts);
    }
  }
  // Row r0 (of the input's row space) of the projection, for the k-th processed step.
  Tensor rows_for(int64_t k) {
    const int64_t t = s_.at(k);
    if (s_.off[t] < lo_ || s_.off[t] + s_.n[t] > hi_) {
      int64_t k1 = k + 1;
      while (k1 < s_.T && span(k, k1 + 1).second - span(k, k1 + 1).first <= cap_) ++k1;
      std::tie(lo_, hi_) = span(k, k1);
      gemm(rows(buf_, 0, hi_ - lo_).narrow(1, 0, w_ih_t_.size(1)), rows(x_, lo_, hi_ - lo_),
           w_ih_t_);
    }
    return rows(buf_, s_.off[t] - lo_, s_.n[t]);
  }

 private:
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
  Tensor buf_;
  int64_t lo_ = 0, hi_ = 0, cap_ = 0;
};

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_family_forward(
    CellKind cell, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& w_ch,
    const optional<Tensor>& w_hr, const optional<Tensor>& hx, const optional<Tensor>& cx,
    const optional<Tensor>& batch_sizes, bool reverse, bool need_workspace) {
  const Steps s = make_steps(cell_name(cell), input, batch_sizes, reverse);
  const Dims d = check_args(cell, input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx, s);
  auto guard = guard_for(input);
  const int64_t H = d.H, Hout = d.Hout;
  const bool proj = w_hr.has_value();
  const bool wm = cell == CellKind::kWorkingMemory;
  const auto opts = input.options();

  const Tensor x = input.reshape({s.N, d.I});
  // Training keeps every step's gates, c_t (and r_t, u_*) in the workspace; inference keeps
  // only the current step's, in per-call scratch buffers.
  const LSTMWorkspace ws(
      at::empty({need_workspace ? LSTMWorkspace::numel(cell, s.N, H, proj) : 0}, opts), cell,
      need_workspace ? s.N : 0, H, proj);
  const Tensor r_scratch = !need_workspace && proj ? at::empty({s.B, H}, opts) : Tensor();
  const Tensor u_scratch = !need_workspace && wm ? at::empty({s.B, 3 * H}, opts) : Tensor();
  // The output is allocated in its final shape (not returned as a view, so that callers may
  // modify it in place); `out` is its (N, H_out) row view.
  const Tensor output = at::empty(out_shape(input, Hout), opts);
  const Tensor out = output.view({s.N, Hout});
  Tensor hy = state_or_zeros(hx, input, s.B, Hout);
  Tensor cy = state_or_zeros(cx, input, s.B, H);
  Tensor bias = b_ih.has_value() ? at::add(*b_ih, *b_hh).contiguous() : Tensor();
  Tensor peep = cell == CellKind::kPeephole ? w_ch->contiguous() : Tensor();
  // Fused CPU steps (fp32): each step is one pass that computes x_t W_ih^T + h_{t-1} W_hh^T tile
  // by tile from weights packed here, once per call, and runs the cell on each tile (no input
  // projection before the loop). The LSTM / peephole step writes h_t into the state its GEMM
  // reads h_{t-1} from, so that GEMM reads the previous step's output rows or a copy
  // (fused_h_prev); the WM step writes h_t in its second phase only, after the GEMMs, and with a
  // projection the step writes r_t, projected into the state after the GEMM.
  const bool fused = cpu::fused_steps_enabled(input, s.T, s.N);
  cpu::PackedWeight w_ih_packed, w_hh_packed, w_ch_packed;
  Tensor x_rows, h_prev;
  std::optional<InputProjection> xproj;
  const Tensor w_ih_t = w_ih.t();
  if (fused) {
    w_ih_packed = cpu::pack_weight(w_ih, 4);
    w_hh_packed = cpu::pack_weight(w_hh, 4);
    if (wm) w_ch_packed = cpu::pack_weight(*w_ch, 3);
    if (!wm && !proj) h_prev = at::empty({s.B, Hout}, opts);
    x_rows = x.contiguous();
  } else {
    xproj.emplace(s, x, w_ih_t, need_workspace ? ws.gates : Tensor(), 4 * H, opts);
  }
  // Unfused: h_{t-1} W_hh^T of the current step. Fused: the step's gates without a workspace.
  const Tensor hg = at::empty({s.B, 4 * H}, opts);
  Tensor p_buf;  // WM: c W_ch^T for [i | f | o]
  if (wm) {
    p_buf = at::empty({s.B, 3 * H}, opts);
    gemm(p_buf.narrow(1, 0, 2 * H), cy, w_ch->narrow(0, 0, 2 * H).t());
  }
  const Tensor w_hh_t = w_hh.t();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "lstm_forward", [&] {
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
      Tensor gates;
      if (fused) {
        gates = need_workspace ? rows(ws.gates, r0, n) : rows(hg, 0, n);
      } else {
        gates = xproj->rows_for(k);
        gemm(rows(hg, 0, n), rows(hy, 0, n), w_hh_t);
      }
      LSTMForwardStep<scalar_t> p;
      p.n = n;
      p.H = H;
      p.gates = ptr<scalar_t>(gates);
      p.ld_gates = 4 * H;
      p.hg = ptr<scalar_t>(hg);
      p.save_gates = need_workspace;
      p.bias = opt_ptr<scalar_t>(bias);
      p.peephole = opt_ptr<scalar_t>(peep);
      p.c_state = ptr<scalar_t>(cy);
      // without a workspace c_t is stored twice into the state, harmlessly
      p.c_save = need_workspace ? ptr<scalar_t>(ws.c) + r0 * H : ptr<scalar_t>(cy);
      p.ld_c_save = H;
      const Tensor r_t = proj ? (need_workspace ? rows(ws.r, r0, n) : rows(r_scratch, 0, n))
                              : Tensor();
      if (proj) {
        p.h_out = ptr<scalar_t>(r_t);
        p.ld_h_out = H;
      } else {
        p.h_out = ptr<scalar_t>(out) + r0 * Hout;
        p.ld_h_out = Hout;
        p.h_state = ptr<scalar_t>(hy);
      }
      if (wm) {
        p.p = ptr<scalar_t>(p_buf);
        p.ld_p = 3 * H;
        p.u = need_workspace ? ptr<scalar_t>(ws.u) + r0 * 3 * H : ptr<scalar_t>(u_scratch);
        p.ld_u = 3 * H;
      }
      if (fused) {
        p.hg = nullptr;  // the GEMM tile is the whole pre-activation, written into p.gates
        const cpu::GemmSource x_src{ptr<float>(x_rows) + r0 * d.I, d.I, &w_ih_packed};
        if (wm) {
          cpu::lstm_forward_fused_step(cell, Phase::kIFG, p, p.gates, 4 * H, x_src,
                                       {ptr<float>(hy), Hout, &w_hh_packed});
          cpu::lstm_forward_fused_step(cell, Phase::kO, p, ptr<scalar_t>(p_buf), 3 * H,
                                       {ptr<float>(cy), H, &w_ch_packed});
        } else {
          const float* h_src =
              h_prev.defined() ? fused_h_prev(s, k, out, hy, h_prev, Hout) : ptr<float>(hy);
          cpu::lstm_forward_fused_step(cell, Phase::kWhole, p, p.gates, 4 * H, x_src,
                                       {h_src, Hout, &w_hh_packed});
        }
      } else if (wm) {
        FUSEDRNN_LAUNCH(input.device(), lstm_forward_step, cell, Phase::kIFG, p);
        gemm(rows(p_buf, 0, n), rows(cy, 0, n), w_ch->t());
        FUSEDRNN_LAUNCH(input.device(), lstm_forward_step, cell, Phase::kO, p);
      } else {
        FUSEDRNN_LAUNCH(input.device(), lstm_forward_step, cell, Phase::kWhole, p);
      }
      if (proj) {
        Tensor out_t = rows(out, r0, n);
        gemm(out_t, r_t, w_hr->t());
        rows(hy, 0, n).copy_(out_t);
      }
    }
  });

  return {output, hy, cy, ws.flat};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
lstm_family_backward(CellKind cell, const optional<Tensor>& grad_output,
                     const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy,
                     const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                     const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                     const optional<Tensor>& w_ch, const optional<Tensor>& w_hr,
                     const optional<Tensor>& hx, const optional<Tensor>& cx,
                     const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output,
                     const Tensor& workspace, std::array<bool, 2> output_mask) {
  const char* op = cell_name(cell);
  const Steps s = make_steps(op, input, batch_sizes, reverse);
  const Dims d = check_args(cell, input, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr, hx, cx, s);
  auto guard = guard_for(input);
  const int64_t H = d.H, Hout = d.Hout;
  const bool proj = w_hr.has_value();
  const auto opts = input.options();
  const int64_t ws_numel = LSTMWorkspace::numel(cell, s.N, H, proj);
  TORCH_CHECK(workspace.dim() == 1 && workspace.numel() == ws_numel && workspace.is_contiguous() && workspace.scalar_type() == input.scalar_type(), op, "_backward: workspace must be the contiguous (", ws_numel, ",) tensor returned by the forward, got shape ", workspace.sizes());
  TORCH_CHECK(output.numel() == s.N * Hout, op, "_backward: output must be the forward's output");
  const bool has_dy = grad_output.has_value() && grad_output->defined();
  if (has_dy) check_tensor(op, "grad_output", *grad_output, input, output.sizes());
  check_opt(op, "grad_hy", grad_hy, input, {s.B, Hout});
  check_opt(op, "grad_cy", grad_cy, input, {s.B, H});

  const Tensor x = input.reshape({s.N, d.I});
  const Tensor out = output.reshape({s.N, Hout});
  const LSTMWorkspace ws(workspace, cell, s.N, H, proj);
  const Tensor dy = has_dy ? grad_output->reshape({s.N, Hout}).contiguous() : Tensor();
  Tensor dh_state = grad_or_zeros(grad_hy, input, s.B, Hout);
  Tensor dc_state = grad_or_zeros(grad_cy, input, s.B, H);
  const Tensor h0 = hx.has_value() ? hx->contiguous() : at::zeros({s.B, Hout}, opts);
  const Tensor c0 = cx.has_value() ? cx->contiguous() : at::zeros({s.B, H}, opts);
  const Tensor& c_all = ws.c;
  const std::vector<PrevSegment> segs = prev_segments(s);

  // The gradients of the gate pre-activations, dgates, are kept for a chunk of consecutive
  // processed steps at a time (see StepChunks): when a chunk is done, its part of the input and
  // weight gradients is computed (accumulated) from it while it is still in cache.
  const StepChunks sc(s, input);
  using Chunk = StepChunks::Chunk;
  const Tensor dgates_buf[2] = {sc.buffer(4 * H, opts, 0), sc.buffer(4 * H, opts, 1)};
  auto dgates_rows = [&](int64_t k, int64_t r, int64_t count) {
    return sc.rows_of(dgates_buf, k, r, count);
  };
  // The gradients the chunks accumulate into.
  auto none = [&] { return at::empty({0}, opts); };  // one tensor per absent gradient: no aliasing
  Tensor grad_input = output_mask[0] ? at::empty(input.sizes(), opts) : none();
  Tensor grad_w_ih = none(), grad_w_hh = none(), grad_b = none(), grad_w_ch = none(),
         grad_w_hr = none();
  if (output_mask[1]) {
    grad_w_ih = at::zeros({4 * H, d.I}, opts);
    grad_w_hh = at::zeros({4 * H, Hout}, opts);
    if (b_ih.has_value()) grad_b = at::zeros({4 * H}, opts);
    if (cell == CellKind::kPeephole) grad_w_ch = at::zeros({3, H}, opts);
    if (cell == CellKind::kWorkingMemory) grad_w_ch = at::zeros({3 * H, H}, opts);
    if (proj) grad_w_hr = at::zeros({Hout, H}, opts);
  }
  // Per chunk as dgates: the projection's gradient of h_t (all rows), the WM's gradients of the
  // cell-connection pre-activations.
  const Tensor dh_buf[2] = {proj ? sc.buffer(Hout, opts, 0) : Tensor(),
                            proj ? sc.buffer(Hout, opts, 1) : Tensor()};
  const bool wm = cell == CellKind::kWorkingMemory;
  const Tensor dp_buf[2] = {wm ? sc.buffer(3 * H, opts, 0) : Tensor(),
                            wm ? sc.buffer(3 * H, opts, 1) : Tensor()};
  auto finish_chunk = [&](const Chunk& c) {
    const int64_t m = c.hi - c.lo;
    const Tensor dg = rows(dgates_buf[c.buf], 0, m);
    if (output_mask[0]) gemm(rows(grad_input.view({s.N, d.I}), c.lo, m), dg, w_ih);
    if (!output_mask[1]) return;
    gemm(grad_w_ih, dg.t(), rows(x, c.lo, m), 1.0f);
    const std::vector<PrevSegment> cs = clip_segments(segs, c.lo, c.hi);
    gemm_prev(grad_w_hh, dg, cs, out, h0, 1.0f);
    if (grad_b.numel()) grad_b += dg.sum(0);
    if (cell == CellKind::kPeephole) {
      grad_w_ch[0] += colsum_prev(dg.narrow(1, 0, H), cs, c_all, c0);
      grad_w_ch[1] += colsum_prev(dg.narrow(1, H, H), cs, c_all, c0);
      grad_w_ch[2] += (dg.narrow(1, 3 * H, H) * rows(c_all, c.lo, m)).sum(0);
    } else if (cell == CellKind::kWorkingMemory) {
      const Tensor dp_c = rows(dp_buf[c.buf], 0, m);
      gemm_prev(grad_w_ch.narrow(0, 0, 2 * H), dp_c.narrow(1, 0, 2 * H), cs, c_all, c0, 1.0f);
      gemm(grad_w_ch.narrow(0, 2 * H, H), dp_c.narrow(1, 2 * H, H).t(), rows(c_all, c.lo, m),
           1.0f);
    }
    if (proj) gemm(grad_w_hr, rows(dh_buf[c.buf], 0, m).t(), rows(ws.r, c.lo, m), 1.0f);
  };
  // projection: gradient of r_t (current step); WM: the cell-connection gradients in flight
  const Tensor dr = proj ? at::empty({s.B, H}, opts) : Tensor();
  Tensor dp = cell == CellKind::kWorkingMemory ? at::zeros({s.B, 3 * H}, opts) : Tensor();
  Tensor peep = cell == CellKind::kPeephole ? w_ch->contiguous() : Tensor();
  // Fused CPU steps (fp32, without projection): the GEMM that carries dh back through weight_hh
  // runs tile by tile from weight_hh packed here, each tile followed by the previous step's
  // kernel on its rows and units; for the WM cell likewise the GEMM that carries dc back through
  // weight_ch, followed by the kIFG phase. That phase writes the dp_i, dp_f the next step's
  // GEMM reads while this step's GEMM still reads the previous ones: it writes them into a
  // second dp buffer (`dp_next`), and the two swap after each step.
  const bool fused = cpu::fused_steps_enabled(input, s.T, s.N) && !proj;
  const cpu::PackedWeight w_hh_plain = fused ? cpu::pack_plain(w_hh) : cpu::PackedWeight();
  const cpu::PackedWeight w_ch_plain = fused && wm ? cpu::pack_plain(*w_ch) : cpu::PackedWeight();
  Tensor dp_next = fused && wm ? at::zeros({s.B, 3 * H}, opts) : Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "lstm_backward", [&] {
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
      LSTMBackwardStep<scalar_t> p;
      p.n = n;
      p.H = H;
      p.gates = ptr<scalar_t>(ws.gates) + r0 * 4 * H;
      p.ld_gates = 4 * H;
      p.c = ptr<scalar_t>(ws.c) + r0 * H;
      p.ld_c = H;
      const auto [m_prev, prev_row0] = prev_rows(s, k);
      p.c_prev = ptr<scalar_t>(c_all) + prev_row0 * H;
      p.ld_c_prev = H;
      p.c_init = ptr<scalar_t>(c0);
      p.m_prev = m_prev;
      p.peephole = opt_ptr<scalar_t>(peep);
      if (proj) {
        Tensor dh_t = sc.rows_of(dh_buf, k, r0, n);
        if (has_dy) {
          at::add_out(dh_t, rows(dh_state, 0, n), rows(dy, r0, n));
        } else {
          dh_t.copy_(rows(dh_state, 0, n));
        }
        gemm(rows(dr, 0, n), dh_t, *w_hr);
        p.dh = ptr<scalar_t>(dr);
        p.ld_dh = H;
      } else {
        p.dh = ptr<scalar_t>(dh_state);
        p.ld_dh = Hout;
        p.dy = has_dy ? ptr<scalar_t>(dy) + r0 * Hout : nullptr;
        p.ld_dy = Hout;
      }
      p.dc_state = ptr<scalar_t>(dc_state);
      p.dgates = ptr<scalar_t>(dgates_rows(k, r0, n));
      p.ld_dgates = 4 * H;
      // The phase that reads dh_t (kWhole; WM kO). Fused: dh_t = dgates(next processed step)
      // W_hh tile by tile, each tile's step kernel after it; unfused: dh_t is already there.
      auto dh_phase = [&](Phase phase) {
        if (fused && k + 1 < s.T) {
          const int64_t t_next = s.at(k + 1);
          cpu::lstm_backward_fused_step(
              cell, phase, p, ptr<scalar_t>(dh_state), Hout,
              {ptr<float>(dgates_rows(k + 1, s.off[t_next], s.n[t_next])), 4 * H, &w_hh_plain},
              s.n[t_next]);
        } else {
          FUSEDRNN_LAUNCH(input.device(), lstm_backward_step, cell, phase, p);
        }
      };
      if (cell == CellKind::kWorkingMemory) {
        p.u = ptr<scalar_t>(ws.u) + r0 * 3 * H;
        p.ld_u = 3 * H;
        p.dp = ptr<scalar_t>(dp);
        p.ld_dp = 3 * H;
        p.dp_saved = ptr<scalar_t>(sc.rows_of(dp_buf, k, r0, n));
        p.ld_dp_saved = 3 * H;
        dh_phase(Phase::kO);
        // dc_t += dp_o(t) W_co + [dp_i, dp_f](next step) [W_ci; W_cf]; rows of dp whose
        // next step did not run them are still zero.
        if (fused) {
          p.dp = ptr<scalar_t>(dp_next);
          cpu::lstm_backward_fused_step(cell, Phase::kIFG, p, ptr<scalar_t>(dc_state), H,
                                        {ptr<float>(dp), 3 * H, &w_ch_plain}, n);
          // Rows the next processed step does not run keep this step's dp_i, dp_f for good
          // (the gradient of c0 adds them after the loop): both buffers must hold them.
          const int64_t n_next = k > 0 ? s.n[s.at(k - 1)] : n;
          if (n_next < n) {
            rows(dp, n_next, n - n_next).narrow(1, 0, 2 * H)
                .copy_(rows(dp_next, n_next, n - n_next).narrow(1, 0, 2 * H));
          }
          std::swap(dp, dp_next);
        } else {
          gemm(rows(dc_state, 0, n), rows(dp, 0, n), *w_ch, 1.0f);
          FUSEDRNN_LAUNCH(input.device(), lstm_backward_step, cell, Phase::kIFG, p);
        }
      } else {
        dh_phase(Phase::kWhole);
      }
      // unfused: this step's part of dh_{t-1} now; fused: in the next processed step's call
      if (!fused || k == 0) gemm(rows(dh_state, 0, n), dgates_rows(k, r0, n), w_hh);
      if (k == sc.of(k).k_lo) finish_chunk(sc.of(k));
    }
  });

  if (cell == CellKind::kWorkingMemory && s.B > 0) {
    gemm(dc_state, dp.narrow(1, 0, 2 * H), w_ch->narrow(0, 0, 2 * H), 1.0f);
  }
  if (!output_mask[1]) {
    return {grad_input, dh_state, dc_state, none(), none(), none(), none(), none(), none()};
  }
  Tensor grad_b_ih = none(), grad_b_hh = none();
  if (b_ih.has_value()) {
    grad_b_ih = grad_b;
    grad_b_hh = grad_b.clone();
  }
  return {grad_input, dh_state,  dc_state,  grad_w_ih, grad_w_hh,
          grad_b_ih,  grad_b_hh, grad_w_ch, grad_w_hr};
}

std::tuple<Tensor, Tensor, Tensor> gru_forward(const Tensor& input, const Tensor& w_ih,
                                               const Tensor& w_hh, const optional<Tensor>& b_ih,
                                               const optional<Tensor>& b_hh,
                                               const optional<Tensor>& hx,
                                               const optional<Tensor>& batch_sizes,
                                               bool reverse, bool need_workspace) {
  const CellKind cell = CellKind::kGRU;
  const Steps s = make_steps("gru", input, batch_sizes, reverse);
  const Dims d = check_args(cell, input, w_ih, w_hh, b_ih, b_hh, {}, {}, hx, {}, s);
  auto guard = guard_for(input);
  const int64_t H = d.H;
  const auto opts = input.options();
  const Tensor x = input.reshape({s.N, d.I});
  // The workspace keeps every step's r, z, n and h_n (training); inference keeps none.
  Tensor ws = at::empty({need_workspace ? s.N : 0, 4 * H}, opts);
  const Tensor output = at::empty(out_shape(input, H), opts);
  const Tensor out = output.view({s.N, H});
  Tensor hy = state_or_zeros(hx, input, s.B, H);
  Tensor hg = at::empty({s.B, 3 * H}, opts);
  const Tensor bias_ih = b_ih.has_value() ? b_ih->contiguous() : Tensor();
  const Tensor bias_hh = b_hh.has_value() ? b_hh->contiguous() : Tensor();
  const Tensor w_ih_t = w_ih.t();
  InputProjection xproj(s, x, w_ih_t, need_workspace ? ws : Tensor(), 4 * H, opts);
  const Tensor w_hh_t = w_hh.t();
  // Fused CPU steps (fp32), as in the LSTM forward: the step writes h_t into the state, so the
  // GEMM reads h_{t-1} from the previous step's output rows or a copy (fused_h_prev).
  const bool fused = cpu::fused_steps_enabled(input, s.T, s.N);
  cpu::PackedWeight w_hh_packed;
  Tensor h_prev;
  if (fused) {
    w_hh_packed = cpu::pack_weight(w_hh, 3);
    h_prev = at::empty({s.B, H}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "gru_forward", [&] {
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
      if (!fused) gemm(rows(hg, 0, n), rows(hy, 0, n), w_hh_t);
      GRUForwardStep<scalar_t> p;
      p.n = n;
      p.H = H;
      p.gates = ptr<scalar_t>(xproj.rows_for(k));
      p.ld_gates = 4 * H;
      p.hg = ptr<scalar_t>(hg);
      p.ld_hg = 3 * H;
      p.bias_ih = opt_ptr<scalar_t>(bias_ih);
      p.bias_hh = opt_ptr<scalar_t>(bias_hh);
      p.h_state = ptr<scalar_t>(hy);
      p.h_out = ptr<scalar_t>(out) + r0 * H;
      p.ld_h_out = H;
      if (fused) {
        cpu::gru_forward_fused_step(p, fused_h_prev(s, k, out, hy, h_prev, H), H, w_hh_packed);
      } else {
        FUSEDRNN_LAUNCH(input.device(), gru_forward_step, p);
      }
    }
  });
  return {output, hy, ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_hy, const Tensor& input,
    const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
    const optional<Tensor>& b_hh, const optional<Tensor>& hx,
    const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output,
    const Tensor& workspace, std::array<bool, 2> output_mask) {
  const CellKind cell = CellKind::kGRU;
  const Steps s = make_steps("gru_backward", input, batch_sizes, reverse);
  const Dims d = check_args(cell, input, w_ih, w_hh, b_ih, b_hh, {}, {}, hx, {}, s);
  auto guard = guard_for(input);
  const int64_t H = d.H;
  const auto opts = input.options();
  TORCH_CHECK(workspace.dim() == 2 && workspace.size(0) == s.N && workspace.size(1) == 4 * H && workspace.is_contiguous() && workspace.scalar_type() == input.scalar_type(), "gru_backward: workspace must be the contiguous (", s.N, ", ", 4 * H, ") tensor returned by the forward, got shape ", workspace.sizes());
  TORCH_CHECK(output.numel() == s.N * H, "gru_backward: output must be the forward's output");
  const bool has_dy = grad_output.has_value() && grad_output->defined();
  if (has_dy) check_tensor("gru_backward", "grad_output", *grad_output, input, output.sizes());
  check_opt("gru_backward", "grad_hy", grad_hy, input, {s.B, H});
  const Tensor x = input.reshape({s.N, d.I});
  const Tensor out = output.reshape({s.N, H});
  const Tensor dy = has_dy ? grad_output->reshape({s.N, H}).contiguous() : Tensor();
  Tensor dh_state = grad_or_zeros(grad_hy, input, s.B, H);
  const Tensor h0 = hx.has_value() ? hx->contiguous() : at::zeros({s.B, H}, opts);
  const std::vector<PrevSegment> segs = prev_segments(s);
  // dx and dhg (the gradients of the x-side and h-side pre-activations) chunk by chunk, as
  // dgates in the LSTM-family backward.
  const StepChunks sc(s, input);
  using Chunk = StepChunks::Chunk;
  const Tensor dx_buf[2] = {sc.buffer(3 * H, opts, 0), sc.buffer(3 * H, opts, 1)};
  const Tensor dhg_buf[2] = {sc.buffer(3 * H, opts, 0), sc.buffer(3 * H, opts, 1)};
  auto none = [&] { return at::empty({0}, opts); };  // one tensor per output: no aliasing
  Tensor grad_input = output_mask[0] ? at::empty(input.sizes(), opts) : none();
  Tensor grad_w_ih = none(), grad_w_hh = none(), grad_b_ih = none(), grad_b_hh = none();
  if (output_mask[1]) {
    grad_w_ih = at::zeros({3 * H, d.I}, opts);
    grad_w_hh = at::zeros({3 * H, H}, opts);
    if (b_ih.has_value()) {
      grad_b_ih = at::zeros({3 * H}, opts);
      grad_b_hh = at::zeros({3 * H}, opts);
    }
  }
  auto finish_chunk = [&](const Chunk& c) {
    const int64_t m = c.hi - c.lo;
    const Tensor dx = rows(dx_buf[c.buf], 0, m), dhg = rows(dhg_buf[c.buf], 0, m);
    if (output_mask[0]) gemm(rows(grad_input.view({s.N, d.I}), c.lo, m), dx, w_ih);
    if (!output_mask[1]) return;
    gemm(grad_w_ih, dx.t(), rows(x, c.lo, m), 1.0f);
    gemm_prev(grad_w_hh, dhg, clip_segments(segs, c.lo, c.hi), out, h0, 1.0f);
    if (grad_b_ih.numel()) {
      grad_b_ih += dx.sum(0);
      grad_b_hh += dhg.sum(0);
    }
  };
  // Fused CPU steps (fp32), as in the LSTM backward.
  const bool fused = cpu::fused_steps_enabled(input, s.T, s.N);
  const cpu::PackedWeight w_hh_plain = fused ? cpu::pack_plain(w_hh) : cpu::PackedWeight();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "gru_backward", [&] {
    const scalar_t* ws_p = s.N > 0 ? workspace.const_data_ptr<scalar_t>() : nullptr;
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = s.at(k), n = s.n[t], r0 = s.off[t];
      GRUBackwardStep<scalar_t> p;
      p.n = n;
      p.H = H;
      p.gates = ws_p + r0 * 4 * H;
      p.ld_gates = 4 * H;
      const auto [m_prev, prev_row0] = prev_rows(s, k);
      p.h_prev = ptr<scalar_t>(out) + prev_row0 * H;
      p.ld_h_prev = H;
      p.h_init = ptr<scalar_t>(h0);
      p.m_prev = m_prev;
      p.dy = has_dy ? ptr<scalar_t>(dy) + r0 * H : nullptr;
      p.ld_dy = H;
      p.dh_state = ptr<scalar_t>(dh_state);
      p.dx = ptr<scalar_t>(sc.rows_of(dx_buf, k, r0, n));
      p.ld_dx = 3 * H;
      p.dhg = ptr<scalar_t>(sc.rows_of(dhg_buf, k, r0, n));
      p.ld_dhg = 3 * H;
      if (fused && k + 1 < s.T) {
        // dh_t += dhg(next processed step) W_hh, tile by tile, each tile's step kernel after it
        const int64_t t_next = s.at(k + 1);
        cpu::gru_backward_fused_step(
            p,
            {ptr<float>(sc.rows_of(dhg_buf, k + 1, s.off[t_next], s.n[t_next])), 3 * H,
             &w_hh_plain},
            s.n[t_next]);
      } else {
        FUSEDRNN_LAUNCH(input.device(), gru_backward_step, p);
      }
      // unfused: this step's part of dh_{t-1} now; fused: in the next processed step's call
      if (!fused || k == 0) {
        gemm(rows(dh_state, 0, n), sc.rows_of(dhg_buf, k, r0, n), w_hh, 1.0f);
      }
      if (k == sc.of(k).k_lo) finish_chunk(sc.of(k));
    }
  });
  return {grad_input, dh_state, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

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

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) { register_impls(m); }

#ifdef FUSEDRNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) { register_impls(m); }
#endif

}  // namespace fusedrnn
