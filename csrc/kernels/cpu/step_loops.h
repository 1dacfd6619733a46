// The CPU loops of the unfused step kernels: parallel over the rows of the step, the units of a
// row in one loop that the compiler vectorises (the cell math is branch-free, see
// cells/common.h). Included once per instruction set, in namespace
// fusedrnn::cpu::FUSEDRNN_ISA_NAMESPACE (kernels_cpu.cpp: portable; isa/avx2_steps.cpp,
// isa/avx512_steps.cpp), each defining that ISA's StepKernels table `kStepKernels`.
#pragma once

#include <ATen/Parallel.h>

#include "kernels/step_elements.h"
#include "step_table.h"

namespace fusedrnn {
namespace cpu {
namespace FUSEDRNN_ISA_NAMESPACE {

// Rows per task: enough elements per task that scheduling costs little next to the math.
inline int64_t grain_rows(int64_t H) { return 16384 / (H > 0 ? H : 1) + 1; }

// The unit loops below carry `#pragma GCC ivdep`: within a row, every array a step kernel writes
// is a separate buffer (or the same element it read), so no iteration depends on another. Without
// it gcc gives up vectorising after too many run-time alias checks.
template <typename Fn>
void for_each_row(int64_t n, int64_t H, const Fn& fn) {
  at::parallel_for(0, n, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(b);
  });
}

template <CellKind kCell, Phase kPhase, bool kBias, typename scalar_t>
void lstm_forward_rows(const LSTMForwardStep<scalar_t>& p) {
  dispatch_zone<kZoneable<kCell>>(p, [&](auto zone) {
    for_each_row(p.n, p.H, [&](int64_t b) {
      const LSTMForwardStep<scalar_t> q = p;  // a local copy: stores cannot alias its pointers
#pragma GCC ivdep
      for (int64_t j = 0; j < q.H; ++j) {
        lstm_forward_element<kCell, kPhase, kBias, true, kRuntime, kRuntime, decltype(zone)::value>(
            q, b, j);
      }
    });
  });
}

// The backward loops fix per step whether there is an output gradient (kDy: a step without one
// forms no load from the null dy) and per row whether its previous state is the previous step's
// row (kPrev).
template <CellKind kCell, Phase kPhase, typename scalar_t>
void lstm_backward_rows(const LSTMBackwardStep<scalar_t>& p) {
  dispatch_on_off(p.dy != nullptr, [&](auto dy) {
    dispatch_zone<kZoneable<kCell>>(p, [&](auto zone) {
      for_each_row(p.n, p.H, [&](int64_t b) {
        const LSTMBackwardStep<scalar_t> q = p;
        dispatch_on_off(b < q.m_prev, [&](auto prev) {
#pragma GCC ivdep
          for (int64_t j = 0; j < q.H; ++j) {
            lstm_backward_element<kCell, kPhase, decltype(dy)::value, decltype(prev)::value,
                                  decltype(zone)::value>(q, b, j);
          }
        });
      });
    });
  });
}

template <typename scalar_t>
void lstm_forward_step(CellKind cell, Phase phase, const LSTMForwardStep<scalar_t>& p) {
  dispatch_lstm_family(cell, phase, [&](auto c, auto ph) {
    dispatch_bool(p.bias != nullptr, [&](auto bias) {
      lstm_forward_rows<decltype(c)::value, decltype(ph)::value, decltype(bias)::value>(p);
    });
  });
}

template <typename scalar_t>
void lstm_backward_step(CellKind cell, Phase phase, const LSTMBackwardStep<scalar_t>& p) {
  dispatch_lstm_family(cell, phase, [&](auto c, auto ph) {
    lstm_backward_rows<decltype(c)::value, decltype(ph)::value>(p);
  });
}

// bias_ih and bias_hh are both given or both absent (checked by the caller, kernels_cpu.cpp).
template <typename scalar_t>
void gru_forward_step(const GRUForwardStep<scalar_t>& p) {
  dispatch_bool(p.bias_ih != nullptr, [&](auto bias) {
    dispatch_on_off(p.zone_h != nullptr, [&](auto zone) {
      for_each_row(p.n, p.H, [&](int64_t b) {
        const GRUForwardStep<scalar_t> q = p;
#pragma GCC ivdep
        for (int64_t j = 0; j < q.H; ++j) {
          gru_forward_element<decltype(bias)::value, decltype(zone)::value>(q, b, j);
        }
      });
    });
  });
}

template <typename scalar_t>
void gru_backward_step(const GRUBackwardStep<scalar_t>& p) {
  dispatch_on_off(p.dy != nullptr, [&](auto dy) {
    dispatch_on_off(p.zone_h != nullptr, [&](auto zone) {
      for_each_row(p.n, p.H, [&](int64_t b) {
        const GRUBackwardStep<scalar_t> q = p;
        dispatch_on_off(b < q.m_prev, [&](auto prev) {
#pragma GCC ivdep
          for (int64_t j = 0; j < q.H; ++j) {
            gru_backward_element<decltype(dy)::value, decltype(prev)::value, decltype(zone)::value>(
                q, b, j);
          }
        });
      });
    });
  });
}

template <typename T>
constexpr StepFns<T> step_fns() {
  StepFns<T> f;
  f.lstm_forward = &lstm_forward_step<T>;
  f.lstm_backward = &lstm_backward_step<T>;
  f.gru_forward = &gru_forward_step<T>;
  f.gru_backward = &gru_backward_step<T>;
  return f;
}

// Constant-initialised (no load-time code compiled for this ISA runs on other CPUs).
constexpr StepKernels kStepKernels{step_fns<float>(), step_fns<double>(), step_fns<c10::BFloat16>(),
                                   step_fns<c10::Half>()};

}  // namespace FUSEDRNN_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fusedrnn
