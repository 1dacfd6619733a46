"""Smoke test of an installed fusedrnn (run from outside the source tree): the compiled ops load,
every module runs forward and backward through them and matches the reference."""

import torch

import fusedrnn
from fusedrnn import modules, reference

info = fusedrnn.build_info()
print(info)
assert info["backend"] == "fused" and info["cpu"], f"compiled extension not in use: {info}"
torch.manual_seed(0)
x = torch.randn(6, 3, 5, dtype=torch.float64)
for cell, cls in modules.SEQUENCE_MODULES.items():
    m = cls(5, 4).double()
    out, _ = m(x)
    out.sum().backward()
    w = [
        getattr(m, n + "_l0", None)
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch")
    ]
    ref, _, _ = reference.layer(cell, x, *w)
    err = (out - ref).abs().max().item()
    assert err < 1e-10, f"{cls.__name__}: max error {err}"
    assert all(p.grad is not None for p in m.parameters())
    print(f"{cls.__name__}: ok (max error {err:.1e})")
print("smoke test passed")
