"""The cell table of the Python side (fusedrnn/cells.py) against the C++ one (csrc/cells/traits.h),
and the facts the rest of the package takes from it: a cell described twice must not drift."""

import ast
import pathlib

import pytest
import torch

import fusedrnn
from fusedrnn import cells, modules, reference

WEIGHT_CH_KIND = {None: 0, "diagonal": 1, "full": 2}  # traits.h's WeightCh values


@pytest.mark.parametrize("name", list(cells.CELLS))
def test_python_table_matches_the_cpp_traits(name):
    c = cells.CELLS[name]
    got = torch.ops.fusedrnn._cell_traits(name)
    assert got == [
        c.gates,
        WEIGHT_CH_KIND[c.weight_ch],
        int(c.has_cell_state),
        int(c.two_phase),
        c.workspace_cols,
        c.proj_cols,
    ]


def test_every_cpp_cell_is_in_the_table_and_has_its_ops():
    with pytest.raises(RuntimeError, match="no cell named 'rnn_tanh'"):
        torch.ops.fusedrnn._cell_traits("rnn_tanh")
    for name in cells.CELLS:
        assert hasattr(torch.ops.fusedrnn, f"{name}_forward")
        assert hasattr(torch.ops.fusedrnn, f"{name}_backward")
    assert cells.LSTM_FAMILY == tuple(n for n, c in cells.CELLS.items() if c.has_cell_state)
    assert all(cells.CELLS[n].has_cell_state for n in cells.LSTM_FAMILY)
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
    op = getattr(torch.ops.fusedrnn, f"{name}_forward")
    if not c.has_cell_state:
        ws = op(x, w_ih, w_hh, None, None, None, None, False, True)[2]
    else:
        w_ch = (
            torch.randn(c.weight_ch_shape(H), dtype=torch.float64)
            if c.weight_ch is not None
            else None
        )
        w_hr = torch.randn(proj, H, dtype=torch.float64) if proj else None
        ws = op(x, w_ih, w_hh, None, None, w_ch, w_hr, None, None, None, False, True)[3]
    assert ws.numel() == T * B * c.workspace_row(H, bool(proj))


@pytest.mark.parametrize("name", list(cells.CELLS))
def test_modules_take_their_shapes_from_the_table(name):
    c = cells.CELLS[name]
    H = 6
    seq = modules.SEQUENCE_MODULES[name](3, H)
    step = modules.CELL_MODULES[name](3, H)
    for m, sfx in ((seq, "_l0"), (step, "")):
        assert getattr(m, "weight_ih" + sfx).shape == (c.gates * H, 3)
        w_ch = getattr(m, "weight_ch" + sfx, None)
        assert (None if w_ch is None else tuple(w_ch.shape)) == c.weight_ch_shape(H)


@pytest.mark.parametrize("name", list(cells.CELLS))
def test_every_cell_has_its_modules_and_reference_step(name):
    """The module tables and the reference steps are keyed by the cell table's names: each
    cell has a sequence module and a one-step module running it, exported from fusedrnn."""
    for table in (modules.SEQUENCE_MODULES, modules.CELL_MODULES):
        cls = table[name]
        assert cls._cell == name
        assert getattr(fusedrnn, cls.__name__) is cls
        assert cls.__name__ in fusedrnn.__all__
    assert modules.SEQUENCE_MODULES[name] is not modules.CELL_MODULES[name]
    assert reference.STEPS[name] is getattr(reference, f"{name}_cell")


def test_module_and_step_tables_hold_exactly_the_cells():
    assert set(modules.SEQUENCE_MODULES) == set(cells.CELLS)
    assert set(modules.CELL_MODULES) == set(cells.CELLS)
    assert set(reference.STEPS) == set(cells.CELLS)


def test_the_cell_table_imports_nothing_of_the_package():
    """fusedrnn/cells.py is the bottom of the package: the modules, ops and reference read it,
    so it must not import them."""
    tree = ast.parse(pathlib.Path(cells.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in cells.py: line {node.lineno}"
            assert (node.module or "").split(".")[0] != "fusedrnn", (
                f"cells.py imports {node.module}: line {node.lineno}"
            )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] != "fusedrnn", (
                    f"cells.py imports {alias.name}: line {node.lineno}"
                )
