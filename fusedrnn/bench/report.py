"""The printed table of a run (``table.txt``): one row per record, the median times, the
speed-ups of fused over each baseline and the peak memory, then one note per skip or error."""

import math
from typing import List, Optional, Sequence

from .cases import BASELINES, IMPL_LABELS, IMPLS


def _fmt_ms(entry: Optional[dict]) -> str:
    if entry is None:
        return "-"
    if entry.get("status") == "skipped":
        return "skip"
    if entry.get("status") != "ok":
        return "error"
    v = entry["median_ms"]
    return f"{v:.3f}" if v < 1 else (f"{v:.2f}" if v < 100 else f"{v:.1f}")


def _fmt_x(v: Optional[float]) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def _fmt_mb(rec: dict, impl: str) -> str:
    mem = rec.get("memory")
    if not mem or impl not in mem or mem[impl].get("peak_mb") is None:
        return "-"
    v = mem[impl]["peak_mb"]
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


SHORT_LABELS = {"fused": "fused", "torch": "nn", "eager": "eager", "compiled": "compiled"}
TABLE_COLUMNS = (
    ["cell", "shape TxBxIxH", "pass"]
    + [f"{SHORT_LABELS[i]} ms" for i in IMPLS]
    + [f"x {SHORT_LABELS[b]}" for b in BASELINES]
    + [f"MB {SHORT_LABELS[i]}" for i in IMPLS]
)


def table_rows(results: Sequence[dict]) -> List[List[str]]:
    rows = []
    for rec in results:
        impls = rec["impls"]
        rows.append(
            [rec["label"], rec["shape_str"], rec["pass"]]
            + [_fmt_ms(impls.get(i)) for i in IMPLS]
            + [_fmt_x(rec["speedup"].get(b)) for b in BASELINES]
            + [_fmt_mb(rec, i) for i in IMPLS]
        )
    return rows


def format_table(results: Sequence[dict]) -> str:
    rows = table_rows(results)
    widths = [
        max(len(str(r[k])) for r in rows + [TABLE_COLUMNS]) for k in range(len(TABLE_COLUMNS))
    ]
    left = 3  # text columns are left-aligned, numbers right-aligned

    def fmt(row):
        return "  ".join(
            str(v).ljust(w) if k < left else str(v).rjust(w)
            for k, (v, w) in enumerate(zip(row, widths))
        ).rstrip()

    lines = [fmt(TABLE_COLUMNS), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    notes = {}
    for rec in results:
        for impl, e in rec["impls"].items():
            if e.get("status") in ("skipped", "error"):
                notes.setdefault(
                    f"{IMPL_LABELS[impl]} {e['status']}: {e.get('reason')}", []
                ).append(rec["label"])
    for text, where in notes.items():
        cells = sorted(set(where), key=where.index)
        lines.append(f"note: {text} ({', '.join(cells)})")
    return "\n".join(lines)
