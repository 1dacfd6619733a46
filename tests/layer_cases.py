"""One layer call of a fused op against the fp64 reference: its inputs, how to run it, and the
tolerance rule of design.md §4. Shared by tests/test_cuda.py and scripts/gpu_check_inline.py (the
GPU check), so that both check the same thing the same way."""
import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch

CELLS = ("lstm", "gru", "peephole_lstm", "wm_lstm")
HALF_TYPES = (torch.bfloat16, torch.float16)
# Floor of the half-type bound, relative to max|ref|: ~2.5 ulps (bf16 eps 2^-8, fp16 eps 2^-11).
# A low-precision reference can happen to be nearly exact on a few elements, and one rounding of
# a stored result is the least error any such result has.
HALF_FLOOR = {torch.bfloat16: 1e-2, torch.float16: 1.25e-3}


class LayerArgs(NamedTuple):
    """fp64 CPU leaves (by argument name), batch_sizes, reverse and the output cotangents."""
    leaves: Dict[str, torch.Tensor]
    batch_sizes: Optional[torch.Tensor]
    reverse: bool
    cotangents: list


def make_layer_args(cell: str, layout: str, T: int = 8, B: int = 17, I: int = 15, H: int = 33,
                    proj: int = 0, bias: bool = True, seed: int = 0) -> LayerArgs:
    """The inputs of one layer call. layout "time_major" is a (T, B, I) input with initial
    states; "packed_reverse" a packed input of non-increasing batch sizes run in reverse.
    The default sizes are odd, and large enough that the max error of the half types is a
    stable statistic (on a few hundred elements the ratio of two max errors is noisy)."""
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
    if layout not in ("time_major", "packed_reverse"):
        raise ValueError(f"layout: expected 'time_major' or 'packed_reverse', got {layout!r}")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def uniform(*shape):  # torch's RNN initialisation, uniform in +-1/sqrt(H)
        return (torch.rand(*shape, generator=g, dtype=f64) * 2 - 1) / math.sqrt(H)

    def normal(*shape):
        return torch.randn(*shape, generator=g, dtype=f64)

    G = 3 if cell == "gru" else 4
    H_out = proj or H
    leaves: Dict[str, torch.Tensor] = {}
    batch_sizes, reverse = None, False
    if layout == "packed_reverse":
        sizes = [max(1, B - (B * k) // T) for k in range(T)]  # non-increasing, sizes[0] = B
        batch_sizes = torch.tensor(sizes, dtype=torch.int64)
        reverse = True
        leaves["input"] = normal(sum(sizes), I)
    else:
        leaves["input"] = normal(T, B, I)
    leaves["weight_ih"] = uniform(G * H, I)
    leaves["weight_hh"] = uniform(G * H, H_out)
    if bias:
        leaves["bias_ih"] = uniform(G * H)
        leaves["bias_hh"] = uniform(G * H)
    if cell == "peephole_lstm":
        leaves["weight_ch"] = uniform(3, H)
    elif cell == "wm_lstm":
        leaves["weight_ch"] = uniform(3 * H, H)
    if proj:
        leaves["weight_hr"] = uniform(proj, H)
    leaves["hx"] = 0.5 * normal(B, H_out)
    if cell != "gru":
        leaves["cx"] = 0.5 * normal(B, H)
    rows = leaves["input"].shape[:-1]
    cotangents = [normal(*rows, H_out), normal(B, H_out)]
    if cell != "gru":
        cotangents.append(normal(B, H))
    return LayerArgs(leaves, batch_sizes, reverse, cotangents)


def run_layer(fn, cell: str, args: LayerArgs, device: str, dtype: torch.dtype,
              noncontiguous: bool = False) -> Dict[str, torch.Tensor]:
    """fn (functional.rnn_layer or reference.layer) on args moved to device and dtype; returns
    the outputs and the gradient of every leaf, as fp64 CPU tensors keyed by name."""
    xs = {k: v.detach().to(device, dtype).requires_grad_() for k, v in args.leaves.items()}
    if noncontiguous:  # the same values, through a transposed (batch-first) buffer
        x = xs["input"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
        assert not x.is_contiguous()
        xs["input"] = x
    out, hy, cy = fn(cell, xs["input"], xs["weight_ih"], xs["weight_hh"], xs.get("bias_ih"),
                     xs.get("bias_hh"), xs.get("weight_ch"), xs.get("weight_hr"), xs["hx"],
                     xs.get("cx"), args.batch_sizes, args.reverse)
    outs = [out, hy] + ([cy] if cy is not None else [])
    grads = torch.autograd.grad(outs, list(xs.values()),
                                [c.to(device, dtype) for c in args.cotangents])
    result = {"output": out, "h_n": hy}
    if cy is not None:
        result["c_n"] = cy
    result.update({"grad_" + k: v for k, v in zip(xs, grads)})
    return {k: v.detach().to("cpu", torch.float64) for k, v in result.items()}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, computed in fp64; 0 for empty tensors."""
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def within_tolerance(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                     lowp: Optional[torch.Tensor] = None) -> Tuple[bool, str]:
    """design.md §4 for one tensor (fp64 CPU values of a result computed in dtype):
      fp64       |err| <= 1e-10 + 1e-10 |ref|
      fp32       |err| <= 1e-5 + 1e-5 |ref|  (relative; the absolute term covers elements
                                               near zero, where a relative bound means nothing)
      fp16/bf16  max|err| <= 2 * max|err of lowp, the reference run in that dtype| + floor
    Returns whether it holds and the bound, in words."""
    if got.shape != ref.shape:
        return False, f"shape {tuple(ref.shape)} (got {tuple(got.shape)})"
    if not torch.isfinite(got).all():
        return False, "finite values"
    if dtype in (torch.float64, torch.float32):
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        return bool(((got - ref).abs() <= tol + tol * ref.abs()).all()), f"{tol} + {tol}|ref|"
    if dtype not in HALF_TYPES:
        raise ValueError(f"dtype: expected float64, float32, bfloat16 or float16, got {dtype}")
    if lowp is None:
        raise ValueError("lowp: the half types' rule needs the reference run in that dtype")
    floor = HALF_FLOOR[dtype] * (ref.abs().max().item() if ref.numel() else 0.0)
    bound = 2 * max_err(lowp, ref) + floor
    return max_err(got, ref) <= bound, (f"{bound:.3e} = 2 x the {dtype} reference's "
                                        f"{max_err(lowp, ref):.3e} + floor {floor:.3e}")
