"""The fused ops on CUDA tensors: outputs and gradients against the fp64 reference on the CPU
(design.md §4 tolerances), torch.nn parity of the modules, fp64 gradcheck, opcheck, CUDA graph
capture, torch.compile(fullgraph=True), stream and synchronisation behaviour (design.md §3), and
the steps' raw GEMM through cuBLAS (csrc/execution/cublas.cpp: every layout, ATen's precision
settings). Every test needs a CUDA GPU and is skipped, with that reason, without one."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import cells, functional, modules, reference
from fusedrnn.testing import (
    CELLS,
    HALF_TYPES,
    LSTM_FAMILY,
    check_raw_gemm,
    layer_results,
    make_layer_args,
    max_err,
    raw_gemm_cases,
    run_layer,
    within_tolerance,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _full_fp32_matmul():
    # TF32 GEMMs would not meet the fp32 tolerance; torch's default is off, make sure of it.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_extension_has_cuda_kernels():
    info = fusedrnn.build_info()
    assert info["backend"] == "fused", info
    assert info["cuda"], f"fusedrnn._C has no CUDA kernels: {info}"


# ---------------------------------------------------------------------------------------------
# one layer through fusedrnn.functional against fusedrnn.reference


def assert_matches(got, ref, dtype, lowp=None):
    """design.md §4 tolerances against the fp64 reference (fusedrnn.testing.within_tolerance)."""
    assert set(got) == set(ref)
    for k, r in ref.items():
        ok, bound = within_tolerance(got[k], r, dtype, None if lowp is None else lowp[k])
        assert ok, f"{k} [{dtype}]: max abs err {max_err(got[k], r):.3e}, bound {bound}"


def check_layer(cell, dtype, args, noncontiguous=False):
    ref = layer_results(reference.layer, cell, args, "cpu", torch.float64)
    got = layer_results(functional.rnn_layer, cell, args, "cuda", dtype, noncontiguous)
    lowp = None
    if dtype in HALF_TYPES:
        lowp = layer_results(reference.layer, cell, args, "cuda", dtype)
    assert_matches(got, ref, dtype, lowp)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["time_major", "packed_reverse", "noncontiguous"])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_cuda_matches_reference(cell, layout, dtype):
    args = make_layer_args(cell, "time_major" if layout == "noncontiguous" else layout)
    check_layer(cell, dtype, args, noncontiguous=layout == "noncontiguous")


@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.float32, torch.bfloat16],
    ids=lambda d: str(d).replace("torch.", ""),
)
@pytest.mark.parametrize("layout", ["time_major", "packed_reverse"])
@pytest.mark.parametrize("cell", LSTM_FAMILY)
def test_layer_cuda_projection(cell, layout, dtype):
    check_layer(cell, dtype, make_layer_args(cell, layout, proj=5))


@pytest.mark.parametrize("cell", CELLS)
def test_layer_cuda_no_bias(cell):
    check_layer(cell, torch.float32, make_layer_args(cell, "packed_reverse", bias=False))


# fp64/fp32 only: the half types' rule compares two max errors, on one element a coin toss
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32], ids=lambda d: str(d).replace("torch.", "")
)
@pytest.mark.parametrize("cell", CELLS)
def test_layer_cuda_single_step_single_unit(cell, dtype):
    check_layer(cell, dtype, make_layer_args(cell, "time_major", T=1, B=1, I=2, H=1))


@pytest.mark.parametrize("cell", CELLS)
def test_layer_cuda_large_step(cell):
    """n*H = 1100*2048 elements per step: more than the kernels' capped grid has threads, so
    the grid-stride loop runs several iterations. fp64 against the reference on the GPU."""
    args = make_layer_args(cell, "time_major", T=2, B=1100, I=8, H=2048, seed=1)
    got = layer_results(functional.rnn_layer, cell, args, "cuda", torch.float64)
    ref = layer_results(reference.layer, cell, args, "cuda", torch.float64)
    assert_matches(got, ref, torch.float64)


# ---------------------------------------------------------------------------------------------
# modules against torch.nn

# the cells torch.nn has (nn.LSTM / nn.GRU exactly), and their variants with a projection
TORCH_CONFIGS = [
    m
    for n, c in cells.CELLS.items()
    if c.in_torch_nn
    for m in ((n, n + "_proj") if c.has_cell_state else (n,))
]


@pytest.mark.parametrize("config", TORCH_CONFIGS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_module_cuda_matches_torch_nn(config, packed):
    torch.manual_seed(0)
    I, H, T, B = 6, 10, 7, 5
    kw = dict(num_layers=2, bidirectional=True, batch_first=True)
    cell = config.removesuffix("_proj")
    fcls = modules.SEQUENCE_MODULES[cell]
    if not cells.CELLS[cell].has_cell_state:
        ref_mod, mod = nn.GRU(I, H, **kw), fcls(I, H, **kw)
    else:
        proj = 4 if config.endswith("_proj") else 0
        ref_mod = nn.LSTM(I, H, proj_size=proj, **kw)
        mod = fcls(I, H, proj_size=proj, **kw)
    mod.load_state_dict(ref_mod.state_dict())
    ref_mod = ref_mod.double()
    mod = mod.cuda()
    x = torch.randn(B, T, I, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 6, 1, 4])

    def forward(m, inp):
        if packed:
            inp = pack_padded_sequence(inp, lengths, batch_first=True, enforce_sorted=False)
        out, state = m(inp)
        out = out.data if packed else out
        states = list(state) if isinstance(state, tuple) else [state]
        return [out] + states

    x_ref = x.clone().requires_grad_()
    outs_ref = forward(ref_mod, x_ref)
    x_cuda = x.float().cuda().requires_grad_()
    outs = forward(mod, x_cuda)
    cots = [torch.randn_like(o) for o in outs_ref]
    torch.autograd.backward(outs_ref, cots)
    torch.autograd.backward(outs, [c.float().cuda() for c in cots])
    for o, r in zip(outs, outs_ref):
        torch.testing.assert_close(o.double().cpu(), r.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_cuda.grad.double().cpu(), x_ref.grad, rtol=1e-5, atol=1e-5)
    ref_params = dict(ref_mod.named_parameters())
    for name, p in mod.named_parameters():
        torch.testing.assert_close(
            p.grad.double().cpu(),
            ref_params[name].grad,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m: f"{name}: {m}",
        )


# ---------------------------------------------------------------------------------------------
# autograd, op registration, compilation, capture


@pytest.mark.parametrize("layout", ["time_major", "packed_reverse"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_cuda_fp64(cell, layout):
    leaves, batch_sizes, reverse, _ = make_layer_args(cell, layout, T=3, B=3, I=3, H=4)
    names = list(leaves)
    inputs = tuple(leaves[k].cuda().requires_grad_() for k in names)

    def fn(*xs):
        a = dict(zip(names, xs))
        out, hy, cy = functional.rnn_layer(
            cell,
            a["input"],
            a["weight_ih"],
            a["weight_hh"],
            a.get("bias_ih"),
            a.get("bias_hh"),
            a.get("weight_ch"),
            a.get("weight_hr"),
            a["hx"],
            a.get("cx"),
            batch_sizes,
            reverse,
        )
        return (out, hy) if cy is None else (out, hy, cy)

    assert torch.autograd.gradcheck(fn, inputs)


def cuda_leaves(cell, layout, dtype=torch.float32):
    """A small layer case on the GPU: its leaves (by argument name), batch_sizes, reverse."""
    leaves, batch_sizes, reverse, _ = make_layer_args(cell, layout, T=4, B=3, I=5, H=6)
    return (
        {k: v.to("cuda", dtype).requires_grad_() for k, v in leaves.items()},
        batch_sizes,
        reverse,
    )


def op_args(cell, layout, dtype=torch.float32):
    """The positional arguments of the forward op on a small case (see cuda_leaves)."""
    t, batch_sizes, reverse = cuda_leaves(cell, layout, dtype)
    if not cells.CELLS[cell].has_cell_state:
        return (
            t["input"],
            t["weight_ih"],
            t["weight_hh"],
            t["bias_ih"],
            t["bias_hh"],
            t["hx"],
            batch_sizes,
            reverse,
        )
    return (
        t["input"],
        t["weight_ih"],
        t["weight_hh"],
        t["bias_ih"],
        t["bias_hh"],
        t.get("weight_ch"),
        None,
        t["hx"],
        t["cx"],
        batch_sizes,
        reverse,
    )


@pytest.mark.parametrize("layout", ["time_major", "packed_reverse"])
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_cuda(cell, layout):
    op = getattr(torch.ops.fusedrnn, f"{cell}_forward").default
    torch.library.opcheck(op, op_args(cell, layout))


@pytest.mark.parametrize("cell", CELLS)
def test_cuda_graph_capture_replay(cell):
    """Forward+backward of one layer captured in a CUDA graph: a replay on new data equals the
    eager computation on that data."""
    t, batch_sizes, reverse = cuda_leaves(cell, "time_major")
    leaves = list(t.values())
    T, B = t["input"].shape[:2]
    H_out = t["weight_hh"].shape[1]
    gy = torch.randn(T, B, H_out, device="cuda")

    def step():
        out = run_layer(
            functional.rnn_layer, cell, t["input"], t, t["hx"], t.get("cx"), batch_sizes, reverse
        )[0]
        return [out, *torch.autograd.grad([out], leaves, [gy])]

    side = torch.cuda.Stream()  # warm-up off the default stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        for leaf in leaves:
            leaf.copy_(torch.randn_like(leaf) * 0.3)
        gy.copy_(torch.randn_like(gy))
    graph.replay()
    eager = step()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        # equal up to cuBLAS's choice of algorithm on a capturing stream
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# inductor (the default backend) for one module; aot_eager, which traces the same graph with
# the same fake implementations and autograd but skips code generation, for the others
COMPILE_CASES = [
    (cls, "inductor" if i == 0 else "aot_eager")
    for i, cls in enumerate(modules.SEQUENCE_MODULES.values())
]


@pytest.mark.parametrize(
    "cls,backend",
    COMPILE_CASES,
    ids=[cls.__name__ + ("-inductor" if b == "inductor" else "") for cls, b in COMPILE_CASES],
)
def test_compile_fullgraph_cuda(cls, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    mod = cls(6, 8, num_layers=2, bidirectional=True).cuda()
    compiled = torch.compile(copy.deepcopy(mod), fullgraph=True, backend=backend)
    x = torch.randn(5, 3, 6, device="cuda")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, _ = mod(x1)
    out_c, _ = compiled(x2)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    out_c.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_no_host_sync(cell):
    """Forward and backward launch work only: no device-to-host synchronisation (design.md §3)."""
    args = op_args(cell, "packed_reverse")
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = getattr(torch.ops.fusedrnn, f"{cell}_forward")(*args)[0]
        torch.autograd.grad([out], [args[0], args[1]], [torch.ones_like(out)])
    finally:
        torch.cuda.set_sync_debug_mode(old)
    torch.cuda.synchronize()


@pytest.mark.parametrize("cell", CELLS)
def test_runs_on_current_stream(cell):
    """On a side stream the result is the default stream's (the kernels and GEMMs are ordered
    on the current stream)."""
    args = op_args(cell, "time_major")
    op = getattr(torch.ops.fusedrnn, f"{cell}_forward")
    with torch.no_grad():
        expected = op(*args)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                got = op(*args)
        side.synchronize()
    for a, b in zip(got, expected):
        # a race (work on another stream) would show as large differences
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_device_mismatch_is_reported():
    args = list(op_args("lstm", "time_major"))
    args[1] = args[1].detach().cpu()
    with pytest.raises(RuntimeError, match="weight_ih"):
        torch.ops.fusedrnn.lstm_forward(*args)


# ---------------------------------------------------------------------------------------------
# the steps' raw GEMM through cuBLAS (csrc/execution/step_device.h, cublas.cpp)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ops = torch.ops.fusedrnn


def _name(d):
    return str(d).replace("torch.", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_step_gemms_run_on_cublas(dtype):
    """The per-step GEMMs of a CUDA call are cublasGemmEx calls (cuBLAS found in torch's
    libraries), not ATen's."""
    assert ops._gemm_backend(torch.zeros(1, device="cuda", dtype=dtype)) == "cublas"


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_raw_gemm_cuda_every_layout(dtype):
    """The row-major to column-major mapping of the cuBLAS call, in every transpose / beta /
    leading-dimension layout (tests/test_step_gemm.py): results against fp64, C unread with
    beta 0, nothing written between the rows."""
    gen = torch.Generator().manual_seed(0)
    for case in raw_gemm_cases():
        check_raw_gemm("cuda", dtype, case, gen)


def test_raw_gemm_tf32_as_torch_matmul():
    """fp32 GEMMs use TF32 exactly when torch.matmul does (allow_tf32): a long inner
    dimension shows TF32's error (~1e-3 relative) against fp32's."""
    gen = torch.Generator().manual_seed(0)
    m, n, k = 16, 24, 2048
    a64 = torch.randn(m, k, generator=gen, dtype=torch.float64)
    b64 = torch.randn(k, n, generator=gen, dtype=torch.float64)
    ref = a64 @ b64
    a, b = a64.float().cuda(), b64.float().cuda()
    errors = {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        c = torch.empty(m * n, device="cuda")
        ops._raw_gemm(c, a.reshape(-1), b.reshape(-1), m, n, k, k, n, n, False, False, 0.0)
        errors[tf32] = (max_err(c.view(m, n).cpu(), ref), max_err((a @ b).cpu(), ref))
    torch.backends.cuda.matmul.allow_tf32 = False
    (ours_fp32, torch_fp32), (ours_tf32, torch_tf32) = errors[False], errors[True]
    assert ours_fp32 < 1e-3 and torch_fp32 < 1e-3, errors
    # TF32 where torch.matmul uses it (a GPU without TF32 leaves both at the fp32 error)
    assert (ours_tf32 > 10 * ours_fp32) == (torch_tf32 > 10 * torch_fp32), errors


@pytest.fixture
def reduction_settings():
    """torch's cuBLAS reduction settings, restored after the test; skipped where this torch
    has no split-K option (before 2.10)."""
    get_bf16 = getattr(torch._C, "_get_cublas_allow_bf16_reduced_precision_reduction", None)
    get_fp16 = getattr(torch._C, "_get_cublas_allow_fp16_reduced_precision_reduction", None)
    if get_bf16 is None or not isinstance(get_bf16(), tuple):
        pytest.skip("this torch has no split-K reduction option")
    accumulation = getattr(torch._C, "_get_cublas_allow_fp16_accumulation", None)
    saved = (get_bf16(), get_fp16(), accumulation() if accumulation else None)
    yield
    torch._C._set_cublas_allow_bf16_reduced_precision_reduction(*saved[0])
    torch._C._set_cublas_allow_fp16_reduced_precision_reduction(*saved[1])
    if accumulation:
        torch._C._set_cublas_allow_fp16_accumulation(saved[2])


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=_name)
def test_half_gemms_follow_the_reduction_settings(reduction_settings, dtype):
    """bf16 / fp16: cuBLAS with reduced-precision reductions allowed or not; the settings only
    ATen's own GEMM implements (split-K disallowed, fp16 accumulation) route the steps' GEMMs
    through ATen. The results stay within tolerance either way."""
    like = torch.zeros(1, device="cuda", dtype=dtype)
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    setter = getattr(torch._C, f"_set_cublas_allow_{name}_reduced_precision_reduction")
    args = make_layer_args("lstm", "packed_reverse")
    for allow, split_k in ((True, True), (False, True)):
        setter(allow, split_k)
        assert ops._gemm_backend(like) == "cublas"
        check_layer("lstm", dtype, args)
    setter(False, False)
    assert ops._gemm_backend(like).startswith("aten: ")
    setter(True, True)
    if dtype == torch.float16 and hasattr(torch._C, "_set_cublas_allow_fp16_accumulation"):
        torch._C._set_cublas_allow_fp16_accumulation(True)
        assert ops._gemm_backend(like) == "aten: allow_fp16_accumulation"


@pytest.mark.parametrize("cell,proj", [(c, 0) for c in CELLS] + [(c, 5) for c in LSTM_FAMILY])
def test_layer_cuda_inference_matches_training(cell, proj):
    """need_workspace=False: the input projection is one GEMM into a scratch buffer of all rows
    (not the workspace); outputs and states as the training forward's."""
    args = op_args(cell, "packed_reverse")
    if proj:
        leaves, batch_sizes, reverse, _ = make_layer_args(
            cell, "packed_reverse", T=4, B=3, I=5, H=6, proj=proj
        )
        t = {k: v.to("cuda", torch.float32) for k, v in leaves.items()}
        args = (
            t["input"],
            t["weight_ih"],
            t["weight_hh"],
            t["bias_ih"],
            t["bias_hh"],
            t.get("weight_ch"),
            t["weight_hr"],
            t["hx"],
            t["cx"],
            batch_sizes,
            reverse,
        )
    op = getattr(ops, f"{cell}_forward")
    with torch.no_grad():
        train = op(*args, True)
        infer = op(*args, False)
    assert infer[-1].numel() == 0
    for a, b in zip(train[:-1], infer[:-1]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_env_sends_step_gemms_through_aten():
    """FUSEDRNN_CUDA_GEMM=aten (read once per process, hence a child process): the steps'
    GEMMs through ATen, with the same results."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import torch, fusedrnn, test_cuda as t\n"
        "assert torch.ops.fusedrnn._gemm_backend(torch.zeros(1, device='cuda')) == "
        "'aten: FUSEDRNN_CUDA_GEMM=aten'\n"
        "torch.backends.cuda.matmul.allow_tf32 = False\n"
        "for cell in t.CELLS:\n"
        "    t.check_layer(cell, torch.float32, t.make_layer_args(cell, 'packed_reverse'))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FUSEDRNN_CUDA_GEMM="aten")
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cell", ["lstm", "peephole_lstm", "gru", "lstm-proj"])
def test_zoneout_cuda_matches_reference(cell, dtype, mode):
    """The CUDA kernels' zoneout (the zoneout_c / zoneout_h weights of the ops of the plain and
    peephole LSTM, the GRU and the projected LSTM, whose h_t the zone kernel zones after the
    projection, design.md §1.7) against the fp64 reference equations on the CPU given the same
    weights: packed input whose row count changes, forward output, states and every gradient."""
    from fusedrnn import _ops
    from fusedrnn.reference import LayerArgs

    cell, P = ("lstm", 5) if cell == "lstm-proj" else (cell, 0)
    torch.manual_seed(0)
    sizes = [6, 6, 4, 3, 1]
    bs = torch.tensor(sizes)
    N, H, I = sum(sizes), 37, 9
    x64 = torch.randn(N, I, dtype=torch.float64)
    lstm = cell != "gru"
    G = (4 if lstm else 3) * H
    w64 = [torch.randn(G, I), torch.randn(G, P or H), torch.randn(G), torch.randn(G)]
    if cell == "peephole_lstm":
        w64.append(torch.randn(3, H))  # weight_ch: w_ci, w_cf, w_co
    if P:
        w64.append(torch.randn(P, H))  # weight_hr
    w64 = [(w * 0.4).double() for w in w64]
    h64 = torch.randn(6, P or H, dtype=torch.float64)
    c64 = torch.randn(6, H, dtype=torch.float64) if lstm else None
    widths = [H, P or H] if lstm else [H]
    if mode == "train":
        zones = [(torch.rand(N, w) < 0.3 + 0.2 * k).double() for k, w in enumerate(widths)]
    else:
        zones = [
            torch.full((1, w), 0.25 + 0.3 * k, dtype=torch.float64) for k, w in enumerate(widths)
        ]

    def run(dev, dt, equations):
        leaf = lambda t: None if t is None else t.detach().to(dev, dt).requires_grad_()  # noqa: E731
        x, h, c = leaf(x64), leaf(h64), leaf(c64)
        ws = [leaf(w) for w in w64]
        w_ch = ws[4] if cell == "peephole_lstm" else None
        w_hr = ws[4] if P else None
        a = LayerArgs(x, *ws[:4], w_ch, w_hr, h, c, bs, False)
        z = [t.to(dev, dt) for t in zones]
        zone = (z[0], z[1]) if lstm else (None, z[0])
        if equations:
            outs = reference.layer_of(cell, a, keep=zone)
        else:
            outs = _ops.forward(cell, a, zone=zone)
        outs = [o for o in outs if o is not None]
        torch.manual_seed(1)
        loss = sum((o * torch.randn(o.shape, dtype=torch.float64).to(o)).sum() for o in outs)
        loss.backward()
        res = {f"out{k}": o.detach() for k, o in enumerate(outs)}
        res.update({"x": x.grad, "h": h.grad, **{f"w{k}": w.grad for k, w in enumerate(ws)}})
        if c is not None:
            res["c"] = c.grad
        return {k: v.double().cpu() for k, v in res.items()}

    ref = run("cpu", torch.float64, True)
    got = run("cuda", dtype, False)
    lowp = run("cpu", dtype, True) if dtype in HALF_TYPES else None
    assert_matches(got, ref, dtype, lowp)


# ---------------------------------------------------------------------------------------------
# the layer-normalised cells' CUDA kernels (csrc/kernels/cuda/layer_norm.cu: a thread block per
# row, the row sums as block reductions)

LN_GATES = {"lstm": 4, "gru": 3}
LN_CASES = {
    # (T, B, batch_sizes, I, H, proj, reverse, hx, bias): one warp's columns; a row wider than
    # the block (1200 columns, not a multiple of 32: every thread several columns, the last
    # warp part-filled); packed rows changing in both directions; a projection; no bias/state
    "narrow": (5, 3, None, 4, 6, 0, False, True, True),
    "wide": (4, 5, None, 7, 300, 0, False, True, True),
    "packed_rev": (5, None, [6, 6, 4, 3, 1], 9, 37, 0, True, True, True),
    "proj": (5, 3, None, 4, 33, 5, False, True, True),
    "plain": (3, 2, None, 4, 20, 0, False, False, False),
}
LN_MATCH_CASES = list(LN_CASES)
# gradcheck's: few elements, as it evaluates the layer twice per element of every argument
LN_CASES["packed_small"] = (5, None, [3, 3, 2, 1, 1], 4, 6, 0, True, True, True)
LN_CASES["proj_small"] = (4, 2, None, 3, 6, 3, False, True, True)


def _ln_case(cell, case, seed=0):
    """(LayerArgs, ln) of one layer in fp64 on the CPU, O(1) values and LayerNorm gains around 1
    and shifts around 0 (not the initial 1 / 0, so that a gradient that ignored them fails)."""
    from fusedrnn.reference import LayerArgs

    T, B, sizes, I, H, proj, reverse, states, bias = LN_CASES[case]
    proj = proj if cell == "lstm" else 0
    gen = torch.Generator().manual_seed(seed)
    G, Hh = LN_GATES[cell] * H, proj or H

    def r(*shape, scale=0.5, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

    bs = torch.tensor(sizes) if sizes is not None else None
    x = r(sum(sizes), I, scale=1.0) if sizes is not None else r(T, B, I, scale=1.0)
    Bn = sizes[0] if sizes is not None else B
    hx = r(Bn, Hh, scale=1.0) if states else None
    cx = r(Bn, H, scale=1.0) if states and cell == "lstm" else None
    b_ih, b_hh = (r(G), r(G)) if bias else (None, None)
    w_hr = r(proj, H) if proj else None
    a = LayerArgs(x, r(G, I), r(G, Hh), b_ih, b_hh, None, w_hr, hx, cx, bs, reverse)
    ln = (r(G, scale=0.3, shift=1.0), r(G, scale=0.3, shift=1.0))
    if cell == "lstm":
        ln += (r(H, scale=0.3, shift=1.0), r(H, scale=0.3))
    return a, ln


def _ln_results(cell, a, ln, device, dtype, equations, keep=None):
    """Outputs and gradients (fp64, CPU) of the fused layer (`_layer_norm.run`) or of the
    reference equations, on `device` in `dtype`, under a fixed random functional of the outputs."""
    from fusedrnn import _layer_norm
    from fusedrnn.reference import LayerArgs

    def leaf(t):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t  # batch_sizes stays on the CPU
        return t.detach().to(device, dtype).requires_grad_()

    a = LayerArgs(*(leaf(t) for t in a))
    ln = tuple(leaf(t) for t in ln)
    if keep is not None:
        keep = tuple(k.to(device) if isinstance(k, torch.Tensor) else k for k in keep)
    fn = reference.layer_of if equations else _layer_norm.run
    outs = [o for o in fn(cell, a, ln, keep) if o is not None]
    gen = torch.Generator().manual_seed(1)
    loss = sum(
        (o.double().cpu() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
        for o in outs
    )
    inputs = [t for t in (*a.tensors, *ln) if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(loss, inputs)
    res = [o.detach() for o in outs] + list(grads)
    return {f"result {k}": t.double().cpu() for k, t in enumerate(res)}


def test_layer_norm_runs_the_cuda_kernels():
    """The layer-normalised ops have CUDA kernels, and the modules' calls on CUDA take them (not
    the reference equations)."""
    from fusedrnn import _layer_norm

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward"):
        assert has(f"fusedrnn::layer_norm_{op}", "CUDA"), op
    assert "cuda" in _layer_norm._DEVICES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LN_MATCH_CASES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_norm_cuda_matches_reference(cell, case, dtype):
    """The fused LayerNorm LSTM / GRU on CUDA, forward and every gradient, against the fp64
    reference equations on the CPU under the tolerance rule (design.md §4). The half types:
    within twice the error of the fused CPU op in that dtype (the same algorithm, its math in
    fp32; tests/test_layer_norm.py holds it to the rule). Their errors are those of rounding
    the states, products and gradients to 8 or 11 bits, which the two devices share but the
    reference equations run in that dtype round elsewhere (in fp16 the fused op's gradient of
    hx was 3x the reference's on one draw of these cases): a wrong reduction, column or row of
    the kernel would be off by far more."""
    if case == "proj" and cell == "gru":
        pytest.skip("proj_size is the LSTM's")
    a, ln = _ln_case(cell, case)
    ref = _ln_results(cell, a, ln, "cpu", torch.float64, True)
    got = _ln_results(cell, a, ln, "cuda", dtype, False)
    lowp = _ln_results(cell, a, ln, "cpu", dtype, False) if dtype in HALF_TYPES else None
    assert_matches(got, ref, dtype, lowp)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm-proj"])
def test_layer_norm_zoneout_cuda_matches_reference(cell, dtype, mode):
    """Zoneout in the layer-normalised CUDA kernels (design.md §1.7): masks (train) or the
    rates (eval), packed rows changing from step to step (projected: padded, h_t zoned after
    the projection by the zone kernel), against the fp64 reference."""
    cell, case = ("lstm", "proj") if cell == "lstm-proj" else (cell, "packed_rev")
    a, ln = _ln_case(cell, case)
    N = a.input.shape[0] * (a.input.shape[1] if a.batch_sizes is None else 1)
    H, H_out = a.weight_ih.shape[0] // LN_GATES[cell], a.weight_hh.shape[1]
    torch.manual_seed(0)
    if mode == "train":
        keep = (torch.rand(N, H) < 0.3, torch.rand(N, H_out) < 0.5)
    else:
        keep = (0.3, 0.5)
    keep = keep if cell == "lstm" else (None, keep[1])
    ref = _ln_results(cell, a, ln, "cpu", torch.float64, True, keep)
    got = _ln_results(cell, a, ln, "cuda", dtype, False, keep)
    # bf16: the fused CPU op's error as the bound's base (test_layer_norm_cuda_matches_reference)
    lowp = _ln_results(cell, a, ln, "cpu", dtype, False, keep) if dtype in HALF_TYPES else None
    assert_matches(got, ref, dtype, lowp)


def _on_cuda(t, dtype=None):
    """A floating-point tensor moved to CUDA (in `dtype`), a leaf that requires a gradient;
    anything else (None, batch_sizes) as it is."""
    if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
        return t
    return t.detach().to("cuda", dtype).requires_grad_()


@pytest.mark.parametrize("case", ["narrow", "packed_small", "proj_small"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_norm_gradcheck_cuda_fp64(cell, case):
    """fp64 gradcheck of the fused layer-normalised layer on CUDA (the analytic backward) with
    respect to every tensor argument."""
    from fusedrnn import _layer_norm
    from fusedrnn.reference import LayerArgs

    if case == "proj_small" and cell == "gru":
        pytest.skip("proj_size is the LSTM's")
    a, ln = _ln_case(cell, case)
    a = LayerArgs(*(_on_cuda(t) for t in a))
    ln = tuple(_on_cuda(t) for t in ln)
    slots = [k for k, t in enumerate(a) if isinstance(t, torch.Tensor) and t.is_floating_point()]

    def f(*ts):
        fields = list(a)
        for k, t in zip(slots, ts):
            fields[k] = t
        outs = _layer_norm.run(cell, LayerArgs(*fields), tuple(ts[len(slots) :]))
        return tuple(o for o in outs if o is not None)

    inputs = [a[k] for k in slots] + list(ln)
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_norm_opcheck_cuda(cell):
    """torch.library.opcheck of the CUDA forward op (schema, fake kernel, autograd)."""
    from fusedrnn import _layer_norm
    from fusedrnn.reference import LayerArgs

    a, ln = _ln_case(cell, "proj")
    a = LayerArgs(*(_on_cuda(t, torch.float32) for t in a))
    ln = tuple(_on_cuda(t, torch.float32) for t in ln)
    op = getattr(torch.ops.fusedrnn, f"layer_norm_{cell}_forward")
    torch.library.opcheck(op, (*_layer_norm._op_args(cell, a, ln), True))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_norm_modules_on_cuda(cell):
    """LayerNormLSTM / LayerNormGRU moved to CUDA give the CPU module's outputs and gradients
    (two layers, bidirectional, batch_first), and launch without a host synchronisation."""
    torch.manual_seed(0)
    cls = fusedrnn.LayerNormLSTM if cell == "lstm" else fusedrnn.LayerNormGRU
    m = cls(7, 40, num_layers=2, bidirectional=True, batch_first=True).double()
    mc = copy.deepcopy(m).cuda()
    x = torch.randn(3, 6, 7, dtype=torch.float64, requires_grad=True)
    xc = x.detach().cuda().requires_grad_()
    y = m(x)[0]
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yc = mc(xc)[0]
        gc = torch.autograd.grad(yc, [xc, *mc.parameters()], torch.ones_like(yc))
    finally:
        torch.cuda.set_sync_debug_mode(old)
    g = torch.autograd.grad(y, [x, *m.parameters()], torch.ones_like(y))
    torch.testing.assert_close(yc.cpu(), y, rtol=1e-9, atol=1e-9)  # fp64: rounding only
    for a, b in zip(gc, g):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-9)
