// The GEMMs of the recurrence: out = beta * out + a @ b into views (rows of a state, columns of
// the workspace), and the weight-gradient sums over the previous states of every row.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "steps.h"

namespace fusedrnn {
namespace driver {

// rows [start, start + n) of a 2-D tensor
inline Tensor rows(const Tensor& t, int64_t start, int64_t n) { return t.narrow(0, start, n); }

// out = beta * out + a @ b, written into `out`. beta is 0 or 1.
void gemm(Tensor out, const Tensor& a, const Tensor& b, float beta = 0.0f);

// out = beta * out + grad^T @ prev_state over all rows; grad is (N, G), out (G, width).
void gemm_prev(Tensor out, const Tensor& grad, const std::vector<PrevSegment>& segs,
               const Tensor& seq, const Tensor& init, float beta = 0.0f);

// sum over all rows of grad * prev_state; grad is (N, width), result (width,).
Tensor colsum_prev(const Tensor& grad, const std::vector<PrevSegment>& segs, const Tensor& seq,
                   const Tensor& init);

// Whether gemm() takes oneDNN's matmul for CPU GEMMs of this dtype (large ones only): see
// gemm.cpp. Exposed for build_info and the tests.
bool onednn_gemm_enabled();

}  // namespace driver
}  // namespace fusedrnn
