// The CPU launchers of the unfused step kernels (kernels/kernels.h): the portable instance of their
// loops (step_loops.h), and the dispatch of every call to the table of the ISA in use
// (kernels/cpu/isa.h).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdlib>

#include "isa.h"
#include "step_loops.h"

namespace fusedrnn {

void bad_dispatch(const char* what) {
  TORCH_INTERNAL_ASSERT(false, what);
  std::abort();  // not reached: the assertion throws
}

namespace cpu {

const StepKernels& step_kernels_portable() { return portable::kStepKernels; }

namespace {

const StepKernels& table() {
  switch (current_isa()) {
    case Isa::kAVX512BF16:  // the unfused steps have no use for the bf16 dot products
    case Isa::kAVX512:
      return *step_kernels_avx512();
    case Isa::kAVX2:
      return *step_kernels_avx2();
    case Isa::kBaseline:
      break;
  }
  return portable::kStepKernels;
}

}  // namespace

template <typename scalar_t>
void lstm_forward_step(CellKind cell, Phase phase, const LSTMForwardStep<scalar_t>& p) {
  table().of<scalar_t>().lstm_forward(cell, phase, p);
}

template <typename scalar_t>
void lstm_backward_step(CellKind cell, Phase phase, const LSTMBackwardStep<scalar_t>& p) {
  table().of<scalar_t>().lstm_backward(cell, phase, p);
}

template <typename scalar_t>
void gru_forward_step(const GRUForwardStep<scalar_t>& p) {
  TORCH_INTERNAL_ASSERT((p.bias_ih == nullptr) == (p.bias_hh == nullptr));
  table().of<scalar_t>().gru_forward(p);
}

template <typename scalar_t>
void gru_backward_step(const GRUBackwardStep<scalar_t>& p) {
  table().of<scalar_t>().gru_backward(p);
}

// A projected LSTM's zoneout of h_t: n x (projection size) elements a step, a small pass next
// to the step's GEMMs; the portable loop serves every ISA.
template <typename scalar_t, typename weight_t>
void zone_forward_step(const ZoneStep<scalar_t, weight_t>& p) {
  portable::for_each_row(p.n, p.H, [&](int64_t b) {
    const ZoneStep<scalar_t, weight_t> q = p;  // a local copy: stores cannot alias its pointers
#pragma GCC ivdep
    for (int64_t j = 0; j < q.H; ++j) zone_forward_element(q, b, j);
  });
}

template <typename scalar_t, typename weight_t>
void zone_backward_step(const ZoneStep<scalar_t, weight_t>& p) {
  dispatch_on_off(p.dy != nullptr, [&](auto dy) {
    portable::for_each_row(p.n, p.H, [&](int64_t b) {
      const ZoneStep<scalar_t, weight_t> q = p;
#pragma GCC ivdep
      for (int64_t j = 0; j < q.H; ++j) {
        zone_backward_element<decltype(dy)::value>(q, b, j);
      }
    });
  });
}

#define FUSEDRNN_INSTANTIATE(T)                                                     \
  template void lstm_forward_step<T>(CellKind, Phase, const LSTMForwardStep<T>&);   \
  template void lstm_backward_step<T>(CellKind, Phase, const LSTMBackwardStep<T>&); \
  template void gru_forward_step<T>(const GRUForwardStep<T>&);                      \
  template void gru_backward_step<T>(const GRUBackwardStep<T>&);
FUSEDRNN_INSTANTIATE(float)
FUSEDRNN_INSTANTIATE(double)
FUSEDRNN_INSTANTIATE(c10::BFloat16)
FUSEDRNN_INSTANTIATE(c10::Half)
#undef FUSEDRNN_INSTANTIATE

// (the layer's dtype, the weights'): a layer's own, and the op-math buffers of a half type's
#define FUSEDRNN_INSTANTIATE(T, W)                              \
  template void zone_forward_step<T, W>(const ZoneStep<T, W>&); \
  template void zone_backward_step<T, W>(const ZoneStep<T, W>&);
FUSEDRNN_INSTANTIATE(float, float)
FUSEDRNN_INSTANTIATE(double, double)
FUSEDRNN_INSTANTIATE(c10::BFloat16, c10::BFloat16)
FUSEDRNN_INSTANTIATE(c10::Half, c10::Half)
FUSEDRNN_INSTANTIATE(float, c10::BFloat16)
FUSEDRNN_INSTANTIATE(float, c10::Half)
#undef FUSEDRNN_INSTANTIATE

}  // namespace cpu
}  // namespace fusedrnn
