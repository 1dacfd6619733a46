"""The serving group (``python -m fusedrnn.bench --serving``): the sizes of decoders, agents and
servers, where the work per step is small and per-call costs count.

- cells: each one-step module called from Python in a 100-step loop, at batch 1 and 32,
  hidden = input = 256, against torch.nn's LSTMCell / GRUCell, and for the peephole and
  working-memory cells against the eager step a user writes (fusedrnn.reference's step over
  the same parameters); forward (no grad) and forward + backward (a loss on every step's h).
- layers: one-layer LSTM / GRU inference at T = 200, B = 1, H = 256 and T = 200, B = 8, H = 128
  against torch.nn.LSTM / GRU.

Every row also has the weight-streaming bound of its steps: the bytes of weights one step reads
(a cell step: W_ih, W_hh and weight_ch; a layer step: W_hh, since the input projection is one
GEMM for many steps) divided by this machine's read bandwidth, measured in the same run by
summing a buffer of that size; and, for reference, the time of the step's matrix products
(three times the forward's with the backward) at the rate torch.mm reaches at the step's shape,
also measured in the same run: where fused is near it, the step is as fast as its GEMMs at
torch.mm's rate; where it is below, fused's GEMMs beat torch.mm at that shape. With
``--serving-grid`` the cells run at batch 1 .. 64 and ``serving.png`` plots the fused /
baseline ratio against the batch size.
"""

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from fusedrnn import cells, modules, reference

from . import throughput

STEPS = 100
CELL_SIZE = 256  # input and hidden size of the cell rows
CELL_BATCHES = (1, 32)
GRID_BATCHES = (1, 2, 4, 8, 16, 32, 64)
LAYER_CASES = (
    ("lstm", 200, 1, 256),
    ("gru", 200, 1, 256),
    ("lstm", 200, 8, 128),
    ("gru", 200, 8, 128),
)
TORCH_CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}
TORCH_LAYERS = {"lstm": nn.LSTM, "gru": nn.GRU}
PASSES = ("fwd", "fwd+bwd")


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def read_bandwidth(nbytes: int, repeats: int = 50) -> float:
    """Bytes per second of reading a buffer of `nbytes` over and over (torch.sum of it): the
    rate at which a step can stream weights of that size from this core's caches / memory."""
    buf = torch.rand(max(nbytes // 4, 1024))
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def step_flops(name: str, B: int, I: int, H: int, training: bool) -> float:
    """The matrix-product FLOPs of one step: x W_ih^T and h W_hh^T (and the working-memory
    cell's c W_ch^T); with the backward three times that (the gradients of the inputs and of
    the weights are products as large as the forward's)."""
    spec = cells.CELLS[name]
    f = 2.0 * B * (I + H) * spec.gates * H
    if spec.weight_ch == "full":
        f += 2.0 * B * H * 3 * H
    return 3.0 * f if training else f


def _step_fns(name: str, B: int, training: bool):
    """(fused step, baseline step, baseline label, initial state, weight bytes per step)."""
    spec = cells.CELLS[name]
    fused = modules.CELL_MODULES[name](CELL_SIZE, CELL_SIZE)
    if name in TORCH_CELLS:
        base = TORCH_CELLS[name](CELL_SIZE, CELL_SIZE)
        base.load_state_dict(fused.state_dict())
        label = "torch.nn"
    else:
        p = {k: v for k, v in fused.named_parameters()}
        args = (p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"], p["weight_ch"])

        def base(x, state):
            return reference.STEPS[name](x, state[0], state[1], *args)

        label = "eager step"
    nbytes = sum(
        w.numel() * w.element_size() for n, w in fused.named_parameters() if n.startswith("weight")
    )
    h = torch.zeros(B, CELL_SIZE)
    state = (h, h.clone()) if spec.has_cell_state else h
    return fused, base, label, state, nbytes


def _cell_loop(step, x: torch.Tensor, state, has_c: bool, training: bool):
    def run():
        s = state
        loss = 0.0
        for t in range(x.shape[0]):
            s = step(x[t], s)
            if training:
                loss = loss + (s[0] if has_c else s).sum()
        if training:
            loss.backward()

    if training:
        return run

    def run_no_grad():
        with torch.no_grad():
            run()

    return run_no_grad


def _record(
    group: str,
    case: str,
    pass_: str,
    base_label: str,
    steps: int,
    nbytes: int,
    bandwidth: float,
    flops: float,
    rate: float,
    measure: Callable[[], Dict[str, float]],
) -> dict:
    rec = {
        "group": group,
        "case": case,
        "pass": pass_,
        "baseline": base_label,
        "steps": steps,
        "weight_bytes_per_step": nbytes,
        "bound_us_per_step": nbytes / bandwidth * 1e6,
        "flops_per_step": flops,
        "mm_flops_per_s": rate,
        "mm_us_per_step": flops / rate * 1e6,
    }
    try:
        t = measure()
        rec.update(
            status="ok",
            fused_ms=t["fused"],
            baseline_ms=t["baseline"],
            speedup=t["baseline"] / t["fused"],
            fused_us_per_step=t["fused"] * 1e3 / steps,
        )
    except Exception as exc:  # recorded per row; the command fails at the end (cli)
        rec.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    return rec


def cell_rows(
    batches: Sequence[int],
    repeats: int,
    bandwidth_of: Callable[[int], float],
    rate_of: Callable[[int, int, int], float],
    names: Sequence[str] = tuple(cells.CELLS),
) -> List[dict]:
    rows = []
    for name in names:
        has_c = cells.CELLS[name].has_cell_state
        for B in batches:
            x = torch.randn(STEPS, B, CELL_SIZE)
            for pass_ in PASSES:
                training = pass_ == "fwd+bwd"
                fused, base, label, state, nbytes = _step_fns(name, B, training)

                def measure():
                    return {
                        "fused": _median_ms(_cell_loop(fused, x, state, has_c, training), repeats),
                        "baseline": _median_ms(
                            _cell_loop(base, x, state, has_c, training), repeats
                        ),
                    }

                rate = rate_of(B, CELL_SIZE, cells.CELLS[name].gates * CELL_SIZE)
                rows.append(
                    _record(
                        "cells",
                        f"{name} cell B={B} H={CELL_SIZE}",
                        pass_,
                        label,
                        STEPS,
                        nbytes,
                        bandwidth_of(nbytes),
                        step_flops(name, B, CELL_SIZE, CELL_SIZE, training),
                        rate,
                        measure,
                    )
                )
                rows[-1].update(cell=name, batch=B)
    return rows


def layer_rows(
    repeats: int, bandwidth_of: Callable[[int], float], rate_of: Callable[[int, int, int], float]
) -> List[dict]:
    rows = []
    for name, T, B, H in LAYER_CASES:
        fused = modules.SEQUENCE_MODULES[name](H, H)
        base = TORCH_LAYERS[name](H, H)
        base.load_state_dict(fused.state_dict())
        x = torch.randn(T, B, H)
        nbytes = fused.weight_hh_l0.numel() * 4

        def measure():
            with torch.no_grad():
                return {
                    "fused": _median_ms(lambda: fused(x), repeats),
                    "baseline": _median_ms(lambda: base(x), repeats),
                }

        G = cells.CELLS[name].gates
        rows.append(
            _record(
                "layers",
                f"{name} layer T={T} B={B} H={H}",
                "fwd (inference)",
                "torch.nn",
                T,
                nbytes,
                bandwidth_of(nbytes),
                step_flops(name, B, H, H, False),
                rate_of(B, H, G * H),
                measure,
            )
        )
        rows[-1].update(cell=name, batch=B)
    return rows


def run(repeats: int, grid: bool = False) -> List[dict]:
    """Every row of the group; the bandwidth measured once per weight size, the GEMM rate once
    per step shape."""
    bandwidths: Dict[int, float] = {}
    rates: Dict[tuple, float] = {}

    def bandwidth_of(nbytes: int) -> float:
        if nbytes not in bandwidths:
            bandwidths[nbytes] = read_bandwidth(nbytes)
        return bandwidths[nbytes]

    def rate_of(m: int, k: int, n: int) -> float:  # FLOP/s of torch.mm at the step's shape
        if (m, k, n) not in rates:
            rate = throughput.gemm_rate(torch.device("cpu"), torch.float32, [(m, k, n)])[0]
            rates[(m, k, n)] = rate["gflops"] * 1e9
        return rates[(m, k, n)]

    rows = cell_rows(GRID_BATCHES if grid else CELL_BATCHES, repeats, bandwidth_of, rate_of)
    return rows + layer_rows(repeats, bandwidth_of, rate_of)


def format_table(rows: Sequence[dict]) -> str:
    head = [
        "case",
        "pass",
        "baseline",
        "baseline ms",
        "fused ms",
        "speed-up",
        "fused us/step",
        "bound us/step",
        "torch.mm us/step",
    ]
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                [
                    r["case"],
                    r["pass"],
                    r["baseline"],
                    "error",
                    r["reason"][:40],
                    "",
                    "",
                    f"{r['bound_us_per_step']:.1f}",
                    f"{r['mm_us_per_step']:.1f}",
                ]
            )
            continue
        lines.append(
            [
                r["case"],
                r["pass"],
                r["baseline"],
                f"{r['baseline_ms']:.2f}",
                f"{r['fused_ms']:.2f}",
                f"{r['speedup']:.2f}x",
                f"{r['fused_us_per_step']:.1f}",
                f"{r['bound_us_per_step']:.1f}",
                f"{r['mm_us_per_step']:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def plot(rows: Sequence[dict], path: str, title: str) -> Optional[str]:
    """serving.png: fused / baseline speed-up against the batch size, per cell and pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell_rows_ = [r for r in rows if r["group"] == "cells" and r["status"] == "ok"]
    if not cell_rows_:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in cells.CELLS:
        for pass_, style in zip(PASSES, ("-", "--")):
            pts = sorted(
                (r["batch"], r["speedup"])
                for r in cell_rows_
                if r["cell"] == name and r["pass"] == pass_
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    style,
                    marker="o",
                    label=f"{name} {pass_}",
                )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speed-up of fused (baseline time / fused time)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
