// The row loops of the layer-normalised cells' fused steps (cells/layer_norm.h) as a table of
// entry points per instruction set: compiled portably (recurrence/layer_norm.cpp) and once per
// ISA (kernels/cpu/isa/layer_norm_avx2.cpp, layer_norm_avx512.cpp); the driver calls the table of
// the ISA in use (`layer_norm_kernels()`) on each task's rows of a step.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace fusedrnn {
namespace cpu {

// The workspace blocks of a layer-normalised layer (recurrence/layer_norm.cpp): block k's row r
// at ws + off[k] + r * width[k]. LSTM: xhat 4H | hhat 4H | gates 4H | c_prev H | chat H |
// h_prev Hout | r H (with a projection, else width 0) | stats 3 (rstd_x, rstd_h, rstd_c). GRU:
// xhat 3H | hhat 3H | gates 3H | h_prev H | stats 2 (rstd_x, rstd_h).
enum LNLSTMBlock : int { kXhat, kHhat, kGates, kCPrev, kChat, kHPrev, kR, kLSTMStats };
enum LNGRUBlock : int { kGXhat, kGHhat, kGGates, kGHPrev, kGRUStats };
constexpr int kMaxLNBlocks = 8;

// One step of a layer-normalised layer, for the row loops: rows b of the step's state are rows
// r0 + b of the workspace blocks (xr0 + b of x̂). Forward and backward, LSTM and GRU; each loop
// reads its own part.
template <typename scalar_t>
struct LNStep {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t H = 0, Hout = 0;
  acc_t* ws = nullptr;
  int64_t off[kMaxLNBlocks] = {}, width[kMaxLNBlocks] = {};
  int64_t r0 = 0;   // the workspace row of the step's row 0 (0 in inference: the blocks then hold
                    // the step's rows only)
  int64_t xr0 = 0;  // the same for the x̂ block, which holds every row
  const scalar_t* g_ih = nullptr;  // LayerNorm gains and shifts
  const scalar_t* g_hh = nullptr;
  const scalar_t* g_c = nullptr;
  const scalar_t* b_c = nullptr;
  const scalar_t* bias = nullptr;  // LSTM: b_ih + b_hh, or null
  const scalar_t* b_ih = nullptr;  // GRU: the two biases, or null
  const scalar_t* b_hh = nullptr;
  // forward
  const scalar_t* xp = nullptr;  // (N, G) x W_ih^T of every row (the x̂ block itself in fp32/64)
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
  // The column sums of the gains' and biases' gradients that the rows add to, the running
  // task's own (cells/layer_norm.h: LSTM 3G + 2H values, GRU 4G).
  acc_t* sums = nullptr;
  // zoneout (forward and backward, no projection): the weights d of the previous cell / hidden
  // state, (n, H) from the step's row 0 with row strides ld_zone_* (0: one row for all), or
  // null. With them the LSTM's backward overwrites dh with its direct part (cells/layer_norm.h).
  const scalar_t* zone_c = nullptr;
  const scalar_t* zone_h = nullptr;
  int64_t ld_zone_c = 0, ld_zone_h = 0;

  const scalar_t* zc(int64_t b) const { return zone_c ? zone_c + b * ld_zone_c : nullptr; }
  const scalar_t* zh(int64_t b) const { return zone_h ? zone_h + b * ld_zone_h : nullptr; }

  acc_t* block(int k, int64_t r) const { return ws + off[k] + r * width[k]; }
};

template <typename T>
struct LayerNormFns {
  void (*lstm_forward)(const LNStep<T>&, int64_t b0, int64_t b1) = nullptr;
  void (*lstm_backward)(const LNStep<T>&, int64_t b0, int64_t b1) = nullptr;
  void (*gru_forward)(const LNStep<T>&, int64_t b0, int64_t b1) = nullptr;
  void (*gru_backward)(const LNStep<T>&, int64_t b0, int64_t b1) = nullptr;
};

struct LayerNormKernels {
  LayerNormFns<float> f32;
  LayerNormFns<double> f64;
  LayerNormFns<c10::BFloat16> bf16;
  LayerNormFns<c10::Half> f16;

  template <typename T>
  const LayerNormFns<T>& of() const {
    if constexpr (std::is_same_v<T, float>)
      return f32;
    else if constexpr (std::is_same_v<T, double>)
      return f64;
    else if constexpr (std::is_same_v<T, c10::BFloat16>)
      return bf16;
    else
      return f16;
  }
};

// The tables compiled into this library (nullptr where the build has no such ISA) and the one of
// the ISA in use (kernels/cpu/isa.h; the AVX-512 table serves avx512_bf16 too).
const LayerNormKernels* layer_norm_kernels_avx2();
const LayerNormKernels* layer_norm_kernels_avx512();
const LayerNormKernels& layer_norm_kernels();

}  // namespace cpu
}  // namespace fusedrnn
