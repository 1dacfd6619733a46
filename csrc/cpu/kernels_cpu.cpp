// CPU launchers of the fused step kernels: parallel over the rows of the step, the units of a
// row in one loop that the compiler vectorises (the cell math is branch-free, see cells/common.h).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../step_elements.h"

#include <cstdlib>

namespace fusedrnn {

void bad_dispatch(const char* what) {
  TORCH_INTERNAL_ASSERT(false, what);
  std::abort();  // not reached: the assertion throws
}

namespace cpu {
namespace {

// Rows per task: enough elements per task that scheduling costs little next to the math.
int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

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
  for_each_row(p.n, p.H, [&](int64_t b) {
    const LSTMForwardStep<scalar_t> q = p;  // a local copy: stores cannot alias its pointers
#pragma GCC ivdep
    for (int64_t j = 0; j < q.H; ++j) lstm_forward_element<kCell, kPhase, kBias>(q, b, j);
  });
}

template <CellKind kCell, Phase kPhase, typename scalar_t>
void lstm_backward_rows(const LSTMBackwardStep<scalar_t>& p) {
  for_each_row(p.n, p.H, [&](int64_t b) {
    const LSTMBackwardStep<scalar_t> q = p;
#pragma GCC ivdep
    for (int64_t j = 0; j < q.H; ++j) lstm_backward_element<kCell, kPhase>(q, b, j);
  });
}

}  // namespace

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

template <typename scalar_t>
void gru_forward_step(const GRUForwardStep<scalar_t>& p) {
  TORCH_INTERNAL_ASSERT((p.bias_ih == nullptr) == (p.bias_hh == nullptr));
  dispatch_bool(p.bias_ih != nullptr, [&](auto bias) {
    for_each_row(p.n, p.H, [&](int64_t b) {
      const GRUForwardStep<scalar_t> q = p;
#pragma GCC ivdep
      for (int64_t j = 0; j < q.H; ++j) gru_forward_element<decltype(bias)::value>(q, b, j);
    });
  });
}

template <typename scalar_t>
void gru_backward_step(const GRUBackwardStep<scalar_t>& p) {
  for_each_row(p.n, p.H, [&](int64_t b) {
    const GRUBackwardStep<scalar_t> q = p;
#pragma GCC ivdep
    for (int64_t j = 0; j < q.H; ++j) gru_backward_element(q, b, j);
  });
}

#define FUSEDRNN_INSTANTIATE(T)                                                        \
  template void lstm_forward_step<T>(CellKind, Phase, const LSTMForwardStep<T>&);      \
  template void lstm_backward_step<T>(CellKind, Phase, const LSTMBackwardStep<T>&);    \
  template void gru_forward_step<T>(const GRUForwardStep<T>&);                         \
  template void gru_backward_step<T>(const GRUBackwardStep<T>&);
FUSEDRNN_INSTANTIATE(float)
FUSEDRNN_INSTANTIATE(double)
FUSEDRNN_INSTANTIATE(c10::BFloat16)
FUSEDRNN_INSTANTIATE(c10::Half)
#undef FUSEDRNN_INSTANTIATE

}  // namespace cpu
}  // namespace fusedrnn
