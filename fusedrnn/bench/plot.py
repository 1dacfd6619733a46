"""Plot of the speed-ups of a benchmark run, or of two runs side by side.

    python -m fusedrnn.bench.plot results.json [other.json] [--out PATH]

One column per result file, one row per pass (fwd, fwd+bwd); in each panel one group of bars per
case (cell and shape) with the speed-up of the fused layer over each baseline (baseline median /
fused median, log scale, 1 = parity). The PNG goes next to the first file (speedups.png for one
file, speedups_compare.png for two) unless --out names a .png file or a folder.
"""

import json
import os
import sys
from typing import List, Optional, Sequence

from .argparser import Parser
from .cases import BASELINES, IMPL_LABELS, PASSES

COLORS = {"torch": "#4c72b0", "eager": "#dd8452", "compiled": "#55a868"}


def load(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise ValueError("not a fusedrnn benchmark result (no 'results' list)")
    return doc


def _title(doc: dict, name: Optional[str]) -> str:
    env, st = doc.get("env", {}), doc.get("settings", {})
    parts = [
        env.get("device_name") or env.get("device") or "?",
        st.get("dtype") or env.get("dtype") or "?",
    ]
    if (st.get("device") or env.get("device")) == "cpu":
        threads = st.get("threads", env.get("threads"))
        parts.append(f"{threads} thread" + ("" if threads == 1 else "s"))
    rev = env.get("git_revision")
    if rev:
        parts.append(rev[:8] + ("+" if env.get("git_dirty") else ""))
    title = ", ".join(str(p) for p in parts)
    return f"{name}: {title}" if name else title


def _draw_panel(ax, recs: List[dict], baselines: Sequence[str], one_shape: bool) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    n = len(recs)
    width = 0.8 / max(1, len(baselines))
    values = []
    for k, b in enumerate(baselines):
        xs, ys = [], []
        for i, rec in enumerate(recs):
            v = rec.get("speedup", {}).get(b)
            if v is not None and v > 0:
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(v)
        values += ys
        if xs:
            # bars grow from parity (1x): up when fused is faster, down when it is slower
            bars = ax.bar(
                xs,
                [y - 1.0 for y in ys],
                bottom=1.0,
                width=width,
                color=COLORS.get(b),
                label=IMPL_LABELS.get(b, b),
            )
            if n <= 12:
                for bar, v in zip(bars, ys):
                    up = v >= 1.0
                    ax.annotate(
                        f"{v:.2f}",
                        (bar.get_x() + bar.get_width() / 2, v),
                        ha="center",
                        va="bottom" if up else "top",
                        fontsize=7,
                        xytext=(0, 1 if up else -1),
                        textcoords="offset points",
                    )
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    if values:
        lo, hi = min(min(values), 1.0), max(max(values), 1.0)
        ax.set_ylim(lo / 1.3, hi * 1.4)
    else:
        ax.text(
            0.5,
            0.5,
            "no speed-ups (fused or baselines missing)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xticks(range(n))
    labels = [
        r.get("label", r.get("cell", "?"))
        if one_shape
        else f"{r.get('label', r.get('cell', '?'))}\n{r.get('shape_str', '')}"
        for r in recs
    ]
    ax.set_xticklabels(labels, rotation=90 if n > 10 else 0, fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.grid(axis="y", which="major", alpha=0.3)


def plot_results(docs: Sequence[dict], out_path: str, names: Optional[Sequence[str]] = None) -> str:
    """Draws one column per result document and one row per pass; returns out_path."""
    from matplotlib.figure import Figure

    if not 1 <= len(docs) <= 2:
        raise ValueError(f"plot one or two result files, got {len(docs)}")
    names = list(names) if names else [None] * len(docs)
    passes = [p for p in PASSES if any(r.get("pass") == p for d in docs for r in d["results"])]
    passes = passes or list(PASSES)
    baselines = [
        b for b in BASELINES if any(b in r.get("speedup", {}) for d in docs for r in d["results"])
    ]
    baselines = baselines or list(BASELINES)
    most = max(
        1, max(len([r for r in d["results"] if r.get("pass") == p]) for d in docs for p in passes)
    )
    panel_w = min(40.0, max(6.0, 0.9 + most * (0.25 + 0.22 * len(baselines))))
    rotated = most > 10
    panel_h = 4.6 if rotated else 3.8
    fig = Figure(figsize=(panel_w * len(docs), panel_h * len(passes)), layout="constrained")
    axes = fig.subplots(len(passes), len(docs), squeeze=False, sharey="row")
    for col, (doc, name) in enumerate(zip(docs, names)):
        shapes = {r.get("shape_str") for r in doc["results"]}
        one_shape = len(shapes) == 1
        for row, pass_ in enumerate(passes):
            ax = axes[row][col]
            recs = [r for r in doc["results"] if r.get("pass") == pass_]
            _draw_panel(ax, recs, baselines, one_shape)
            shape_note = f" at {next(iter(shapes))}" if one_shape and shapes != {None} else ""
            ax.set_title(f"{_title(doc, name)}\n{pass_}{shape_note}", fontsize=9)
            if col == 0:
                ax.set_ylabel("speed-up of fused")
            if row == 0 and col == len(docs) - 1:
                ax.legend(fontsize=8, loc="best")
    fig.suptitle(
        "fusedrnn speed-up: baseline median / fused median (> 1: fused faster)", fontsize=10
    )
    fig.savefig(out_path, dpi=110)
    return out_path


def _name(path: str) -> str:
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent or os.path.basename(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = Parser(
        prog="python -m fusedrnn.bench.plot",
        description="Re-render the speed-up plot from one or two "
        "results.json files (two: side by side, e.g. CPU vs GPU or "
        "before vs after).",
    )
    p.add_argument(
        "files",
        nargs="+",
        metavar="results.json",
        help="one or two result files written by python -m fusedrnn.bench",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="a .png file or a folder (default: next to the first file, "
        "speedups.png for one file, speedups_compare.png for two)",
    )
    args = p.parse_args(argv)
    if len(args.files) > 2:
        p.error(f"expected one or two result files, got {len(args.files)}")
    docs = []
    for path in args.files:
        try:
            docs.append(load(path))
        except (OSError, ValueError) as exc:
            p.error(f"cannot read {path}: {exc}")
    default = "speedups.png" if len(docs) == 1 else "speedups_compare.png"
    if args.out is None:
        out = os.path.join(os.path.dirname(os.path.abspath(args.files[0])), default)
    elif args.out.lower().endswith(".png"):
        out = args.out
    else:
        out = os.path.join(args.out, default)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    names = [_name(f) for f in args.files] if len(docs) == 2 else None
    try:
        plot_results(docs, out, names)
    except ImportError as exc:  # matplotlib is optional (pip install .[bench])
        p.exit(
            1,
            f"{p.prog}: error: cannot plot without matplotlib ({exc}); the result files "
            "hold every number\n",
        )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
