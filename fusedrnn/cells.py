"""The cells fusedrnn runs, described once on the Python side.

One `Cell` per cell: its op family name, gate blocks, the shape of its cell-connection weight
`weight_ch`, whether it has a cell state, the columns of the workspace its training forward
keeps, its reference step and its module classes. The modules, the fake kernels of the ops,
the reference layer, the benchmark and the tests read this table; the C++ side has the same
facts in csrc/cells/traits.h, and tests/test_cells.py checks the two against each other.
Adding a cell: csrc/cells/README.md.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

__all__ = ["Cell", "CELLS", "LSTM_FAMILY", "get"]


@dataclass(frozen=True)
class Cell:
    name: str             # the ops fusedrnn::<name>_forward / <name>_backward
    gates: int            # gate blocks of weight_ih / weight_hh rows (gates * hidden_size)
    weight_ch: Optional[str]  # None, "diagonal" (3, H) peepholes or "full" (3H, H) matrices
    has_cell_state: bool  # an LSTM-family cell: states (h, c), the ops take cx / return cy
    two_phase: bool       # the fused step runs in two phases around a GEMM of c_t
    workspace_cols: int   # the training workspace holds, per input row, workspace_cols * H
    proj_cols: int        # ... plus proj_cols * H with a projection (proj_size > 0)
    module: str           # the sequence module in fusedrnn.modules
    cell_module: str      # the one-step module in fusedrnn.modules

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

    @property
    def reference_step(self) -> Callable:
        """The step of fusedrnn.reference: lstm_cell, peephole_lstm_cell, ..."""
        from . import reference
        return getattr(reference, f"{self.name}_cell")

    @property
    def module_class(self) -> type:
        from . import modules
        return getattr(modules, self.module)

    @property
    def cell_module_class(self) -> type:
        from . import modules
        return getattr(modules, self.cell_module)


CELLS: Dict[str, Cell] = {c.name: c for c in (
    Cell("lstm", 4, None, True, False, 5, 1, "LSTM", "LSTMCell"),
    Cell("gru", 3, None, False, False, 4, 0, "GRU", "GRUCell"),
    Cell("peephole_lstm", 4, "diagonal", True, False, 5, 1, "PeepholeLSTM", "PeepholeLSTMCell"),
    Cell("wm_lstm", 4, "full", True, True, 8, 1, "WorkingMemoryLSTM", "WorkingMemoryLSTMCell"),
)}

LSTM_FAMILY: Tuple[str, ...] = tuple(name for name, c in CELLS.items() if c.has_cell_state)


def get(name: str) -> Cell:
    """The cell named `name`; ValueError naming the cells for an unknown name."""
    try:
        return CELLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"cell must be one of {tuple(CELLS)}, got {name!r}") from None
