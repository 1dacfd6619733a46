"""Shared helpers of the fusedrnn test suite.

Everything here is deterministic: every test starts from a seed derived from its own node id,
so a failure reproduces when the test is run alone.
"""
import zlib
from typing import Dict, Optional

import pytest
import torch
from torch import nn

from layer_cases import CELLS, max_err  # noqa: F401 (shared with the CUDA tests)

# bench/README.md (protocol, threads): on these 2-core machines OpenMP's spin-wait makes two-thread
# small GEMMs ~30x slower than one thread. The suite runs single-threaded to stay fast; the
# multi-threaded code path (parallel_for over the rows of a step) has its own test that raises the
# thread count.
torch.set_num_threads(1)

LSTM_FAMILY = ("lstm", "peephole_lstm", "wm_lstm")
GATES = {"lstm": 4, "peephole_lstm": 4, "wm_lstm": 4, "gru": 3}
DTYPES = (torch.float64, torch.float32, torch.bfloat16)

# Absolute/relative tolerances of a fused result (outputs, states, gradients) against the fp64
# reference (design.md §4).
TOL = {
    # design.md §4 says 1e-10. Fused and reference evaluate the same expressions in a different
    # summation order (one big GEMM vs per-step matmuls, fused bias add); each differs by a few
    # ulps (~1e-16) and a handful of steps of recurrence amplify that by at most O(10).
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    # design.md §4 says 1e-5 relative. The atol of 1e-5 covers elements whose true value is near 0,
    # where a relative bound is meaningless: every quantity here is O(1) (gates are bounded by
    # sigmoid/tanh, inputs and weights are O(1), gradients are sums of a few dozen O(1) terms),
    # so an fp32 rounding error (eps 1.2e-7) carried through ~10-term dot products and a few
    # steps stays well below 1e-5 absolute.
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}

# bf16 (design.md §4): the error of the fused result against the fp64 reference may be at most
# twice the error of the reference itself computed in bf16. The bf16 reference can happen to be
# (nearly) exact on a small tensor, so an absolute floor of BF16_FLOOR * max|ref| is added:
# 1e-2 is ~2.5 ulps of bf16 (eps = 2**-8 = 3.9e-3) relative to the largest value, i.e. the
# rounding of a single bf16 store, the least error any bf16 result can be expected to have.
BF16_FLOOR = 1e-2


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch's global RNG from the test's node id: reproducible and distinct per test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def tol(dtype: torch.dtype) -> dict:
    return TOL[dtype]


# The CPU instruction sets of the vectorised kernels (csrc/cpu/isa.h). Tests that take the
# `cpu_isa` fixture run once under each ISA this CPU has (the lower ones forced), so that an
# AVX-512 machine tests the AVX2 and baseline kernels too; the session fails if such tests ran
# but not under every ISA the CPU has (a build that lost its AVX2 kernels, say), see
# pytest_sessionfinish below.
ISAS = ("baseline", "avx2", "avx512")


def cpu_flags() -> set:
    """The CPU's feature flags, read from /proc/cpuinfo (independent of the library)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isas_of_cpu() -> list:
    """The ISAs of ISAS this CPU supports (the library needs AVX2 + FMA, and AVX512F/BW/VL/DQ)."""
    f = cpu_flags()
    out = ["baseline"]
    if {"avx2", "fma"} <= f:
        out.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= f:
            out.append("avx512")
    return out


_ISA_RUNS = {"collected": set(), "passed": set()}


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Runs the test with the library's CPU kernels switched to one ISA, then restores it."""
    isa = request.param
    _ISA_RUNS["collected"].add(isa)
    if isa not in isas_of_cpu():
        pytest.skip(f"this CPU has no {isa} (it has {', '.join(isas_of_cpu())})")
    ops = torch.ops.fusedrnn
    previous = ops._set_cpu_isa(isa)
    try:
        assert ops.cpu_isa() == isa
        yield isa
    finally:
        ops._set_cpu_isa(previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.passed and "cpu_isa" in item.fixturenames:
        _ISA_RUNS["passed"].add(item.callspec.params.get("cpu_isa"))


def pytest_sessionfinish(session, exitstatus):
    """Fails the session when the ISA-parametrised tests ran but none passed under an ISA this
    CPU has: the suite must have tested every ISA's kernels, at least baseline and AVX2 on any
    machine that has AVX2."""
    if not _ISA_RUNS["collected"] or exitstatus != 0:
        return
    missing = [isa for isa in isas_of_cpu()
               if isa in _ISA_RUNS["collected"] and isa not in _ISA_RUNS["passed"]]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if missing:
        if reporter:
            reporter.write_line(f"fusedrnn: no ISA-parametrised test passed under {missing}, "
                                f"which this CPU has", red=True)
        session.exitstatus = 1
    elif reporter:
        reporter.write_line("fusedrnn: CPU kernels tested under ISAs: "
                            + ", ".join(i for i in ISAS if i in _ISA_RUNS["passed"]))


def make_weights(cell: str, I: int, H: int, P: int = 0, bias: bool = True,
                 dtype: torch.dtype = torch.float64, scale: float = 1.0,
                 requires_grad: bool = False) -> Dict[str, Optional[torch.Tensor]]:
    """Random weights of one layer/direction of `cell`, keyed by the op's argument names.

    Absent parameters are None. Values are uniform in +-scale (default 1, larger than torch's
    +-1/sqrt(H) init so the gates are driven away from 0.5 and saturation is exercised).
    """
    G = GATES[cell]
    H_out = P if P > 0 else H

    def u(*shape):
        t = (torch.rand(*shape, dtype=torch.float64) * 2 - 1) * scale
        return t.to(dtype).requires_grad_(requires_grad)

    w = {"weight_ih": u(G * H, I), "weight_hh": u(G * H, H_out),
         "bias_ih": u(G * H) if bias else None, "bias_hh": u(G * H) if bias else None,
         "weight_ch": None, "weight_hr": None}
    if cell == "peephole_lstm":
        w["weight_ch"] = u(3, H)
    elif cell == "wm_lstm":
        w["weight_ch"] = u(3 * H, H)
    if P > 0:
        assert cell in LSTM_FAMILY
        w["weight_hr"] = u(P, H)
    return w


def cast(t, dtype):
    return None if t is None else t.detach().to(dtype)


def cast_weights(w: dict, dtype: torch.dtype, requires_grad: bool = False) -> dict:
    return {k: (None if v is None else v.detach().to(dtype).requires_grad_(requires_grad))
            for k, v in w.items()}


WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch", "weight_hr")


def layer_args(w: dict):
    """Weights in the positional order of the ops / functional.rnn_layer."""
    return [w[k] for k in WEIGHT_NAMES]


def run_layer(fn, cell, x, w, hx=None, cx=None, batch_sizes=None, reverse=False):
    """Call `fn` (fusedrnn.functional.rnn_layer or fusedrnn.reference.layer) on one layer."""
    return fn(cell, x, *layer_args(w), hx, cx if cell != "gru" else None, batch_sizes, reverse)


def make_states(cell, B, H, P=0, dtype=torch.float64):
    H_out = P if P > 0 else H
    hx = torch.randn(B, H_out, dtype=torch.float64).to(dtype)
    cx = torch.randn(B, H, dtype=torch.float64).to(dtype) if cell != "gru" else None
    return hx, cx


def make_input(T, B, I, batch_sizes=None, dtype=torch.float64):
    """(T, B, I) input, or packed (sum(batch_sizes), I) when batch_sizes is given."""
    if batch_sizes is not None:
        return torch.randn(int(sum(batch_sizes)), I, dtype=torch.float64).to(dtype)
    return torch.randn(T, B, I, dtype=torch.float64).to(dtype)


def assert_close(actual, expected, dtype, msg=""):
    """`actual` (any dtype) against the fp64 `expected` with the tolerance of `dtype`."""
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} vs {expected.shape}"
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(),
                               **TOL[dtype], msg=lambda m: f"{msg}: {m}")


def assert_bf16_close(fused, ref_bf16, ref64, msg=""):
    """design.md §4 for bf16: err(fused) <= 2 * err(bf16 reference) + floor (see BF16_FLOOR)."""
    assert fused.shape == ref64.shape, f"{msg}: shape {fused.shape} vs {ref64.shape}"
    assert fused.dtype == torch.bfloat16, f"{msg}: dtype {fused.dtype}"
    err_fused = max_err(fused, ref64)
    err_ref = max_err(ref_bf16, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = 2 * err_ref + BF16_FLOOR * scale
    assert err_fused <= bound, (f"{msg}: bf16 fused error {err_fused:.3g} > bound {bound:.3g} "
                                f"(bf16 reference error {err_ref:.3g}, max|ref| {scale:.3g})")


# ---- module-level helpers ----------------------------------------------------------------------

def copy_params(src: nn.Module, dst: nn.Module) -> None:
    """Load `src`'s state_dict into `dst`, asserting identical key names (in order) and shapes."""
    sd = src.state_dict()
    dst_sd = dst.state_dict()
    assert list(sd.keys()) == list(dst_sd.keys())
    for k in sd:
        assert sd[k].shape == dst_sd[k].shape, k
    dst.load_state_dict(sd)


def make_pair(torch_cls, fused_cls, *args, dtype=torch.float64, **kwargs):
    """(torch module, fused module) with the same arguments and the torch module's weights."""
    ref = torch_cls(*args, dtype=dtype, **kwargs)
    fused = fused_cls(*args, dtype=dtype, **kwargs)
    copy_params(ref, fused)
    return ref, fused


def unpack_output(out):
    """Tensor view of a module output (PackedSequence -> its data)."""
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return out.data
    return out


def flatten_result(res):
    """(output, h_n[, c_n]) tensors of a sequence module's return value."""
    output, state = res
    tensors = [unpack_output(output)]
    if isinstance(state, tuple):
        tensors += list(state)
    else:
        tensors.append(state)
    return tensors


def backward_random_functional(tensors, seed):
    """Backward of a fixed random linear functional of every tensor (weights drawn from a
    generator seeded with `seed`, in fp64, cast to each tensor's dtype), so that every output
    contributes to every gradient."""
    gen = torch.Generator().manual_seed(seed)
    sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum()
        for t in tensors).backward()


def input_state_param_grads(module, input_leaf, state_leaves):
    """The gradients after a backward, by name: "input", "state0".., then every parameter."""
    grads = {"input": input_leaf.grad}
    for i, s in enumerate(state_leaves):
        grads[f"state{i}"] = s.grad
    for name, p in module.named_parameters():
        grads[name] = p.grad
    return grads


def compare_modules(ref, fused, inp, hx, dtype, check_grads=True):
    """Forward both modules on clones of `inp`/`hx`; compare outputs, final states and the
    gradients of the input, the initial state and every parameter (by name)."""

    def clone_in(x):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            data = x.data.detach().clone().requires_grad_(check_grads)
            return nn.utils.rnn.PackedSequence(data, x.batch_sizes, x.sorted_indices,
                                               x.unsorted_indices), data
        t = x.detach().clone().requires_grad_(check_grads)
        return t, t

    def clone_state(s):
        if s is None:
            return None, []
        if isinstance(s, tuple):
            ts = tuple(t.detach().clone().requires_grad_(check_grads) for t in s)
            return ts, list(ts)
        t = s.detach().clone().requires_grad_(check_grads)
        return t, [t]

    results = []
    for m in (ref, fused):
        m.zero_grad(set_to_none=True)
        x, leaf = clone_in(inp)
        h, h_leaves = clone_state(hx)
        res = m(x) if h is None else m(x, h)
        tensors = flatten_result(res)
        grads = None
        if check_grads:
            backward_random_functional(tensors, seed=1234)
            grads = input_state_param_grads(m, leaf, h_leaves)
        results.append((tensors, grads))
    (t_ref, g_ref), (t_fus, g_fus) = results
    assert len(t_ref) == len(t_fus)
    for i, (a, b) in enumerate(zip(t_fus, t_ref)):
        assert a.dtype == b.dtype, f"output {i}: dtype {a.dtype} vs {b.dtype}"
        assert_close(a, b, dtype, f"output {i}")
    if check_grads:
        assert g_ref.keys() == g_fus.keys()
        for k in g_ref:
            assert g_ref[k] is not None and g_fus[k] is not None, f"grad of {k} missing"
            assert_close(g_fus[k], g_ref[k], dtype, f"grad of {k}")
    return results
