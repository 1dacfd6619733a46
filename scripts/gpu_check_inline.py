#!/usr/bin/env python
"""CUDA correctness check of the fused ops (the inline stage of scripts/gpu_check.sh).

For every cell, dtype (fp64, fp32, bf16, fp16) and layout (time-major with initial states,
packed with reverse direction, plus projection / no-bias variants), runs one layer forward and
backward on the GPU and asserts its outputs and every gradient against the fp64 reference
(`fusedrnn.reference`, on the CPU) with the tolerances of SPEC section 4:

  fp64       |err| <= 1e-10 + 1e-10 |ref|
  fp32       |err| <= 1e-5 |ref| + 1e-5   (relative; the absolute term covers elements near zero,
                                           where a relative bound means nothing)
  fp16/bf16  max|err| <= 2 * max|err of the reference run in that dtype on the GPU|
                        + ~2.5 ulps of the dtype * max|ref|   (a floor: a low-precision
                        reference can happen to be nearly exact on a few elements, and one
                        rounding of a stored result is the least error any such result has)

plus: the CPU fp64 fused path against the same reference, a step larger than the kernels' grid
cap (grid-stride loop), a CUDA graph capture and replay of forward+backward of one LSTM layer
(replay equals eager on new data), and torch.cuda.synchronize() raising nothing.
Exits non-zero when any check fails; writes every measured error to --out (JSON).

--tiny runs small fp32/bf16 cases only (for compute-sanitizer, where every launch is slow).
"""
import argparse
import json
import math
import sys
import time
from typing import Dict, List, Optional

import torch

import fusedrnn
from fusedrnn import functional, reference

CELLS = ("lstm", "gru", "peephole_lstm", "wm_lstm")
HALF_TYPES = (torch.bfloat16, torch.float16)
# floor of the half-type bound, relative to max|ref|: ~2.5 ulps (bf16 eps 2^-8, fp16 eps 2^-11)
HALF_FLOOR = {torch.bfloat16: 1e-2, torch.float16: 1.25e-3}


class Case:
    """fp64 CPU leaves and cotangents of one layer call."""

    # Default sizes: odd, and large enough that the max error of the half types is a stable
    # statistic (on a few hundred elements, the ratio of two max errors is noisy).
    def __init__(self, cell: str, layout: str, T: int = 8, B: int = 17, I: int = 15,
                 H: int = 33, proj: int = 0, bias: bool = True, seed: int = 0,
                 half: bool = True):
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64

        def uniform(*shape):  # torch's RNN initialisation, uniform in +-1/sqrt(H)
            return (torch.rand(*shape, generator=g, dtype=f64) * 2 - 1) / math.sqrt(H)

        def normal(*shape):
            return torch.randn(*shape, generator=g, dtype=f64)

        self.cell, self.layout, self.proj, self.bias = cell, layout, proj, bias
        # whether to check fp16/bf16: their rule compares two max errors, which on a single
        # element is a coin toss
        self.half = half
        self.name = f"{cell}/{layout}" + (f"/proj{proj}" if proj else "") + \
            ("" if bias else "/nobias")
        G = 3 if cell == "gru" else 4
        H_out = proj or H
        t: Dict[str, torch.Tensor] = {}
        if layout == "packed_reverse":
            sizes = [max(1, B - (B * k) // T) for k in range(T)]  # non-increasing, sizes[0] = B
            self.batch_sizes: Optional[torch.Tensor] = torch.tensor(sizes, dtype=torch.int64)
            self.reverse = True
            t["input"] = normal(sum(sizes), I)
        else:
            self.batch_sizes = None
            self.reverse = False
            t["input"] = normal(T, B, I)
        t["weight_ih"] = uniform(G * H, I)
        t["weight_hh"] = uniform(G * H, H_out)
        if bias:
            t["bias_ih"] = uniform(G * H)
            t["bias_hh"] = uniform(G * H)
        if cell == "peephole_lstm":
            t["weight_ch"] = uniform(3, H)
        elif cell == "wm_lstm":
            t["weight_ch"] = uniform(3 * H, H)
        if proj:
            t["weight_hr"] = uniform(proj, H)
        t["hx"] = 0.5 * normal(B, H_out)
        if cell != "gru":
            t["cx"] = 0.5 * normal(B, H)
        self.leaves = t
        rows = t["input"].shape[:-1]
        self.cotangents = [normal(*rows, H_out), normal(B, H_out)]
        if cell != "gru":
            self.cotangents.append(normal(B, H))


def run(fn, case: Case, device: str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Outputs and gradients of every leaf, as fp64 CPU tensors."""
    leaves = {k: v.detach().to(device, dtype).requires_grad_() for k, v in case.leaves.items()}
    out, hy, cy = fn(case.cell, leaves["input"], leaves["weight_ih"], leaves["weight_hh"],
                     leaves.get("bias_ih"), leaves.get("bias_hh"), leaves.get("weight_ch"),
                     leaves.get("weight_hr"), leaves["hx"], leaves.get("cx"), case.batch_sizes,
                     case.reverse)
    outs = [out, hy] + ([cy] if cy is not None else [])
    cots = [c.to(device, dtype) for c in case.cotangents]
    names = list(leaves)
    grads = torch.autograd.grad(outs, [leaves[k] for k in names], cots)
    result = {"output": out, "h_n": hy}
    if cy is not None:
        result["c_n"] = cy
    result.update({"grad_" + k: g for k, g in zip(names, grads)})
    return {k: v.detach().to("cpu", torch.float64) for k, v in result.items()}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


class Checker:
    def __init__(self):
        self.records: List[dict] = []
        self.failures: List[str] = []

    def compare(self, label: str, got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor],
                dtype: torch.dtype, lowp: Optional[Dict[str, torch.Tensor]] = None) -> None:
        if set(got) != set(ref):
            self.failures.append(f"{label}: outputs {sorted(got)} != reference {sorted(ref)}")
            return
        for k, r in ref.items():
            g = got[k]
            rec = {"check": label, "tensor": k, "dtype": str(dtype).replace("torch.", "")}
            if g.shape != r.shape:
                self.failures.append(f"{label} {k}: shape {tuple(g.shape)} != {tuple(r.shape)}")
                continue
            err = max_err(g, r)
            rec["max_abs_err"] = err
            if not torch.isfinite(g).all():
                ok, rec["bound"] = False, "finite"
            elif dtype == torch.float64:
                ok = bool(((g - r).abs() <= 1e-10 + 1e-10 * r.abs()).all())
                rec["bound"] = "1e-10 + 1e-10|ref|"
            elif dtype == torch.float32:
                ok = bool(((g - r).abs() <= 1e-5 + 1e-5 * r.abs()).all())
                rec["bound"] = "1e-5 + 1e-5|ref|"
            else:
                assert lowp is not None, "half types need the low-precision reference"
                floor = HALF_FLOOR[dtype] * (r.abs().max().item() if r.numel() else 0.0)
                bound = 2 * max_err(lowp[k], r) + floor
                ok = err <= bound
                rec["bound"] = bound
                rec["reference_lowp_err"] = max_err(lowp[k], r)
            rec["ok"] = ok
            self.records.append(rec)
            if not ok:
                self.failures.append(f"{label} {k} [{rec['dtype']}]: max abs err {err:.3e}, "
                                     f"bound {rec['bound']}")

    def fail(self, msg: str) -> None:
        self.failures.append(msg)


def cases(tiny: bool) -> List[Case]:
    if tiny:
        kw = dict(T=3, B=3, I=4, H=5)
        out = [Case(c, lay, **kw) for c in CELLS for lay in ("time_major", "packed_reverse")]
        out.append(Case("lstm", "packed_reverse", proj=3, **kw))
        return out
    out = [Case(c, lay) for c in CELLS for lay in ("time_major", "packed_reverse")]
    out += [Case("lstm", "time_major", proj=4), Case("lstm", "packed_reverse", proj=4),
            Case("wm_lstm", "packed_reverse", proj=4), Case("peephole_lstm", "time_major",
                                                          proj=4),
            Case("lstm", "time_major", bias=False), Case("gru", "packed_reverse", bias=False),
            Case("wm_lstm", "time_major", bias=False),
            Case("lstm", "time_major", T=1, B=1, I=3, H=1, half=False)]
    return out


def check_cells(chk: Checker, tiny: bool) -> None:
    dtypes = (torch.float32, torch.bfloat16) if tiny else \
        (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    for case in cases(tiny):
        ref = run(reference.layer, case, "cpu", torch.float64)
        if not tiny:
            chk.compare(f"{case.name} cpu-fused", run(functional.rnn_layer, case, "cpu",
                                                      torch.float64), ref, torch.float64)
        for dtype in dtypes:
            if dtype in HALF_TYPES and not case.half:
                continue
            got = run(functional.rnn_layer, case, "cuda", dtype)
            lowp = run(reference.layer, case, "cuda", dtype) if dtype in HALF_TYPES else None
            chk.compare(f"{case.name} cuda", got, ref, dtype, lowp)
        torch.cuda.synchronize()


def check_grid_stride(chk: Checker) -> None:
    """A step of n*H = 1100*2048 elements, more than the 8192 x 256 threads of the grid cap, so
    that each thread handles several elements. fp64 against the reference run on the GPU in
    fp64 (same tolerance; the CPU would take long at this size)."""
    for cell in ("lstm", "gru", "wm_lstm"):
        case = Case(cell, "time_major", T=2, B=1100, I=8, H=2048, seed=1)
        chk.compare(f"{case.name} B=1100 H=2048 cuda", run(functional.rnn_layer, case, "cuda",
                                                           torch.float64),
                    run(reference.layer, case, "cuda", torch.float64), torch.float64)
        torch.cuda.synchronize()


def check_graph(chk: Checker) -> None:
    """Capture forward+backward of one fused LSTM layer in a CUDA graph, replay on new data and
    compare with eager on the same data."""
    torch.manual_seed(0)
    dev = "cuda"
    T, B, I, H = 5, 4, 6, 8
    w = [(torch.rand(4 * H, I, device=dev) * 2 - 1) / math.sqrt(H),
         (torch.rand(4 * H, H, device=dev) * 2 - 1) / math.sqrt(H),
         (torch.rand(4 * H, device=dev) * 2 - 1) / math.sqrt(H),
         (torch.rand(4 * H, device=dev) * 2 - 1) / math.sqrt(H)]
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
    names = ["output"] + ["grad_" + n for n in ("input", "weight_ih", "weight_hh", "bias_ih",
                                                "bias_hh")]
    # Same kernels and GEMMs on the same data: equal up to cuBLAS's choice of algorithm, which
    # may differ between a capturing and a plain stream; fp32 is exact to ~1e-7 here.
    for name, a, b in zip(names, [static_out, *static_grads], [eager_out, *eager_grads]):
        err = max_err(a.double(), b.double())
        ok = bool(torch.allclose(a, b, rtol=1e-6, atol=1e-6))
        chk.records.append({"check": "cuda graph replay vs eager", "tensor": name,
                            "max_abs_err": err, "bitwise_equal": bool(torch.equal(a, b)),
                            "ok": ok})
        if not ok:
            chk.fail(f"cuda graph replay vs eager {name}: max abs err {err:.3e}")
    # and the replay must have read the new data, not the capture-time data: its output matches
    # the fp64 reference on the new data
    ref_out, _, _ = reference.layer("lstm", x.detach().double().cpu(),
                                    *[t.detach().double().cpu() for t in w])
    err = max_err(static_out.double().cpu(), ref_out)
    chk.records.append({"check": "cuda graph replay vs fp64 reference", "tensor": "output",
                        "max_abs_err": err, "ok": err <= 1e-5})
    if not err <= 1e-5:
        chk.fail(f"cuda graph replay vs fp64 reference: output max abs err {err:.3e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small fp32/bf16 cases only")
    parser.add_argument("--out", default=None, help="JSON file of every measured error")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("gpu_check_inline: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    info = fusedrnn.build_info()
    print("build_info:", info, flush=True)
    # fp32 GEMMs in full fp32 (TF32 would not meet the fp32 tolerance)
    torch.backends.cuda.matmul.allow_tf32 = False
    chk = Checker()
    if info["backend"] != "fused" or not info["cuda"]:
        chk.fail(f"the fused CUDA ops are not available: {info}")
    else:
        stages = [("cells", lambda: check_cells(chk, args.tiny))]
        if not args.tiny:
            stages += [("grid_stride", lambda: check_grid_stride(chk)),
                       ("cuda_graph", lambda: check_graph(chk))]
        for name, fn in stages:
            t0 = time.time()
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as exc:  # a raised error is a failed check, reported with the rest
                chk.fail(f"{name}: raised {type(exc).__name__}: {exc}")
            print(f"stage {name}: {time.time() - t0:.1f}s, {len(chk.failures)} failures so far",
                  flush=True)
    try:
        torch.cuda.synchronize()
    except Exception as exc:
        chk.fail(f"final torch.cuda.synchronize() raised {type(exc).__name__}: {exc}")

    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "build_info": info, "tiny": args.tiny, "checks": len(chk.records),
               "failures": chk.failures, "records": chk.records}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    worst: Dict[str, float] = {}
    for r in chk.records:
        d = r.get("dtype", "float32")
        worst[d] = max(worst.get(d, 0.0), r.get("max_abs_err", 0.0))
    print(f"{len(chk.records)} tensor checks; worst max abs err per dtype: {worst}")
    for msg in chk.failures:
        print("FAIL:", msg)
    assert not chk.failures, f"{len(chk.failures)} CUDA correctness checks failed"
    print("gpu_check_inline: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
