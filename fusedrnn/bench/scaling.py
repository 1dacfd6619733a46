"""How each implementation's time changes from the run with the fewest threads to each run with
more (``scaling.txt`` / ``scaling.json`` of a run with several ``--threads`` counts).

A row's scaling is the median time at the fewest threads / the median time at more (2.0: twice
as fast); "fused / nn" is fused's scaling over torch.nn's (>= 1: the fused layer gains at least
as much from the added cores as torch.nn does).

The suite runs once per thread count, minutes apart, so on a shared machine each pass carries
what the neighbours did meanwhile. The paired measurement (``paired``) times fused and torch.nn
at every thread count in turn in one loop, so that the load of the moment weighs on every
count alike: its ratios are the ones to judge a layer's scaling by.
"""

import gc
import time
from typing import List, Optional, Sequence

import torch

from .cases import IMPLS, Case, Settings, shape_str
from .impls import Workload

PAIRED_IMPLS = ("fused", "torch")

SHORT = {"fused": "fused", "torch": "nn", "eager": "eager", "compiled": "compiled"}


def _ok_ms(rec: dict, impl: str) -> Optional[float]:
    entry = rec["impls"].get(impl)
    if not entry or entry.get("status") != "ok":
        return None
    return entry["median_ms"]


def scaling(docs: Sequence[dict]) -> dict:
    """docs: the result documents of one command, one per thread count, fewest threads first."""
    base = docs[0]
    index = {(r["label"], r["shape_str"], r["pass"]): r for r in base["results"]}
    rows = []
    for doc in docs[1:]:
        for rec in doc["results"]:
            before = index.get((rec["label"], rec["shape_str"], rec["pass"]))
            if before is None:
                continue
            ratios = {}
            for impl in IMPLS:
                t0, t1 = _ok_ms(before, impl), _ok_ms(rec, impl)
                if t0 is not None and t1 is not None and t1 > 0:
                    ratios[impl] = t0 / t1
            vs = ratios["fused"] / ratios["torch"] if {"fused", "torch"} <= set(ratios) else None
            rows.append(
                {
                    "label": rec["label"],
                    "shape_str": rec["shape_str"],
                    "pass": rec["pass"],
                    "threads_from": base["settings"]["threads"],
                    "threads_to": doc["settings"]["threads"],
                    "scaling": ratios,
                    "fused_over_torch": vs,
                }
            )
    return {
        "format": "fusedrnn-bench-scaling/1",
        "definition": "scaling = median time at threads_from / median time at threads_to; "
        "fused_over_torch = fused's scaling / torch.nn's (>= 1: fused gains at least as much)",
        "threads": [d["settings"]["threads"] for d in docs],
        "rows": rows,
    }


def _format(title: str, rows: Sequence[dict], impls: Sequence[str]) -> str:
    """The table of scaling rows: one column per implementation in `impls`, then fused / nn."""
    if not rows:
        return ""
    head = ["cell", "shape TxBxIxH", "pass", "threads"]
    head += [SHORT[i] for i in impls] + ["fused / nn"]
    table: List[List[str]] = []
    for r in rows:
        table.append(
            [r["label"], r["shape_str"], r["pass"], f"{r['threads_from']} -> {r['threads_to']}"]
            + [f"{r['scaling'][i]:.2f}x" if i in r["scaling"] else "-" for i in impls]
            + ["-" if r["fused_over_torch"] is None else f"{r['fused_over_torch']:.2f}"]
        )
    widths = [max(len(x[k]) for x in table + [head]) for k in range(len(head))]

    def fmt(row):
        return "  ".join(
            v.ljust(w) if k < 3 else v.rjust(w) for k, (v, w) in enumerate(zip(row, widths))
        ).rstrip()

    lines = [title, fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in table]
    return "\n".join(lines)


def format_scaling(report: dict) -> str:
    return _format(
        "thread scaling (time at the fewest threads / time at more; fused / nn >= 1: fused "
        "gains at least as much as torch.nn)",
        report["rows"],
        IMPLS,
    )


def paired_rounds(repeats: int) -> int:
    """Rounds of the paired measurement: half the suite's repeats, at least 3."""
    return max(3, repeats // 2)


def paired(cases: Sequence[Case], settings: Settings, counts: Sequence[int], progress=None) -> dict:
    """Fused and torch.nn of every case that has both, each pass, timed at every thread count
    in one loop: a warm-up round, then `paired_rounds` rounds, each two calls at each
    (implementation, count), the second timed (the first after a switch of the thread count
    finds the other cores' caches cold, as no call of a run at one count does), the counts'
    order reversed every other round.
    Medians per (implementation, count); scaling as in ``scaling``. Restores torch's thread
    count."""
    counts = list(counts)
    rounds = paired_rounds(settings.repeats)
    before = torch.get_num_threads()
    rows = []
    try:
        for case in cases:
            if not set(PAIRED_IMPLS) <= set(case.impls):
                continue
            work = Workload(case, settings)
            for pass_ in case.passes:
                if progress is not None:
                    progress(f"{case.label} {shape_str(case.shape)} {pass_}")
                calls = {impl: work.calls(impl, pass_) for impl in PAIRED_IMPLS}
                times = {(impl, n): [] for impl in PAIRED_IMPLS for n in counts}
                for r in range(rounds + 1):  # round 0: the warm-up
                    order = counts if r % 2 == 0 else counts[::-1]
                    gc.collect()
                    for impl in PAIRED_IMPLS:
                        prepare, call = calls[impl]
                        for n in order:
                            torch.set_num_threads(n)
                            # an untimed call after the switch: the timed one then finds the
                            # caches of the cores it runs on as a run at one count would
                            prepare()
                            call()
                            prepare()
                            t0 = time.perf_counter()
                            call()
                            if r > 0:
                                times[(impl, n)].append((time.perf_counter() - t0) * 1e3)
                work.clear_grads()
                med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
                for n in counts[1:]:
                    ratios = {i: med[(i, counts[0])] / med[(i, n)] for i in PAIRED_IMPLS}
                    rows.append(
                        {
                            "label": case.label,
                            "shape_str": shape_str(case.shape),
                            "pass": pass_,
                            "threads_from": counts[0],
                            "threads_to": n,
                            "median_ms": {
                                i: {str(c): med[(i, c)] for c in (counts[0], n)}
                                for i in PAIRED_IMPLS
                            },
                            "scaling": ratios,
                            "fused_over_torch": ratios["fused"] / ratios["torch"],
                        }
                    )
            del work
    finally:
        torch.set_num_threads(before)
    return {
        "definition": "fused and torch.nn at every thread count timed in one loop "
        f"({rounds} rounds after a warm-up round, each two calls at each implementation and "
        "count, the second timed; counts' order reversed every other round); "
        "scaling = median at threads_from / median at threads_to",
        "rounds": rounds,
        "rows": rows,
    }


def format_paired(report: dict) -> str:
    return _format(
        f"paired thread scaling (fused and torch.nn at each count timed in turn in one loop, "
        f"{report['rounds']} rounds: robust to a shared machine's changing load)",
        report["rows"],
        PAIRED_IMPLS,
    )
