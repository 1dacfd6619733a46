"""The fused ops on CUDA tensors: outputs and gradients against the fp64 reference on the CPU
(design.md §4 tolerances), torch.nn parity of the modules, fp64 gradcheck, opcheck, CUDA graph
capture, torch.compile(fullgraph=True), stream and synchronisation behaviour (design.md §3).
Every test needs a CUDA GPU and is skipped, with that reason, without one."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import functional, reference

from fusedrnn.testing import (CELLS, HALF_TYPES, layer_results, make_layer_args, max_err,
                              run_layer, within_tolerance)

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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["time_major", "packed_reverse"])
@pytest.mark.parametrize("cell", ["lstm", "peephole_lstm", "wm_lstm"])
def test_layer_cuda_projection(cell, layout, dtype):
    check_layer(cell, dtype, make_layer_args(cell, layout, proj=5))


@pytest.mark.parametrize("cell", CELLS)
def test_layer_cuda_no_bias(cell):
    check_layer(cell, torch.float32, make_layer_args(cell, "packed_reverse", bias=False))


# fp64/fp32 only: the half types' rule compares two max errors, on one element a coin toss
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("cell", CELLS)
def test_layer_cuda_single_step_single_unit(cell, dtype):
    check_layer(cell, dtype, make_layer_args(cell, "time_major", T=1, B=1, I=2, H=1))


@pytest.mark.parametrize("cell", ["lstm", "gru", "wm_lstm"])
def test_layer_cuda_large_step(cell):
    """n*H = 1100*2048 elements per step: more than the kernels' capped grid has threads, so
    the grid-stride loop runs several iterations. fp64 against the reference on the GPU."""
    args = make_layer_args(cell, "time_major", T=2, B=1100, I=8, H=2048, seed=1)
    got = layer_results(functional.rnn_layer, cell, args, "cuda", torch.float64)
    ref = layer_results(reference.layer, cell, args, "cuda", torch.float64)
    assert_matches(got, ref, torch.float64)


# ---------------------------------------------------------------------------------------------
# modules against torch.nn

@pytest.mark.parametrize("config", ["lstm", "lstm_proj", "gru"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_module_cuda_matches_torch_nn(config, packed):
    torch.manual_seed(0)
    I, H, T, B = 6, 10, 7, 5
    kw = dict(num_layers=2, bidirectional=True, batch_first=True)
    if config == "gru":
        ref_mod, mod = nn.GRU(I, H, **kw), fusedrnn.GRU(I, H, **kw)
    else:
        proj = 4 if config == "lstm_proj" else 0
        ref_mod = nn.LSTM(I, H, proj_size=proj, **kw)
        mod = fusedrnn.LSTM(I, H, proj_size=proj, **kw)
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
        torch.testing.assert_close(p.grad.double().cpu(), ref_params[name].grad, rtol=1e-5,
                                   atol=1e-5, msg=lambda m: f"{name}: {m}")


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
            cell, a["input"], a["weight_ih"], a["weight_hh"], a.get("bias_ih"),
            a.get("bias_hh"), a.get("weight_ch"), a.get("weight_hr"), a["hx"], a.get("cx"),
            batch_sizes, reverse)
        return (out, hy) if cy is None else (out, hy, cy)

    assert torch.autograd.gradcheck(fn, inputs)


def cuda_leaves(cell, layout, dtype=torch.float32):
    """A small layer case on the GPU: its leaves (by argument name), batch_sizes, reverse."""
    leaves, batch_sizes, reverse, _ = make_layer_args(cell, layout, T=4, B=3, I=5, H=6)
    return ({k: v.to("cuda", dtype).requires_grad_() for k, v in leaves.items()}, batch_sizes,
            reverse)


def op_args(cell, layout, dtype=torch.float32):
    """The positional arguments of the forward op on a small case (see cuda_leaves)."""
    t, batch_sizes, reverse = cuda_leaves(cell, layout, dtype)
    if cell == "gru":
        return (t["input"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"],
                t["hx"], batch_sizes, reverse)
    return (t["input"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"],
            t.get("weight_ch"), None, t["hx"], t["cx"], batch_sizes, reverse)


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
        out = run_layer(functional.rnn_layer, cell, t["input"], t, t["hx"], t.get("cx"),
                        batch_sizes, reverse)[0]
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
        for t in leaves:
            t.copy_(torch.randn_like(t) * 0.3)
        gy.copy_(torch.randn_like(gy))
    graph.replay()
    eager = step()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        # equal up to cuBLAS's choice of algorithm on a capturing stream
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# inductor (the default backend) for one module; aot_eager, which traces the same graph with
# the same fake implementations and autograd but skips code generation, for the others
@pytest.mark.parametrize("cls,backend", [(fusedrnn.LSTM, "inductor"),
                                         (fusedrnn.GRU, "aot_eager"),
                                         (fusedrnn.PeepholeLSTM, "aot_eager"),
                                         (fusedrnn.WorkingMemoryLSTM, "aot_eager")],
                         ids=["LSTM-inductor", "GRU", "PeepholeLSTM", "WorkingMemoryLSTM"])
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
