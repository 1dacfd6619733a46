"""The small GEMMs of few-row steps (csrc/kernels/cpu/isa/small_gemm.h; forward up to 32 rows,
backward up to 16, more than 4 rows in groups of 4, csrc/execution/gemm.cpp) against torch.mm,
at the shapes of a step of H = 256: forward m x 256 @ (1024 x 256)^T, backward m x 1024 @
(1024 x 256), and the weight gradient (1024 x m) @ (m x 256) (the rank-m update, m <= 4). One
thread, fp32: median of 9 samples of 300 calls of the `_raw_gemm` test op (which takes the small
GEMMs under the avx2 / avx512 ISAs), of the same op under the baseline ISA (at::mm), and of
torch.mm.

    PYTHONPATH=. python scripts/small_gemm_rate.py
"""

import statistics
import time

import torch

import fusedrnn  # noqa: F401 (registers torch.ops.fusedrnn)

ops = torch.ops.fusedrnn


def per_call_us(fn, calls=300, samples=9):
    for _ in range(30):
        fn()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e6


def rates(raw, mm):
    """Microseconds per call of the `_raw_gemm` call `raw` under the ISA in use (the small
    kernels), under the baseline ISA (at::mm), and of the torch.mm call `mm`."""
    small = per_call_us(raw)
    previous = ops._set_cpu_isa("baseline")
    try:
        aten = per_call_us(raw)
    finally:
        ops._set_cpu_isa(previous)
    return small, aten, per_call_us(mm)


def main():
    torch.set_num_threads(1)
    isa = ops.cpu_isa()
    print(f"ISA {isa}, 1 thread, fp32, microseconds per call")
    for m in (1, 2, 4, 8, 16, 24, 32):
        w, a, c = torch.randn(1024, 256), torch.randn(m, 256), torch.empty(m, 1024)

        def raw():  # C (m x 1024) = A (m x 256) W^T: trans_b, ldb 256
            ops._raw_gemm(
                c.view(-1), a.view(-1), w.view(-1), m, 1024, 256, 256, 256, 1024, False, True, 0.0
            )

        small, aten, mm = rates(raw, lambda: torch.mm(a, w.t(), out=c))
        print(f"m={m}: small GEMM {small:.1f}, the op through at::mm {aten:.1f}, torch.mm {mm:.1f}")
    # The backward's dh = dgates W: (m x 1024) @ (1024 x 256), W as stored.
    for m in (1, 4, 8, 16):
        w, g, d = torch.randn(1024, 256), torch.randn(m, 1024), torch.empty(m, 256)

        def raw_nn():  # C (m x 256) = A (m x 1024) W, ldb 256
            ops._raw_gemm(
                d.view(-1), g.view(-1), w.view(-1), m, 256, 1024, 1024, 256, 256, False, False, 0.0
            )

        small, aten, mm = rates(raw_nn, lambda: torch.mm(g, w, out=d))
        print(
            f"backward, m={m}: small GEMM {small:.1f}, the op through at::mm {aten:.1f}, "
            f"torch.mm {mm:.1f}"
        )
    # The weight gradient of a step of m rows: dW (1024 x 256) = dgates^T (1024 x m) x (m x 256),
    # the rank-m update kernel (gemm_tn) against at::mm's K = m GEMM and torch.mm.
    for m in (1, 2, 4):
        g, x, dw = torch.randn(m, 1024), torch.randn(m, 256), torch.empty(1024, 256)

        def raw_tn():  # C (1024 x 256) = A^T B, A stored m x 1024 (trans_a, lda 1024)
            ops._raw_gemm(
                dw.view(-1), g.view(-1), x.view(-1), 1024, 256, m, 1024, 256, 256, True, False, 0.0
            )

        small, aten, mm = rates(raw_tn, lambda: torch.mm(g.t(), x, out=dw))
        print(
            f"weight gradient, m={m}: rank-m update {small:.1f}, the op through at::mm "
            f"{aten:.1f}, torch.mm {mm:.1f}"
        )


if __name__ == "__main__":
    main()
