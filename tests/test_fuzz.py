"""Property test: random module configurations against torch.nn / the reference.

Each example draws a cell, num_layers, bidirectional, batch_first, bias, proj_size (LSTM
family), padded or packed input with random unsorted lengths, dtype, sizes 1-9, an initial state
or none, and a non-contiguous view of the input. It compares outputs, final states and the
gradients of the input, the initial state and every parameter with torch.nn.LSTM / GRU (LSTM,
GRU) or a module built from fusedrnn.reference.layer (peephole, working memory), both run in
fp64 on the same values. Deterministic (derandomize) and bounded; a failure prints the example
and a @reproduce_failure blob.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_modules import RefRNN
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from fusedrnn import cells, modules
from fusedrnn.testing import backward_random_functional, flatten_result, input_state_param_grads

F64 = torch.float64
F32 = torch.float32
FUSED_OF = modules.SEQUENCE_MODULES


def _has_c(cell):
    """An LSTM-family cell: state (h, c), and a projection (proj_size) is possible."""
    return cells.CELLS[cell].has_cell_state


# Tolerances of the fused module against the fp64 reference (design.md §4), absolute and relative.
TOLS = {
    # fp64: the fused path and the reference evaluate the same expressions in another summation
    # order (one GEMM over all steps, the bias folded in); each result differs by a few ulps
    # (~1e-16), which at most 2 layers x 9 steps x 2 directions of recurrence with O(1) weights
    # amplify by far less than 1e6.
    F64: 1e-10,
    # fp32: the fused module runs in fp32 (eps 1.2e-7) and is compared with the fp64 reference on
    # the same (exactly upcast) values. Every quantity is O(1) (torch's init +-1/sqrt(H), gates
    # bounded by sigmoid/tanh, inputs ~N(0,1)), every dot product has at most ~20 terms, and the
    # recurrence is at most 9 steps deep, so the accumulated rounding stays well below 1e-5 both
    # absolutely (values near 0) and relatively.
    F32: 1e-5,
}


@st.composite
def configs(draw):
    cell = draw(st.sampled_from(list(cells.CELLS)))
    H = draw(st.integers(1, 9))
    proj = 0
    if _has_c(cell) and H > 1:
        proj = draw(st.integers(0, H - 1))
    lengths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=5))
    return dict(
        cell=cell,
        I=draw(st.integers(1, 9)),
        H=H,
        proj=proj,
        num_layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        packed=draw(st.booleans()),
        lengths=lengths,
        dtype=draw(st.sampled_from([F64, F32])),
        with_state=draw(st.booleans()),
        # how the input tensor is a non-contiguous view of a larger buffer
        layout=draw(st.sampled_from(["strided_features", "transposed", "offset_rows"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _view(base_shape, layout, dtype, gen):
    """(leaf buffer, non-contiguous view of shape base_shape into it)."""
    if layout == "strided_features":  # every other feature column
        buf = torch.randn(*base_shape[:-1], 2 * base_shape[-1], generator=gen, dtype=F64)
        make = lambda b: b[..., ::2]  # noqa: E731
    elif layout == "transposed":  # the first two dims swapped in memory
        shape = (base_shape[1], base_shape[0]) + tuple(base_shape[2:])
        buf = torch.randn(*shape, generator=gen, dtype=F64)
        make = lambda b: b.transpose(0, 1)  # noqa: E731
    else:  # rows taken from the middle of a taller buffer, with a feature-column offset
        shape = (base_shape[0] + 2,) + tuple(base_shape[1:-1]) + (base_shape[-1] + 1,)
        buf = torch.randn(*shape, generator=gen, dtype=F64)
        make = lambda b: b[1:-1, ..., 1:]  # noqa: E731
    return buf.to(dtype), make


def _run(module, buf, make, cfg, packing, state, gen_seed):
    """Forward on a fresh leaf copy of `buf` (and of the state); backward of a fixed random
    linear functional of every output. Returns (results, gradients by name)."""
    leaf = buf.detach().clone().requires_grad_()
    view = make(leaf)
    inp = PackedSequence(view, *packing) if packing is not None else view
    st_leaves = []
    hx = None
    if state is not None:
        st_leaves = [s.detach().clone().requires_grad_() for s in state]
        hx = tuple(st_leaves) if _has_c(cfg["cell"]) else st_leaves[0]
    module.zero_grad(set_to_none=True)
    res = module(inp, hx) if hx is not None else module(inp)
    tensors = flatten_result(res)
    backward_random_functional(tensors, gen_seed)
    return tensors, input_state_param_grads(module, leaf, st_leaves)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cfg=configs())
def test_fused_modules_match_reference(cfg):
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    cell, I, H, dtype = cfg["cell"], cfg["I"], cfg["H"], cfg["dtype"]
    kw = dict(
        num_layers=cfg["num_layers"],
        bidirectional=cfg["bidirectional"],
        batch_first=cfg["batch_first"],
        bias=cfg["bias"],
    )
    if _has_c(cell):
        kw["proj_size"] = cfg["proj"]
    fused = FUSED_OF[cell](I, H, dtype=dtype, **kw)
    # the reference: torch.nn in fp64 for LSTM / GRU (state_dict loaded, fp32 values upcast
    # exactly), a module from fusedrnn.reference.layer otherwise
    if cells.CELLS[cell].in_torch_nn:
        ref = (nn.LSTM if _has_c(cell) else nn.GRU)(I, H, dtype=F64, **kw)
        ref.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    else:
        ref = RefRNN(cell, fused).double()

    lengths = cfg["lengths"]
    Bn, T = len(lengths), max(lengths)
    D = 2 if cfg["bidirectional"] else 1
    if cfg["packed"]:
        # pack once to get the layout; the data handed to the modules is then a
        # non-contiguous view holding the same values
        padded = torch.zeros(T, Bn, I, dtype=F64)
        packed = pack_padded_sequence(padded, torch.tensor(lengths), enforce_sorted=False)
        packing = (packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        base_shape = (packed.data.shape[0], I)
    else:
        packing = None
        base_shape = (Bn, T, I) if cfg["batch_first"] else (T, Bn, I)
    buf, make = _view(base_shape, cfg["layout"], dtype, gen)
    state = None
    if cfg["with_state"]:
        Hout = cfg["proj"] or H
        state = [torch.randn(cfg["num_layers"] * D, Bn, Hout, generator=gen, dtype=F64).to(dtype)]
        if _has_c(cell):
            state.append(
                torch.randn(cfg["num_layers"] * D, Bn, H, generator=gen, dtype=F64).to(dtype)
            )

    got, g_got = _run(fused, buf, make, cfg, packing, state, cfg["seed"] + 1)
    exp, g_exp = _run(
        ref,
        buf.double(),
        make,
        cfg,
        packing,
        None if state is None else [s.double() for s in state],
        cfg["seed"] + 1,
    )

    tol = TOLS[dtype]
    assert len(got) == len(exp)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert a.dtype == dtype
        torch.testing.assert_close(
            a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"result {i}: {m}"
        )
    assert g_got.keys() == g_exp.keys()
    for k in g_exp:
        assert g_got[k] is not None and g_exp[k] is not None, f"gradient of {k} missing"
        torch.testing.assert_close(
            g_got[k].double(), g_exp[k], atol=tol, rtol=tol, msg=lambda m: f"gradient of {k}: {m}"
        )
