#!/usr/bin/env python
"""CUDA correctness check of the fused ops (the inline stage of scripts/gpu_check.sh).

For every cell, dtype (fp64, fp32, bf16, fp16) and layout (time-major with initial states,
packed with reverse direction, plus projection / no-bias variants), runs one layer forward and
backward on the GPU and asserts its outputs and every gradient against the fp64 reference
(`fusedrnn.reference`, on the CPU) with the tolerance rule of design.md §4, the one the CUDA
tests use (`fusedrnn.testing.within_tolerance`; for fp16/bf16 the reference run in that dtype
is the one on the GPU);
plus: the CPU fp64 fused path against the same reference, a step larger than the kernels' grid
cap (grid-stride loop), a CUDA graph capture and replay of forward+backward of one LSTM layer
(replay equals eager on new data), and torch.cuda.synchronize() raising nothing.
Exits non-zero when any check fails; writes every measured error to --out (JSON).

--tiny runs small fp32/bf16 cases only (for compute-sanitizer, where every launch is slow).
--device cpu runs the same cell checks on the CPU fused path (no grid-stride or graph checks):
a dry run of this script where no GPU is, which the CPU test suite makes, so that a mistake in
the script itself never costs GPU time.
"""

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import fusedrnn
from fusedrnn import functional, reference
from fusedrnn.testing import (
    CELLS,
    HALF_TYPES,
    layer_results,
    make_layer_args,
    max_err,
    within_tolerance,
)


class Case:
    """One layer call (fusedrnn.testing.make_layer_args) with its name, and whether to check the
    half types on it: their rule compares two max errors, which on a single element is a coin
    toss."""

    def __init__(
        self, cell: str, layout: str, proj: int = 0, bias: bool = True, half: bool = True, **sizes
    ):
        self.cell, self.half = cell, half
        self.args = make_layer_args(cell, layout, proj=proj, bias=bias, **sizes)
        self.name = (
            f"{cell}/{layout}" + (f"/proj{proj}" if proj else "") + ("" if bias else "/nobias")
        )


def run(fn, case: Case, device: str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Outputs and gradients of every leaf, as fp64 CPU tensors."""
    return layer_results(fn, case.cell, case.args, device, dtype)


class Checker:
    def __init__(self):
        self.records: List[dict] = []
        self.failures: List[str] = []
        # one entry per (case, dtype) attempted: {"case", "dtype", "status", "seconds", ...}
        self.outcomes: List[dict] = []
        # called after each case (writes --out as it goes, so a killed run keeps its results)
        self.on_progress: Callable[[], None] = lambda: None

    def compare(
        self,
        label: str,
        got: Dict[str, torch.Tensor],
        ref: Dict[str, torch.Tensor],
        dtype: torch.dtype,
        lowp: Optional[Dict[str, torch.Tensor]] = None,
    ) -> None:
        if set(got) != set(ref):
            self.failures.append(f"{label}: outputs {sorted(got)} != reference {sorted(ref)}")
            return
        for k, r in ref.items():
            g = got[k]
            ok, bound = within_tolerance(g, r, dtype, None if lowp is None else lowp[k])
            rec = {
                "check": label,
                "tensor": k,
                "dtype": str(dtype).replace("torch.", ""),
                "max_abs_err": max_err(g, r) if g.shape == r.shape else None,
                "bound": bound,
                "ok": ok,
            }
            if lowp is not None:
                rec["reference_lowp_err"] = max_err(lowp[k], r)
            self.records.append(rec)
            if not ok:
                self.failures.append(
                    f"{label} {k} [{rec['dtype']}]: max abs err {rec['max_abs_err']}, bound {bound}"
                )

    def fail(self, msg: str) -> None:
        self.failures.append(msg)

    def attempt(self, case: str, dtype: str, fn: Callable[[], None]) -> bool:
        """Runs one case in one dtype; an exception is a failure of that case and dtype only,
        recorded with the rest. Appends the outcome (ok / fail / error) to `outcomes`."""
        n = len(self.failures)
        t0 = time.time()
        status, detail = "ok", None
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 (any error is a failed check, not a stop)
            text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
            self.fail(f"{case} [{dtype}]: raised {text}")
            status, detail = "error", text
        if status == "ok" and len(self.failures) > n:
            status, detail = "fail", "; ".join(self.failures[n:])[:500]
        self.outcomes.append(
            {
                "case": case,
                "dtype": dtype,
                "status": status,
                "seconds": round(time.time() - t0, 3),
                "detail": detail,
            }
        )
        return status == "ok"


def cases(tiny: bool) -> List[Case]:
    if tiny:
        kw = dict(T=3, B=3, I=4, H=5)
        out = [Case(c, lay, **kw) for c in CELLS for lay in ("time_major", "packed_reverse")]
        out.append(Case("lstm", "packed_reverse", proj=3, **kw))
        return out
    out = [Case(c, lay) for c in CELLS for lay in ("time_major", "packed_reverse")]
    out += [
        Case("lstm", "time_major", proj=4),
        Case("lstm", "packed_reverse", proj=4),
        Case("wm_lstm", "packed_reverse", proj=4),
        Case("peephole_lstm", "time_major", proj=4),
        Case("lstm", "time_major", bias=False),
        Case("gru", "packed_reverse", bias=False),
        Case("wm_lstm", "time_major", bias=False),
        Case("lstm", "time_major", T=1, B=1, I=3, H=1, half=False),
    ]
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_cells(chk: Checker, tiny: bool, device: str) -> None:
    """Every case in every dtype, each on its own: a case or dtype that fails or raises is
    recorded and the others still run."""
    dtypes = (
        (torch.float32, torch.bfloat16)
        if tiny
        else (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    )
    for case in cases(tiny):
        ref: Dict[str, Dict[str, torch.Tensor]] = {}

        def reference_run(case=case, ref=ref):
            ref["fp64"] = run(reference.layer, case, "cpu", torch.float64)

        if not chk.attempt(f"{case.name} cpu-reference", "float64", reference_run):
            chk.on_progress()
            continue  # nothing to compare this case with
        if not tiny:
            chk.attempt(
                f"{case.name} cpu-fused",
                "float64",
                lambda case=case: chk.compare(
                    f"{case.name} cpu-fused",
                    run(functional.rnn_layer, case, "cpu", torch.float64),
                    ref["fp64"],
                    torch.float64,
                ),
            )
        for dtype in dtypes:
            if dtype in HALF_TYPES and not case.half:
                continue

            def one(case=case, dtype=dtype):
                got = run(functional.rnn_layer, case, device, dtype)
                lowp = run(reference.layer, case, device, dtype) if dtype in HALF_TYPES else None
                synchronize(device)
                chk.compare(f"{case.name} {device}", got, ref["fp64"], dtype, lowp)

            chk.attempt(f"{case.name} {device}", _dtype_name(dtype), one)
        chk.on_progress()


def check_grid_stride(chk: Checker) -> None:
    """A step of n*H = 1100*2048 elements, more than the 8192 x 256 threads of the grid cap, so
    that each thread handles several elements. fp64 against the reference run on the GPU in
    fp64 (same tolerance; the CPU would take long at this size)."""
    for cell in ("lstm", "gru", "wm_lstm"):

        def one(cell=cell):
            case = Case(cell, "time_major", T=2, B=1100, I=8, H=2048, seed=1)
            got = run(functional.rnn_layer, case, "cuda", torch.float64)
            want = run(reference.layer, case, "cuda", torch.float64)
            torch.cuda.synchronize()
            chk.compare(f"{case.name} B=1100 H=2048 cuda", got, want, torch.float64)

        chk.attempt(f"{cell}/time_major B=1100 H=2048 cuda", "float64", one)
        chk.on_progress()


def check_graph(chk: Checker) -> None:
    """Capture forward+backward of one fused LSTM layer in a CUDA graph, replay on new data and
    compare with eager on the same data."""
    torch.manual_seed(0)
    dev = "cuda"
    T, B, I, H = 5, 4, 6, 8
    w = [
        (torch.rand(4 * H, I, device=dev) * 2 - 1) / math.sqrt(H),
        (torch.rand(4 * H, H, device=dev) * 2 - 1) / math.sqrt(H),
        (torch.rand(4 * H, device=dev) * 2 - 1) / math.sqrt(H),
        (torch.rand(4 * H, device=dev) * 2 - 1) / math.sqrt(H),
    ]
    w = [t.requires_grad_() for t in w]
    x = torch.randn(T, B, I, device=dev, requires_grad=True)
    gy = torch.randn(T, B, H, device=dev)
    leaves = [x] + w

    def step():
        out, hy, cy = functional.rnn_layer("lstm", x, *w)
        return out, torch.autograd.grad([out], leaves, [gy])

    # warm up on a side stream before capturing (creates the cuBLAS handle and workspace)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grads = step()

    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        gy.copy_(torch.randn_like(gy))
        for t in w:
            t.mul_(0.9)
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_grads = step()
    torch.cuda.synchronize()
    names = ["output"] + [
        "grad_" + n for n in ("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]
    # Same kernels and GEMMs on the same data: equal up to cuBLAS's choice of algorithm, which
    # may differ between a capturing and a plain stream; fp32 is exact to ~1e-7 here.
    for name, a, b in zip(names, [static_out, *static_grads], [eager_out, *eager_grads]):
        err = max_err(a.double(), b.double())
        ok = bool(torch.allclose(a, b, rtol=1e-6, atol=1e-6))
        chk.records.append(
            {
                "check": "cuda graph replay vs eager",
                "tensor": name,
                "max_abs_err": err,
                "bitwise_equal": bool(torch.equal(a, b)),
                "ok": ok,
            }
        )
        if not ok:
            chk.fail(f"cuda graph replay vs eager {name}: max abs err {err:.3e}")
    # and the replay must have read the new data, not the capture-time data: its output matches
    # the fp64 reference on the new data
    ref_out, _, _ = reference.layer(
        "lstm", x.detach().double().cpu(), *[t.detach().double().cpu() for t in w]
    )
    err = max_err(static_out.double().cpu(), ref_out)
    chk.records.append(
        {
            "check": "cuda graph replay vs fp64 reference",
            "tensor": "output",
            "max_abs_err": err,
            "ok": err <= 1e-5,
        }
    )
    if not err <= 1e-5:
        chk.fail(f"cuda graph replay vs fp64 reference: output max abs err {err:.3e}")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _summary(chk: Checker, device: str, name: str, info: dict, tiny: bool, complete: bool) -> dict:
    by_dtype: Dict[str, Dict[str, int]] = {}
    for o in chk.outcomes:
        d = by_dtype.setdefault(o["dtype"], {"ok": 0, "fail": 0, "error": 0})
        d[o["status"]] += 1
    return {
        "device": name,
        "device_type": device,
        "torch": torch.__version__,
        "build_info": info,
        "tiny": tiny,
        "complete": complete,
        "checks": len(chk.records),
        "cases": len(chk.outcomes),
        "cases_by_dtype": by_dtype,
        "failures": chk.failures,
        "outcomes": chk.outcomes,
        "records": chk.records,
    }


def _write(path: Optional[str], doc: dict) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small fp32/bf16 cases only")
    parser.add_argument(
        "--out",
        default=None,
        help="JSON file of every measured error and of each case's outcome "
        'per dtype; rewritten after every case ("complete": false until '
        "the end), so a run that is killed keeps what it checked",
    )
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: a dry run of the cell checks on the CPU fused path",
    )
    args = parser.parse_args()
    device = args.device

    if device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check_inline: --device cuda, but torch.cuda.is_available() is False "
            "(use --device cpu for the dry run)",
            file=sys.stderr,
        )
        return 2
    info = fusedrnn.build_info()
    print("build_info:", info, flush=True)
    # fp32 GEMMs in full fp32 (TF32 would not meet the fp32 tolerance)
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    chk = Checker()
    chk.on_progress = lambda: _write(args.out, _summary(chk, device, name, info, args.tiny, False))
    if info["backend"] != "fused" or not info[device]:
        chk.fail(f"the fused {device} ops are not available: {info}")
    else:
        stages = [("cells", lambda: check_cells(chk, args.tiny, device))]
        if not args.tiny and device == "cuda":
            stages += [
                ("grid_stride", lambda: check_grid_stride(chk)),
                (
                    "cuda_graph",
                    lambda: chk.attempt(
                        "lstm cuda graph replay", "float32", lambda: check_graph(chk)
                    ),
                ),
            ]
        for stage, fn in stages:
            t0 = time.time()
            try:  # the stages record each case on its own; this catches a bug of the loop
                fn()
                synchronize(device)
            except Exception as exc:
                chk.fail(f"{stage}: raised {type(exc).__name__}: {exc}")
            print(
                f"stage {stage}: {time.time() - t0:.1f}s, {len(chk.outcomes)} cases, "
                f"{len(chk.failures)} failures so far",
                flush=True,
            )
    try:
        synchronize(device)
    except Exception as exc:
        chk.fail(f"final torch.cuda.synchronize() raised {type(exc).__name__}: {exc}")

    summary = _summary(chk, device, name, info, args.tiny, True)
    _write(args.out, summary)
    worst: Dict[str, float] = {}
    for r in chk.records:
        d = r.get("dtype", "float32")
        err = r.get("max_abs_err")
        worst[d] = max(worst.get(d, 0.0), err if isinstance(err, float) else 0.0)
    print(
        f"{len(chk.records)} tensor checks in {len(chk.outcomes)} cases x dtypes "
        f"{summary['cases_by_dtype']}; worst max abs err per dtype: {worst}"
    )
    for msg in chk.failures:
        print("FAIL:", msg)
    if chk.failures:
        print(
            f"gpu_check_inline: {len(chk.failures)} {device} correctness checks failed",
            file=sys.stderr,
        )
        return 1
    print(f"gpu_check_inline: all {len(chk.records)} checks passed ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
