"""What the benchmark measures: the cells and their per-cell facts, the implementations and
passes, the shapes, the cases of a run and the settings it runs with.

A case is one cell at one shape with the passes and implementations to measure; `build_cases`
makes the suite's cases (every cell at every shape, plus the stacked LSTM rows). This module is
the bench's one home of per-cell facts: the cell names, their gate counts (the modules' table),
and for each cell its fusedrnn module, its torch.nn module (LSTM and GRU only) and its reference
step function.
"""

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fusedrnn import cells as _cells
from fusedrnn import modules as _modules
from fusedrnn import reference as _reference

# The per-cell facts come from the cell table (fusedrnn/cells.py); torch.nn has LSTM and GRU only.
CELLS = tuple(_cells.CELLS)
GATES = {name: c.gates for name, c in _cells.CELLS.items()}  # gate blocks per cell; throughput
FUSED_MODULES = dict(_modules.SEQUENCE_MODULES)
LAYER_NORM_MODULES = dict(_modules.LAYER_NORM_MODULES)  # the layer-normalised ones, by family
TORCH_MODULES = {
    name: nn.LSTM if c.has_cell_state else nn.GRU
    for name, c in _cells.CELLS.items()
    if c.in_torch_nn
}
STEP_FUNCTIONS = dict(_reference.STEPS)
LAYER_NORM_STEP_FUNCTIONS = dict(_reference.LAYER_NORM_STEPS)
# FLOPs per row of the cell-connection GEMM beside the gates' (throughput): the full weight_ch
WEIGHT_CH_GEMM = {name: c.weight_ch == "full" for name, c in _cells.CELLS.items()}

IMPLS = ("fused", "torch", "eager", "compiled")
BASELINES = IMPLS[1:]
IMPL_LABELS = {
    "fused": "fused",
    "torch": "torch.nn",
    "eager": "eager loop",
    "compiled": "compiled step loop",
}
SLOW_IMPLS = ("eager", "compiled")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
FASTRNNS_SHAPE = (100, 64, 512, 512)
QUICK_SHAPE_CPU = (100, 64, 256, 256)
STACK_LAYERS = 3
DROPCONNECT = 0.5  # the rate of the "lstm dropconnect" row
ZONEOUT = 0.1  # the rate of the "lstm zoneout" row (both states; Tacotron 2's)
WARMUP = {"cpu": 1, "cuda": 3}  # warm-up runs of fused and torch.nn

Shape = Tuple[int, int, int, int]


def quick_shape(device_type: str) -> Shape:
    """The default shape: (100, 64, 256, 256) on a CPU, the fastrnns shape on a GPU."""
    return QUICK_SHAPE_CPU if device_type == "cpu" else FASTRNNS_SHAPE


def grid_shapes() -> List[Shape]:
    """bench/README.md: T in {50, 200}, B in {1, 16, 64, 256}, H in {128, ..., 1024}, I = H."""
    return [
        (T, B, H, H) for T in (50, 200) for B in (1, 16, 64, 256) for H in (128, 256, 512, 1024)
    ]


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def slow_repeats(repeats: int) -> int:
    """Timed runs of the slow baselines (eager and compiled loops): a third, at least 3."""
    return max(min(3, repeats), repeats // 3)


@dataclass(frozen=True)
class Case:
    """One cell at one shape, with the passes and implementations to measure."""

    cell: str
    shape: Shape
    passes: Tuple[str, ...] = PASSES
    impls: Tuple[str, ...] = IMPLS
    layers: int = 1
    bidirectional: bool = False
    # whether the input requires grad; None: as the settings say (--input-grad)
    input_grad: Optional[bool] = None
    # DropConnect rate of the recurrent weight (training rows only; torch.nn and the eager loop
    # drop the same weight with torch's dropout, as a weight-drop wrapper does)
    dropconnect: float = 0.0
    # the layer-normalised cell of the family (LayerNormLSTM / GRU): fused against the eager
    # loop (torch.nn.functional.layer_norm per step) and the compiled step loop
    layer_norm: bool = False
    # zoneout rate of both states (training rows only: fused against the eager loop, which zones
    # with masks drawn the same way; torch.nn has no zoneout)
    zoneout: float = 0.0

    @property
    def label(self) -> str:
        label = ("layer-norm " if self.layer_norm else "") + self.cell
        if self.layers > 1 or self.bidirectional:
            label += f" {self.layers}-layer" + (" bidir" if self.bidirectional else "")
        if self.input_grad:
            label += " +dx"
        if self.dropconnect:
            label += " dropconnect"
        if self.zoneout:
            label += " zoneout"
        return label

    def needs_input_grad(self, settings: "Settings") -> bool:
        return settings.input_grad if self.input_grad is None else self.input_grad


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    repeats: int = 10
    warmup: int = 1
    compile: bool = True
    compile_backend: str = "inductor"
    memory: bool = True
    input_grad: bool = False
    seed: int = 0

    @property
    def slow_repeats(self) -> int:
        return slow_repeats(self.repeats)

    def counts(self, impl: str) -> Tuple[int, int]:
        """(warm-up runs, timed runs) of an implementation; the eager and compiled loops get one
        warm-up run (for the compiled loop it is the one that compiles)."""
        if impl in SLOW_IMPLS:
            return 1, self.slow_repeats
        return self.warmup, self.repeats


def build_cases(
    cells: Iterable[str], shapes: Iterable[Shape], stacked: bool = True, input_grad: bool = False
) -> List[Case]:
    """Every cell at every shape (fwd and fwd+bwd, all applicable implementations), plus, when
    LSTM is asked, the 3-layer bidirectional LSTM (fused vs torch.nn, fwd+bwd) at every shape
    and beside it the single layer with an input that requires grad ("+dx"): the layers of a
    stack above the first must compute the input gradient, which the first layer of a model (and
    the single-layer rows) skip, so this is the single layer to compare the stack with. With
    `input_grad` (--input-grad) every row computes it and the "+dx" row is left out. Last, when
    LSTM is asked, its training pass with DropConnect ("lstm dropconnect", fwd+bwd: in eval
    there is no mask) against torch.nn's LSTM and the eager loop on the same dropped weight, and
    with zoneout ("lstm zoneout", fwd+bwd) against the eager loop; and the layer-normalised
    LSTM / GRU of the families asked ("layer-norm lstm", fwd and fwd+bwd) against their eager
    loop and compiled step loop (torch.nn has no such layer)."""
    cells = list(cells)
    cases = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        for cell in cells:
            impls = tuple(i for i in IMPLS if i != "torch" or cell in TORCH_MODULES)
            cases.append(Case(cell, shape, PASSES, impls))
        if stacked and "lstm" in cells:
            # Half the sequence length: the stacked row is the slowest of the suite (6 layer
            # directions), and what it shows, the speed-up over torch.nn, does not depend on T.
            stacked_shape = (max(1, shape[0] // 2),) + shape[1:]
            if not input_grad:
                cases.append(
                    Case("lstm", stacked_shape, ("fwd+bwd",), ("fused", "torch"), input_grad=True)
                )
            cases.append(
                Case("lstm", stacked_shape, ("fwd+bwd",), ("fused", "torch"), STACK_LAYERS, True)
            )
        if "lstm" in cells:
            # DropConnect's cost: the LSTM row's training pass with dropconnect=0.5, against
            # torch.nn's LSTM and the eager loop with the same dropped weight
            cases.append(
                Case(
                    "lstm",
                    shape,
                    ("fwd+bwd",),
                    ("fused", "torch", "eager"),
                    dropconnect=DROPCONNECT,
                )
            )
            # zoneout's cost: the LSTM row's training pass with zoneout=0.1 on both states
            cases.append(Case("lstm", shape, ("fwd+bwd",), ("fused", "eager"), zoneout=ZONEOUT))
        for cell in ("lstm", "gru"):
            if cell in cells:
                cases.append(Case(cell, shape, PASSES, ("fused", "eager", "compiled"),
                                  layer_norm=True))  # fmt: skip
    return cases


def memory_impls(case: Case) -> Tuple[str, ...]:
    """Implementations whose training-step peak memory is measured: fused and its main baseline
    (torch.nn where it has the cell, else the eager loop); the compiled step loop is left out,
    its memory is the eager loop's plus compiled buffers, and measuring it costs time."""
    return tuple(i for i in case.impls if i != "compiled")


def count_tasks(cases: Iterable[Case], settings: Settings) -> int:
    """Progress-bar length: one task per (pass, implementation) and per memory measurement."""
    n = 0
    for case in cases:
        n += len(case.passes) * len(case.impls)
        if settings.memory and "fwd+bwd" in case.passes:
            n += len(memory_impls(case))
    return n
