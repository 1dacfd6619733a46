// One step of a layer-normalised layer as its row passes read it (cells/layer_norm.h): sizes,
// the workspace blocks' places and the step's pointers, a plain struct that the CPU row loops
// (kernels/cpu/layer_norm_rows.h) and the CUDA kernels (kernels/cuda/layer_norm.cu) take alike.
// Light headers only: the CUDA kernels' translation unit includes it.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDRNN_STEP_HD __host__ __device__
#else
#define FUSEDRNN_STEP_HD
#endif

namespace fusedrnn {

// The workspace blocks of a layer-normalised layer (recurrence/layer_norm.cpp): block k's row r
// at ws + off[k] + r * width[k]. LSTM: xhat 4H | hhat 4H | gates 4H | c_prev H | chat H |
// h_prev Hout | r H (with a projection, else width 0) | stats 3 (rstd_x, rstd_h, rstd_c). GRU:
// xhat 3H | hhat 3H | gates 3H | h_prev H | stats 2 (rstd_x, rstd_h).
enum LNLSTMBlock : int { kXhat, kHhat, kGates, kCPrev, kChat, kHPrev, kR, kLSTMStats };
enum LNGRUBlock : int { kGXhat, kGHhat, kGGates, kGHPrev, kGRUStats };
constexpr int kMaxLNBlocks = 8;

// One step of a layer-normalised layer, for the row loops: rows b of the step's state are rows
// r0 + b of the workspace blocks. Forward and backward, LSTM and GRU; each loop reads its own
// part.
template <typename scalar_t>
struct LNStep {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t H = 0, Hout = 0;
  acc_t* ws = nullptr;
  int64_t off[kMaxLNBlocks] = {}, width[kMaxLNBlocks] = {};
  int64_t r0 = 0;  // the workspace row of the step's row 0 (0 in inference: the blocks then hold
                   // the step's rows only)
  // the forward of a training call, whose rows fill the workspace for the backward; false: an
  // inference call's, which writes only what the step reads again (cells/layer_norm.h, kKeep;
  // the CUDA kernels keep every row's workspace)
  bool keep = true;
  const scalar_t* g_ih = nullptr;  // LayerNorm gains and shifts
  const scalar_t* g_hh = nullptr;
  const scalar_t* g_c = nullptr;
  const scalar_t* b_c = nullptr;
  const scalar_t* bias = nullptr;  // LSTM: b_ih + b_hh (zeros without biases)
  const scalar_t* b_ih = nullptr;  // GRU: the two biases (zeros without biases)
  const scalar_t* b_hh = nullptr;
  // forward
  const scalar_t* xp = nullptr;  // (n, G) the step's rows of x W_ih^T (training in fp32/64: its
                                 // rows of the x̂ block itself)
  const scalar_t* hg = nullptr;  // (n, G) the step's h_{t-1} W_hh^T
  scalar_t* h_state = nullptr;   // (n, Hout) in: h_{t-1}; out: h_t (not with a projection)
  acc_t* c_state = nullptr;      // LSTM (n, H) in: c_{t-1}; out: c_t
  scalar_t* out = nullptr;       // (n, Hout) the step's output rows
  scalar_t* r_out = nullptr;     // LSTM with a projection: (n, H) o tanh(LN(c_t)), else null
  // backward
  acc_t* dh = nullptr;        // LSTM (n, H): dL/d(o tanh(LN(c_t))) (zoned: dL/dh_t, out: its direct
                              // part); GRU (n, H) in: dL/dh_t, out: the direct part of dL/dh_{t-1}
  acc_t* dc_state = nullptr;  // LSTM (n, H) in: dL/dc_t; out: dL/dc_{t-1}
  // The per-row gradients, rows g0 + b of buffers that hold a chunk of steps' rows
  // (recurrence/layer_norm.cpp):
  int64_t g0 = 0;
  acc_t* dx = nullptr;   // (rows, G): dL/d(x W_ih^T)
  acc_t* dhg = nullptr;  // (rows, G): dL/d(h_{t-1} W_hh^T)
  // The column sums of the gains' and biases' gradients that the rows add to (cells/layer_norm.h:
  // LSTM 3G + 2H values, GRU 4G): row b adds to sums + b * ld_sums. CPU: the running task's own
  // sums, ld_sums 0 (every row of the task adds to them); CUDA: one set per row of the state,
  // ld_sums their width (a row of the state is one thread block's at every step).
  acc_t* sums = nullptr;
  int64_t ld_sums = 0;
  // zoneout (forward and backward, no projection): the weights d of the previous cell / hidden
  // state, (n, H) from the step's row 0 with row strides ld_zone_* (0: one row for all), or
  // null. With them the LSTM's backward overwrites dh with its direct part (cells/layer_norm.h).
  const scalar_t* zone_c = nullptr;
  const scalar_t* zone_h = nullptr;
  int64_t ld_zone_c = 0, ld_zone_h = 0;

  FUSEDRNN_STEP_HD const scalar_t* zc(int64_t b) const {
    return zone_c ? zone_c + b * ld_zone_c : nullptr;
  }
  FUSEDRNN_STEP_HD const scalar_t* zh(int64_t b) const {
    return zone_h ? zone_h + b * ld_zone_h : nullptr;
  }
  FUSEDRNN_STEP_HD acc_t* row_sums(int64_t b) const { return sums + b * ld_sums; }
  FUSEDRNN_STEP_HD acc_t* block(int k, int64_t r) const { return ws + off[k] + r * width[k]; }
};

namespace cuda {
// kernels/cuda/layer_norm.cu: the row passes of rows [0, n) of step p, a thread block per row,
// on `stream` (a cudaStream_t).
template <typename scalar_t>
void ln_lstm_forward_rows(const LNStep<scalar_t>& p, int64_t n, void* stream);
template <typename scalar_t>
void ln_lstm_backward_rows(const LNStep<scalar_t>& p, int64_t n, void* stream);
template <typename scalar_t>
void ln_gru_forward_rows(const LNStep<scalar_t>& p, int64_t n, void* stream);
template <typename scalar_t>
void ln_gru_backward_rows(const LNStep<scalar_t>& p, int64_t n, void* stream);
}  // namespace cuda

}  // namespace fusedrnn
