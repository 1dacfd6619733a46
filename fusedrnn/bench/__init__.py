"""Benchmarks of the fused layers against torch.nn, the eager PyTorch loop and torch.compile.

Run ``python -m fusedrnn.bench --help`` for the options and
``python -m fusedrnn.bench.plot results.json [other.json]`` to re-render a plot. The protocol is
the one of design.md §5; ``bench/README.md`` explains the output.
"""
from .core import (CELLS, FASTRNNS_SHAPE, IMPL_LABELS, IMPLS, PASSES, Case, environment,
                   grid_shapes, quick_shape, run_suite)

__all__ = ["CELLS", "FASTRNNS_SHAPE", "IMPL_LABELS", "IMPLS", "PASSES", "Case", "environment",
           "grid_shapes", "quick_shape", "run_suite", "main"]


def main(argv=None) -> int:
    """Command-line entry (see ``python -m fusedrnn.bench --help``)."""
    from .cli import main as _main
    return _main(argv)
