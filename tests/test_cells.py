"""The cell table of the Python side (fusedrnn/cells.py) against the C++ one (csrc/cells/traits.h),
and the facts the rest of the package takes from it: a cell described twice must not drift."""
import pytest
import torch

import fusedrnn
from fusedrnn import cells, reference

WEIGHT_CH_KIND = {None: 0, "diagonal": 1, "full": 2}  # traits.h's WeightCh values


@pytest.mark.parametrize("name", list(cells.CELLS))
def test_python_table_matches_the_cpp_traits(name):
    c = cells.CELLS[name]
    got = torch.ops.fusedrnn._cell_traits(name)
    assert got == [c.gates, WEIGHT_CH_KIND[c.weight_ch], int(c.has_cell_state),
                   int(c.two_phase), c.workspace_cols, c.proj_cols]


def test_every_cpp_cell_is_in_the_table_and_has_its_ops():
    with pytest.raises(RuntimeError, match="no cell named 'rnn_tanh'"):
        torch.ops.fusedrnn._cell_traits("rnn_tanh")
    for name in cells.CELLS:
        assert hasattr(torch.ops.fusedrnn, f"{name}_forward")
        assert hasattr(torch.ops.fusedrnn, f"{name}_backward")
    assert cells.LSTM_FAMILY == ("lstm", "peephole_lstm", "wm_lstm")
    assert reference.CELLS == tuple(cells.CELLS)


def test_unknown_cell_is_a_value_error_naming_the_cells():
    with pytest.raises(ValueError, match=r"cell must be one of \('lstm', 'gru'"):
        cells.get("LSTM")
    with pytest.raises(ValueError, match="cell must be one of"):
        reference.layer("rnn", torch.zeros(1, 1, 2), torch.zeros(4, 2), torch.zeros(4, 1))


@pytest.mark.parametrize("name", list(cells.CELLS))
@pytest.mark.parametrize("proj", [0, 2])
def test_workspace_of_a_training_forward_has_the_table_size(name, proj):
    """The fake kernels size the workspace with Cell.workspace_row; the C++ driver with
    traits.h's workspace_row: the real op's workspace must have exactly that many values."""
    c = cells.CELLS[name]
    if proj and not c.has_cell_state:
        pytest.skip("only the LSTM family has a projection")
    T, B, I, H = 3, 2, 5, 4
    x = torch.randn(T, B, I, dtype=torch.float64)
    w_ih = torch.randn(c.gates * H, I, dtype=torch.float64)
    w_hh = torch.randn(c.gates * H, proj or H, dtype=torch.float64)
    if name == "gru":
        ws = torch.ops.fusedrnn.gru_forward(x, w_ih, w_hh, None, None, None, None, False, True)[2]
    else:
        w_ch = (torch.randn(c.weight_ch_shape(H), dtype=torch.float64)
                if c.weight_ch is not None else None)
        w_hr = torch.randn(proj, H, dtype=torch.float64) if proj else None
        ws = getattr(torch.ops.fusedrnn, f"{name}_forward")(
            x, w_ih, w_hh, None, None, w_ch, w_hr, None, None, None, False, True)[3]
    assert ws.numel() == T * B * c.workspace_row(H, bool(proj))


@pytest.mark.parametrize("name", list(cells.CELLS))
def test_modules_take_their_shapes_from_the_table(name):
    c = cells.CELLS[name]
    H = 6
    seq = c.module_class(3, H)
    step = c.cell_module_class(3, H)
    for m, sfx in ((seq, "_l0"), (step, "")):
        assert getattr(m, "weight_ih" + sfx).shape == (c.gates * H, 3)
        w_ch = getattr(m, "weight_ch" + sfx, None)
        assert (None if w_ch is None else tuple(w_ch.shape)) == c.weight_ch_shape(H)
    assert c.reference_step is getattr(reference, f"{name}_cell")
    assert getattr(fusedrnn, c.module) is c.module_class
