// The GEMMs of the recurrence: out = beta * out + a @ b into views (rows of a state, columns of
// the workspace), and the weight-gradient sums over the previous states of every row.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "recurrence/steps.h"

namespace fusedrnn {
namespace driver {

// rows [start, start + n) of a 2-D tensor
inline Tensor rows(const Tensor& t, int64_t start, int64_t n) { return t.narrow(0, start, n); }

// out = beta * out + a @ b, written into `out`. beta is 0 or 1. small_ok false: never the
// small GEMMs, whose rounding differs from at::mm's and oneDNN's, for a caller whose result
// must not depend on how many rows it passes at a time (InputProjection's chunks).
void gemm(Tensor out, const Tensor& a, const Tensor& b, float beta = 0.0f, bool small_ok = true);

// out = beta * out + grad^T @ prev_state over all rows; grad is (N, G), out (G, width).
void gemm_prev(Tensor out, const Tensor& grad, const std::vector<PrevSegment>& segs,
               const Tensor& seq, const Tensor& init, float beta = 0.0f);

// sum over all rows of grad * prev_state; grad is (N, width), result (width,).
Tensor colsum_prev(const Tensor& grad, const std::vector<PrevSegment>& segs, const Tensor& seq,
                   const Tensor& init);

// out (m x n, row stride ldo) = [out +] a (m x k) op(W) in fp32 on the CPU with the ISA's small
// GEMMs (kernels/cpu/isa/small_gemm.h), W row-major with row stride ldw: W (n x k) used transposed
// when w_transposed, else W (k x n). False (nothing done) where they do not apply: more rows than
// kSmallGemmMaxRowsNt (W transposed, the forward's products) or kSmallGemmMaxRowsNn (the
// backward's), or the baseline ISA. beta is 0 or 1.
//
// The kernels take up to kSmallGemmRows (4) rows a call; more rows run them on groups of 4 rows,
// each block of the weight multiplied by every group while it is in cache. At 8-16 rows that
// is faster than at::mm; at 24-32 rows about torch.mm's rate, without oneDNN's per-call cost
// (the forward's GEMMs of 17-32 rows took oneDNN before; the backward's stay there)
// (scripts/small_gemm_rate.py, docs/cpu_kernels.md).
constexpr int64_t kSmallGemmMaxRowsNt = 32;
constexpr int64_t kSmallGemmMaxRowsNn = 16;
bool small_gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* w,
                    int64_t ldw, bool w_transposed, float* out, int64_t ldo, float beta);

// The same in bf16 (a, W and out bf16, the sums in fp32, each output rounded once), with the
// ISA's bf16 small GEMMs, where ATen's bf16 GEMM is its fallback loops (a CPU without oneDNN's
// bf16 GEMMs: there the other bf16 GEMMs convert both operands to fp32, for a step the whole
// weight). False (nothing done) elsewhere, where ATen's bf16 GEMM is oneDNN's (unless forced:
// force_bf16_small_gemms), and as small_gemm_f32. gemm() takes them too, and their rank update
// for the weight gradients of a step of a few rows.
bool small_gemm_bf16(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda,
                     const c10::BFloat16* w, int64_t ldw, bool w_transposed, c10::BFloat16* out,
                     int64_t ldo, float beta);

// Whether gemm() takes oneDNN's matmul for large CPU GEMMs: bf16 ones (onednn_gemm_enabled) and
// fp32 ones (onednn_fp32_gemm: not on Intel CPUs, where at::mm is faster, unless
// FUSEDRNN_CPU_GEMM=onednn); see gemm.cpp. Exposed for build_info and the tests.
bool onednn_gemm_enabled();

// Makes the bf16 small GEMMs run where the ISA has them even where ATen's bf16 GEMM is oneDNN's
// (the tests: the op _set_bf16_small_gemms), returning the previous setting. Not thread-safe
// against concurrent layer calls.
bool force_bf16_small_gemms(bool force);
bool onednn_fp32_gemm();

}  // namespace driver
}  // namespace fusedrnn
