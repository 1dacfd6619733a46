"""The cells fusedrnn runs, described once on the Python side.

One `Cell` per cell: facts, no code. Its op family name, gate blocks, the shape of its
cell-connection weight `weight_ch`, whether it has a cell state, the columns of the workspace its
training forward keeps, and how it relates to torch.nn and ONNX. The modules, the fake kernels
of the ops, the reference layer, the ONNX export, the benchmark and the tests read this table
and branch on these facts, never on a cell's name; the C++ side has the same facts in
csrc/cells/traits.h, and tests/test_cells.py checks the two against each other. This module
imports nothing of the package: the modules (fusedrnn.modules.SEQUENCE_MODULES / CELL_MODULES)
and the reference steps (fusedrnn.reference.STEPS) are keyed by the names here.
Adding a cell: docs/adding_a_cell.md.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["Cell", "CELLS", "LSTM_FAMILY", "get"]


@dataclass(frozen=True)
class Cell:
    name: str  # the ops fusedrnn::<name>_forward / <name>_backward
    gates: int  # gate blocks of weight_ih / weight_hh rows (gates * hidden_size)
    weight_ch: Optional[str]  # None, "diagonal" (3, H) peepholes or "full" (3H, H) matrices
    has_cell_state: bool  # an LSTM-family cell: states (h, c), the ops take cx / return cy
    two_phase: bool  # the fused step runs in two phases around a GEMM of c_t
    workspace_cols: int  # the training workspace holds, per input row, workspace_cols * H
    proj_cols: int  # ... plus proj_cols * H with a projection (proj_size > 0)
    in_torch_nn: bool  # exactly torch.nn's LSTM / GRU: torch.nn is a second reference
    onnx: Optional[str]  # the ONNX operator that expresses it ("LSTM", "GRU"), else None:
    # exported as its reference equations

    def weight_ch_shape(self, hidden_size: int) -> Optional[Tuple[int, int]]:
        """The shape of weight_ch for this hidden size; None when the cell has none."""
        if self.weight_ch == "diagonal":
            return (3, hidden_size)
        if self.weight_ch == "full":
            return (3 * hidden_size, hidden_size)
        return None

    def workspace_row(self, hidden_size: int, proj: bool):
        """Values per input row of the training workspace (csrc/cells/traits.h's formula)."""
        return hidden_size * (self.workspace_cols + (self.proj_cols if proj else 0))


CELLS: Dict[str, Cell] = {
    c.name: c
    for c in (
        Cell("lstm", 4, None, True, False, 5, 1, True, "LSTM"),
        Cell("gru", 3, None, False, False, 4, 0, True, "GRU"),
        Cell("peephole_lstm", 4, "diagonal", True, False, 5, 1, False, "LSTM"),
        Cell("wm_lstm", 4, "full", True, True, 8, 1, False, None),
    )
}

LSTM_FAMILY: Tuple[str, ...] = tuple(name for name, c in CELLS.items() if c.has_cell_state)


def get(name: str) -> Cell:
    """The cell named `name`; ValueError naming the cells for an unknown name."""
    try:
        return CELLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"cell must be one of {tuple(CELLS)}, got {name!r}") from None
