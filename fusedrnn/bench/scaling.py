"""How each implementation's time changes from the run with the fewest threads to each run with
more (``scaling.txt`` / ``scaling.json`` of a run with several ``--threads`` counts).

A row's scaling is the median time at the fewest threads / the median time at more (2.0: twice
as fast); "fused / nn" is fused's scaling over torch.nn's (>= 1: the fused layer gains at least
as much from the added cores as torch.nn does).
"""

from typing import List, Optional, Sequence

from .cases import IMPLS

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


def format_scaling(report: dict) -> str:
    rows = report["rows"]
    if not rows:
        return ""
    head = ["cell", "shape TxBxIxH", "pass", "threads"]
    head += [SHORT[i] for i in IMPLS] + ["fused / nn"]
    table: List[List[str]] = []
    for r in rows:
        table.append(
            [r["label"], r["shape_str"], r["pass"], f"{r['threads_from']} -> {r['threads_to']}"]
            + [f"{r['scaling'][i]:.2f}x" if i in r["scaling"] else "-" for i in IMPLS]
            + ["-" if r["fused_over_torch"] is None else f"{r['fused_over_torch']:.2f}"]
        )
    widths = [max(len(x[k]) for x in table + [head]) for k in range(len(head))]

    def fmt(row):
        return "  ".join(
            v.ljust(w) if k < 3 else v.rjust(w) for k, (v, w) in enumerate(zip(row, widths))
        ).rstrip()

    lines = [
        "thread scaling (time at the fewest threads / time at more; fused / nn >= 1: fused "
        "gains at least as much as torch.nn)",
        fmt(head),
        fmt(["-" * w for w in widths]),
    ]
    lines += [fmt(r) for r in table]
    return "\n".join(lines)
