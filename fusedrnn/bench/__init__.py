"""Benchmarks of the fused layers against torch.nn, the eager PyTorch loop and torch.compile.

Run ``python -m fusedrnn.bench --help`` for the options and
``python -m fusedrnn.bench.plot results.json [other.json]`` to re-render a plot.
``bench/README.md`` is the benchmark's document: what each group of rows measures, the protocol,
how to reproduce the results in ``bench/results/``, and the output.

The modules, one job each:

- ``cases``: what is measured: the cells and the bench's per-cell facts (gate counts, modules,
  step functions), the implementations and passes, the shapes, the cases of a run, its settings.
- ``env``: the environment record of a run and the TF32 switches.
- ``argparser``: the one-line-error argument parser of the two commands.
- ``impls``: the implementations of one case (fused, torch.nn, eager loop, compiled step loop)
  and their timed calls.
- ``measure``: timing, the peak memory of a training step, the records of a case.
- ``report``: the printed table (``table.txt``).
- ``throughput``: the GEMM rate of the machine and each fused row's rate against it.
- ``scaling``: the thread-scaling report of a run at several thread counts (``scaling.txt``), and
  its paired measurement (fused and torch.nn at every count in one loop).
- ``plot``: the speed-up plot (``speedups.png``) and ``python -m fusedrnn.bench.plot``.
- ``serving``: the serving group (``--serving``): cells in a Python loop and small-batch layer
  inference, with each row's weight-streaming bound, and its plot (``serving.png``).
- ``cli``: ``python -m fusedrnn.bench``: arguments, the run, ``results.json``.

Import graph: each module imports only modules listed above it, so there is no cycle
(tests/test_bench.py checks the code against these lines; ``__init__`` imports ``cli`` inside
``main`` only):

    argparser  ->
    cases      ->
    env        ->
    impls      -> cases
    measure    -> cases, impls
    report     -> cases
    throughput -> cases
    scaling    -> cases, impls
    plot       -> argparser, cases
    serving    -> throughput
    cli        -> argparser, cases, env, impls, measure, plot, report, scaling, serving, throughput
    __main__   -> cli
    __init__   -> cases, env, measure, cli
"""

from .cases import CELLS, FASTRNNS_SHAPE, IMPL_LABELS, IMPLS, PASSES, Case, grid_shapes, quick_shape
from .env import environment
from .measure import run_suite

__all__ = [
    "CELLS",
    "FASTRNNS_SHAPE",
    "IMPL_LABELS",
    "IMPLS",
    "PASSES",
    "Case",
    "environment",
    "grid_shapes",
    "quick_shape",
    "run_suite",
    "main",
]


def main(argv=None) -> int:
    """Command-line entry (see ``python -m fusedrnn.bench --help``)."""
    from .cli import main as _main

    return _main(argv)
