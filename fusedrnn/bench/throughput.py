"""The arithmetic rate of the fused rows against the GEMM rate of the same machine, measured in
the same run: how close the fused path comes to what a GEMM of its step's shape achieves.

FLOP counts are those of the layer's matrix products (2 per multiply-add), the dominant work:
forward: the input projection and the recurrent products (LSTM family 4H gates, GRU 3H; the
working-memory cell adds its cell-connection product c W_ch^T); forward+backward adds the
gradients of both weights and of the state (and of the input when it requires grad; the WM cell
adds the gradient of W_ch and of c through it). Elementwise work is not counted.
"""

import statistics
import time
from typing import List, Optional

import torch

from .cases import GATES, WEIGHT_CH_GEMM


def layer_flops(rec: dict) -> Optional[float]:
    """The matrix-product FLOPs of one benchmark record (single-layer, one direction rows only)."""
    if rec.get("layers", 1) != 1 or rec.get("bidirectional"):
        return None
    s = rec["shape"]
    T, B, I, H = s["T"], s["B"], s["I"], s["H"]
    rows = T * B
    G = GATES[rec["cell"]] * H
    fwd = 2.0 * rows * G * (I + H)
    wm = 2.0 * rows * 3 * H * H if WEIGHT_CH_GEMM[rec["cell"]] else 0.0
    if rec["pass"] == "fwd":
        return fwd + wm
    # dW_ih, dW_hh, dh_{t-1}; dx when the input requires grad; WM: dW_ch and dc
    bwd = 2.0 * rows * G * (I + 2 * H) + (2.0 * rows * G * I if rec.get("input_grad") else 0.0)
    return fwd + wm + bwd + 2 * wm


def gemm_rate(
    device: torch.device, dtype: torch.dtype, shapes: List[tuple], repeats: int = 7
) -> List[dict]:
    """GFLOP/s of torch.mm (M, K) @ (K, N) at each shape: median of `repeats` timed calls after
    one warm-up, on the threads torch uses now."""
    out = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        c = torch.empty(m, n, device=device, dtype=dtype)
        # ~0.2 GFLOP per timed sample, at most 2000 calls (tiny shapes: a sample of 2000
        # calls is still milliseconds, far above the timer's resolution)
        calls = max(1, min(2000, int(2e8 // (2 * m * k * n))))
        times = []
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                torch.mm(a, b, out=c)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append((time.perf_counter() - t0) / calls)
        med = statistics.median(times)
        out.append({"m": m, "k": k, "n": n, "median_s": med, "gflops": 2.0 * m * k * n / med / 1e9})
    return out


def _row_shapes(rec: dict) -> tuple:
    """The GEMM shapes of a single-layer row: the step's recurrent product B x H @ H x GH and
    the input projection T*B x I @ I x GH."""
    s = rec["shape"]
    G = GATES[rec["cell"]] * s["H"]
    return (s["B"], s["H"], G), (s["T"] * s["B"], s["I"], G)


def measure(results: List[dict], device: torch.device, dtype: torch.dtype) -> dict:
    """GEMM rates, in the run's dtype, at the shapes of the measured single-layer rows, and each
    fused row's rate against the best rate of its own shapes (a row of a small shape is not
    held to the rate of a large one)."""
    shapes = []
    for rec in results:
        if layer_flops(rec) is None:
            continue
        for shape in _row_shapes(rec):
            if shape not in shapes:
                shapes.append(shape)
    gemms = gemm_rate(device, dtype, shapes) if shapes else []
    rate_of = {(g["m"], g["k"], g["n"]): g["gflops"] for g in gemms}
    best = max((g["gflops"] for g in gemms), default=None)
    rows = []
    for rec in results:
        flops = layer_flops(rec)
        fused = rec["impls"].get("fused", {})
        if flops is None or fused.get("status") != "ok":
            continue
        rate = flops / (fused["median_ms"] / 1e3) / 1e9
        own = max(rate_of[shape] for shape in _row_shapes(rec))
        rows.append(
            {
                "label": rec["label"],
                "shape_str": rec["shape_str"],
                "pass": rec["pass"],
                "gflop": flops / 1e9,
                "fused_gflops": rate,
                "gemm_gflops": own,
                "of_gemm": rate / own if own else None,
            }
        )
    return {
        "method": "torch.mm GFLOP/s in the run's dtype, median of 7 after a warm-up; fused: "
        "matrix-product FLOPs of the layer / fused median time, against the best GEMM rate of "
        "the row's own shapes (its recurrent product and input projection)",
        "dtype": str(dtype).replace("torch.", ""),
        "gemm": gemms,
        "gemm_best_gflops": best,
        "rows": rows,
    }


def format_report(report: dict) -> str:
    if not report["rows"]:
        return ""
    lines = [
        f"GEMM rate of this machine (torch.mm, {report.get('dtype', '')}, same run): "
        + ", ".join(
            f"{g['m']}x{g['k']} @ {g['k']}x{g['n']}: {g['gflops']:.1f} GFLOP/s"
            for g in report["gemm"]
        )
    ]
    width = max([14] + [len(r["label"]) for r in report["rows"]])
    for r in report["rows"]:
        lines.append(
            f"  {r['label']:<{width}} {r['shape_str']:<15} {r['pass']:<8} fused "
            f"{r['fused_gflops']:6.1f} GFLOP/s = {100 * r['of_gemm']:3.0f}% of its shapes' "
            f"best GEMM rate, {r['gemm_gflops']:.1f} GFLOP/s ({r['gflop']:.2f} GFLOP)"
        )
    return "\n".join(lines)
