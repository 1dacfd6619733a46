"""Command line of ``python -m fusedrnn.bench``."""

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch

import fusedrnn

from . import measure, plot, scaling, serving, throughput
from .argparser import Parser
from .cases import (
    CELLS,
    DTYPES,
    FASTRNNS_SHAPE,
    WARMUP,
    Settings,
    Shape,
    build_cases,
    count_tasks,
    grid_shapes,
    quick_shape,
)
from .env import TF32_NOTE, environment, tf32, tf32_state
from .impls import COMPILE_MODE, COMPILE_NOTE
from .measure import MEMORY_METHOD
from .report import format_table

DESCRIPTION = """\
Times the fused layers of fusedrnn against torch.nn.LSTM/GRU (cuDNN on a GPU, oneDNN on a CPU),
the eager PyTorch loop of the same cell (fusedrnn.reference.layer) and torch.compile of that
cell's step function called in a Python loop ("compiled step loop"), forward (no grad) and
forward+backward, plus the peak memory of a training step. Without shape options it runs the
quick suite: all four cells at T,B,I,H = 100,64,256,256 on a CPU (100,64,512,512 on a GPU), a
3-layer bidirectional LSTM row and, to compare it with, a single LSTM layer whose input requires
grad ("lstm +dx": the stack's upper layers compute the input gradient, which the single-layer rows
skip). Writes results.json, table.txt and speedups.png to --out; results.json is rewritten after
every case, so a run stopped by SIGTERM, SIGINT or a kill keeps what it measured."""

EPILOG = """\
examples:
  python -m fusedrnn.bench                               quick suite on the best device
  python -m fusedrnn.bench --cells lstm,gru --fastrnns   the fastrnns shape
  python -m fusedrnn.bench --shapes "50,16,128,128;200,64,512,512" --no-compile
  python -m fusedrnn.bench --grid --device cuda --dtype float16
  python -m fusedrnn.bench --device cuda --fastrnns --tf32   TF32 on for cuDNN and cuBLAS
  python -m fusedrnn.bench.plot results.json [other.json]   re-render the plot"""


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
        return value

    parse.__name__ = name
    return parse


def all_cores() -> int:
    """The cores this process may run on (its CPU affinity; os.cpu_count() where that is not
    known): the thread count of "all" in --threads."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_threads(text: str) -> List[int]:
    """'N[,N...]' with positive integers or "all" (every core this process may use): the thread
    counts to run the suite at, ascending, without repeats."""
    counts = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            counts.append(all_cores())
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be positive integers or 'all', comma-separated, got {text!r}"
            )
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"must be positive integers or 'all', comma-separated, got {value}"
            )
        counts.append(value)
    return sorted(set(counts))


def parse_cells(text: str) -> List[str]:
    """Comma-separated cell names (or "all"), in the given order, without repeats."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of cells, got {text!r}")
    if names == ["all"]:
        return list(CELLS)
    out = []
    for name in names:
        if name not in CELLS:
            raise argparse.ArgumentTypeError(
                f"unknown cell {name!r} (choose from {', '.join(CELLS)})"
            )
        if name not in out:
            out.append(name)
    return out


def parse_shapes(text: str) -> List[Shape]:
    """'T,B,I,H[;T,B,I,H...]': four positive integers per shape."""
    shapes = []
    parts = [p.strip() for p in text.split(";")]
    if not any(parts):
        raise argparse.ArgumentTypeError(f"expected T,B,I,H[;T,B,I,H...], got {text!r}")
    for part in parts:
        if not part:
            continue
        fields = [f.strip() for f in part.split(",")]
        try:
            values = tuple(int(f) for f in fields)
        except ValueError:
            values = ()
        if len(values) != 4 or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"expected T,B,I,H with four positive integers, got {part!r}"
            )
        shapes.append(values)
    return shapes


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m fusedrnn.bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to run: cuda when available with auto (default: auto)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="parameter and input dtype (default: float32; float16 is GPU only)",
    )
    p.add_argument(
        "--cells",
        type=parse_cells,
        default=list(CELLS),
        metavar="LIST",
        help="comma-separated cells out of " + ",".join(CELLS) + " or 'all' (default: all)",
    )
    shapes = p.add_mutually_exclusive_group()
    shapes.add_argument(
        "--shapes",
        type=parse_shapes,
        metavar="T,B,I,H[;T,B,I,H...]",
        help="explicit shapes: sequence length, batch, input size, hidden size; "
        "separate several with ';' (quote them in a shell)",
    )
    shapes.add_argument(
        "--grid",
        action="store_true",
        help="the full grid: T in {50,200} x B in {1,16,64,256} x "
        "H in {128,256,512,1024}, I = H (32 shapes; long)",
    )
    shapes.add_argument(
        "--fastrnns",
        action="store_true",
        help="the PyTorch fastrnns shape T,B,I,H = 100,64,512,512",
    )
    shapes.add_argument(
        "--serving",
        action="store_true",
        help="instead of the layer suite, the serving group (CPU, float32): "
        "each cell in a 100-step Python loop at batch 1 and 32, and LSTM / GRU "
        "inference at T=200 with batch 1 and 8, with each row's "
        "weight-streaming bound (bench/README.md)",
    )
    shapes.add_argument(
        "--serving-grid",
        action="store_true",
        help="the serving group with the cells at batch 1..64 and serving.png, "
        "the fused / baseline ratio against the batch size",
    )
    p.add_argument(
        "--threads",
        type=parse_threads,
        default=None,
        metavar="N[,N...]",
        help="run the suite at each thread count (torch.set_num_threads), 'all' = every core "
        "this process may use; with several, a folder per count and the scaling report "
        "(default on a CPU: 1,all; the serving group: 1; on a GPU: torch's setting)",
    )
    p.add_argument(
        "--repeats",
        type=_positive("repeats"),
        default=10,
        metavar="N",
        help="timed runs of fused and torch.nn, median reported (default: 10); the "
        "slow eager and compiled loops get max(min(3, N), N // 3)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default: ./fusedrnn_bench/<device>-<timestamp>)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile baseline (compiling takes tens of seconds)",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        metavar="NAME",
        help="torch.compile backend of the compiled step loop (default: inductor)",
    )
    p.add_argument(
        "--input-grad",
        action="store_true",
        help="make the input require grad in fwd+bwd (default: off, as for the "
        "first layer of a model)",
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory measurement of the training step",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="allow TF32 in float32 matrix products on both sides, cuDNN "
        "(torch.backends.cudnn.allow_tf32) and cuBLAS "
        "(torch.backends.cuda.matmul.allow_tf32); default: both off, recorded in "
        "results.json (torch's own defaults, cuDNN on and cuBLAS off, would favour "
        "torch.nn)",
    )
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (torch.cuda.is_available() is False)")
    if args.device == "cpu" and args.dtype == "float16":
        parser.error(
            "--dtype float16 is not supported on the CPU (fusedrnn's CPU kernels run "
            "float32, float64 and bfloat16)"
        )
    if (args.serving or args.serving_grid) and (args.device != "cpu" or args.dtype != "float32"):
        parser.error(
            "--serving / --serving-grid: the serving group runs on the CPU in float32 "
            f"(got --device {args.device} --dtype {args.dtype})"
        )
    if (args.serving or args.serving_grid) and args.threads and len(args.threads) > 1:
        parser.error(
            "--serving / --serving-grid: the serving group runs at one thread count "
            f"(got --threads {','.join(map(str, args.threads))})"
        )
    if args.grid:
        args.shape_list, args.shape_preset = grid_shapes(), "grid"
    elif args.fastrnns:
        args.shape_list, args.shape_preset = [FASTRNNS_SHAPE], "fastrnns"
    elif args.shapes:
        args.shape_list, args.shape_preset = args.shapes, "shapes"
    else:
        args.shape_list, args.shape_preset = [quick_shape(args.device)], "quick"
    return args


def _default_out(device: str) -> str:
    base = os.path.join("fusedrnn_bench", f"{device}-{time.strftime('%Y%m%d-%H%M%S')}")
    out, k = base, 1
    while os.path.exists(out):
        k += 1
        out = f"{base}-{k}"
    return out


def command_line(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "-m", "fusedrnn.bench", *argv])


class _LineProgress:
    """The progress display when tqdm is not installed: one line per measurement on stderr."""

    def __init__(self, total: int, file):
        self.total, self.done, self.file, self.desc = total, 0, file, ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.done += n
        print(f"[{self.done}/{self.total}] {self.desc}", file=self.file, flush=True)


def _progress(total: int, file):
    """A tqdm bar on a terminal; one line per measurement in a log (a bar's carriage returns
    make a log unreadable) and where tqdm (optional: pip install .[bench]) is missing."""
    try:
        if not file.isatty():
            return _LineProgress(total, file)
        from tqdm import tqdm
    except (ImportError, AttributeError, ValueError):
        return _LineProgress(total, file)
    return tqdm(
        total=total, unit="run", file=file, dynamic_ncols=True, mininterval=0.5, leave=False
    )


class _Stop(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM, so that a run stopped by `timeout` or a job
    scheduler ends like one stopped with Ctrl-C: it keeps what it measured."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interruption(exc: KeyboardInterrupt) -> Tuple[str, int]:
    """The reason ("SIGTERM", "SIGINT") and exit status (128 + the signal) of an interruption."""
    if isinstance(exc, _Stop):
        return str(exc), 128 + exc.signum
    return "SIGINT", 128 + signal.SIGINT


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM raises _Stop for the duration of the block (main thread only; elsewhere, and
    where the signal cannot be caught, the block runs with the handler unchanged)."""

    def handler(signum, frame):
        raise _Stop(signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGTERM
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _write_json(path: str, doc: dict) -> None:
    """Writes through a temporary file and a rename, so that a reader (or a kill in the
    middle) never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def thread_counts(args: argparse.Namespace, device: torch.device) -> List[Optional[int]]:
    """The thread counts of the run: --threads, or by default one thread and every core on a
    CPU (the serving group: one thread) and torch's setting (None) on a GPU."""
    if args.threads:
        return list(args.threads)
    if device.type != "cpu":
        return [None]
    if args.serving or args.serving_grid:
        return [1]
    return sorted({1, all_cores()})


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    counts = thread_counts(args, device)
    err = sys.stderr
    if (
        device.type == "cpu"
        and max(c or 1 for c in counts) > 1
        and os.environ.get("OMP_WAIT_POLICY") is None
    ):
        print(
            "note: more than one thread with OpenMP's default wait policy (what torch users get "
            "by default; the run records it). OMP_WAIT_POLICY=PASSIVE, set before Python "
            "starts, measures the other policy; which is faster depends on the machine "
            "(bench/README.md, protocol, threads)",
            file=err,
        )
    info = fusedrnn.build_info()
    if fusedrnn.backend() != "fused":
        print(
            f"warning: fusedrnn runs its reference fallback ({info.get('load_error')}); the "
            "'fused' numbers are not the fused kernels",
            file=err,
        )
    elif not info.get(device.type):
        print(
            f"warning: this fusedrnn build has no {device.type} kernels; the fused runs will fail",
            file=err,
        )
    out_dir = args.out or _default_out(device.type)
    with tf32(args.tf32), _stop_on_sigterm():
        if args.serving or args.serving_grid:
            _set_threads(counts[0])
            return _run_serving(args, argv, device, torch.get_num_threads(), err, out_dir)
        codes, docs = [], []
        for n in counts:
            _set_threads(n)
            sub = out_dir if len(counts) == 1 else os.path.join(out_dir, f"threads-{n}")
            code, doc = _run(args, argv, device, torch.get_num_threads(), err, sub)
            codes.append(code)
            docs.append(doc)
            if doc["interrupted"]:  # stopped by a signal: no further thread count
                return code
        if len(docs) > 1:
            paired = None
            stopped = 0
            if device.type == "cpu":
                used = [d["settings"]["threads"] for d in docs]
                try:
                    paired = _paired_scaling(args, device, used, err)
                except KeyboardInterrupt as exc:  # the suites are complete: keep their scaling
                    reason, stopped = _interruption(exc)
                    print(
                        f"interrupted ({reason}) during the paired thread scaling: the suites' "
                        "results and scaling kept, no paired table",
                        file=err,
                    )
            _write_scaling(docs, out_dir, err, paired)
            if stopped:
                return stopped
        return next((c for c in codes if c), 0)


def _paired_scaling(args: argparse.Namespace, device: torch.device, counts: List[int], err):
    """The paired measurement of the scaling (scaling.paired) over the suite's cases; None if
    it fails (the suites' own results stand; a warning says why)."""
    cases = build_cases(args.cells, args.shape_list, input_grad=args.input_grad)
    settings = _settings(args, device)
    print(
        f"paired thread scaling: fused and torch.nn at {counts} threads, "
        f"{scaling.paired_rounds(settings.repeats)} rounds",
        file=err,
    )
    try:
        return scaling.paired(cases, settings, counts, lambda d: print(f"  {d}", file=err))
    except Exception as exc:
        print(
            f"warning: the paired scaling measurement failed: {type(exc).__name__}: {exc}",
            file=err,
        )
        return None


def _set_threads(n: Optional[int]) -> None:
    if n is not None:
        torch.set_num_threads(n)


def _write_scaling(docs: List[dict], out_dir: str, err, paired: Optional[dict] = None) -> None:
    """scaling.json / scaling.txt (printed too; with the paired measurement's table when there
    is one) and, for two thread counts, the two plots side by side (speedups_compare.png) in the
    run's folder."""
    report = scaling.scaling(docs)
    report["paired"] = paired
    _write_json(os.path.join(out_dir, "scaling.json"), report)
    text = scaling.format_scaling(report)
    if paired and paired["rows"]:
        text += "\n\n" + scaling.format_paired(paired)
    with open(os.path.join(out_dir, "scaling.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    if len(docs) == 2:
        names = [f"{d['settings']['threads']} thread(s)" for d in docs]
        try:
            plot.plot_results(docs, os.path.join(out_dir, "speedups_compare.png"), names)
        except Exception as exc:  # the measurements are saved; a plotting problem only warns
            print(
                f"warning: could not draw speedups_compare.png: {type(exc).__name__}: {exc}",
                file=err,
            )
    print(f"thread scaling in {os.path.abspath(out_dir)}")


def _run_serving(
    args: argparse.Namespace, argv: List[str], device: torch.device, threads: int, err, out_dir: str
) -> int:
    env = environment(device, torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    header = (
        f"{env['device_name']}, fusedrnn CPU kernels: "
        f"{env['build_info'].get('cpu_isa')}, {threads} thread(s), float32"
    )
    print(f"serving group: {header}", file=err)
    started = time.perf_counter()
    rows = serving.run(args.repeats, grid=args.serving_grid)
    doc = {
        "format": "fusedrnn-bench-serving/1",
        "command": command_line(argv),
        "argv": argv,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": time.perf_counter() - started,
        "env": env,
        "settings": {
            "threads": threads,
            "repeats": args.repeats,
            "statistic": "median",
            "steps_per_cell_loop": serving.STEPS,
            "grid": args.serving_grid,
            "timer": "time.perf_counter around each run",
        },
        "rows": rows,
    }
    _write_json(os.path.join(out_dir, "serving.json"), doc)
    table = serving.format_table(rows)
    with open(os.path.join(out_dir, "serving.txt"), "w") as f:
        f.write(header + "\n" + table + "\n")
    print(header)
    print(table)
    if args.serving_grid:
        try:
            serving.plot(rows, os.path.join(out_dir, "serving.png"), header)
        except Exception as exc:  # the measurements are saved; a plotting problem only warns
            print(f"warning: could not draw serving.png: {type(exc).__name__}: {exc}", file=err)
    print(f"wall time {time.perf_counter() - started:.1f} s; results in {os.path.abspath(out_dir)}")
    return _exit_status(
        [f"{r['case']} {r['pass']}: {r['reason']}" for r in rows if r["status"] != "ok"], err
    )


def _exit_status(failed: List[str], err) -> int:
    """1 after naming every failed measurement, 0 when there is none: a row that errors is a
    failure of what the benchmark measures (skips on purpose are not), so that CI sees it."""
    if failed:
        print(f"error: {len(failed)} measurement(s) failed:", file=err)
        for line in failed:
            print(f"  {line}", file=err)
        return 1
    return 0


def _settings(args: argparse.Namespace, device: torch.device) -> Settings:
    return Settings(
        device=device,
        dtype=DTYPES[args.dtype],
        repeats=args.repeats,
        warmup=WARMUP[device.type],
        compile=not args.no_compile,
        compile_backend=args.compile_backend,
        memory=not args.no_memory,
        input_grad=args.input_grad,
    )


def _run(
    args: argparse.Namespace,
    argv: List[str],
    device: torch.device,
    threads: int,
    err,
    out_dir: str,
) -> Tuple[int, dict]:
    """The layer suite at the current thread count, written to out_dir: (exit status, the
    results document)."""
    settings = _settings(args, device)
    cases = build_cases(args.cells, args.shape_list, input_grad=args.input_grad)
    env = environment(device, settings.dtype)
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.json")
    tf32_note = "TF32 on (--tf32)" if args.tf32 else "TF32 off"
    print(
        f"fusedrnn {env['fusedrnn']} ({env['backend']}) on {env['device_name']}, "
        f"{args.dtype}, {threads} thread(s), {tf32_note}; {len(cases)} cases, "
        f"{len(args.shape_list)} shape(s)",
        file=err,
    )

    settings_doc = {
        "device": device.type,
        "dtype": args.dtype,
        "threads": threads,
        "cells": args.cells,
        "shape_preset": args.shape_preset,
        "shapes": [list(s) for s in args.shape_list],
        "repeats": settings.repeats,
        "slow_repeats": settings.slow_repeats,
        "warmup": settings.warmup,
        "warmup_slow": 1,
        "timer": (
            "torch.cuda.Event elapsed_time, synchronised after each run"
            if device.type == "cuda"
            else "time.perf_counter around each run"
        ),
        "statistic": "median",
        "compile": settings.compile,
        "compile_mode": COMPILE_MODE,
        "compile_note": COMPILE_NOTE,
        "compile_backend": settings.compile_backend,
        "input_grad": settings.input_grad,
        "memory": settings.memory,
        "memory_method": MEMORY_METHOD[device.type] if settings.memory else None,
        "tf32": args.tf32,
        # read back after setting: what both sides ran with
        "tf32_flags": tf32_state(),
        "tf32_note": TF32_NOTE,
        "speedup": "median time of the baseline / median time of fused (> 1: fused faster)",
    }
    started = time.perf_counter()

    def document(
        results: List[dict], complete: bool, stopped: Optional[str], report: Optional[dict]
    ) -> dict:
        return {
            "format": "fusedrnn-bench/1",
            "command": command_line(argv),
            "argv": argv,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_s": time.perf_counter() - started,
            # complete: every case measured; interrupted: stopped by a signal (the reason
            # says which); neither: still running (the file as rewritten after each case)
            "complete": complete,
            "interrupted": stopped is not None,
            "interrupt_reason": stopped,
            "cases_total": len(cases),
            "cases_done": len({(r["label"], r["shape_str"]) for r in results}),
            "env": env,
            "settings": settings_doc,
            "results": results,
            "throughput": report,
        }

    results: List[dict] = []
    stopped: Optional[str] = None
    exit_code = 0
    try:
        with _progress(count_tasks(cases, settings), err) as bar:
            for case in cases:
                results.extend(measure.run_case(case, settings, bar))
                _write_json(results_path, document(results, False, None, None))
    except KeyboardInterrupt as exc:
        stopped, exit_code = _interruption(exc)
    wall = time.perf_counter() - started
    report = None
    if stopped:
        print(
            f"interrupted ({stopped}): keeping the {len(results)} records measured so far; "
            "no GEMM-rate report",
            file=err,
        )
    else:
        try:
            report = throughput.measure(results, device, settings.dtype)
        except KeyboardInterrupt as exc:
            stopped, exit_code = _interruption(exc)
            print(
                f"interrupted ({stopped}) while measuring the GEMM rate: results kept, no "
                "GEMM-rate report",
                file=err,
            )
    doc = document(results, stopped is None, stopped, report)
    doc["wall_s"] = wall
    _write_json(results_path, doc)
    table = format_table(results) if results else "(no results)"
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    print(
        f"{env['device_name']}, fusedrnn CPU kernels: {env['build_info'].get('cpu_isa')} "
        f"(best here: {env['build_info'].get('cpu_isa_best')}), {threads} thread(s)"
        if device.type == "cpu"
        else f"{env['device_name']}, {tf32_note}"
    )
    print(table)
    text = throughput.format_report(report) if report else ""
    if text:
        print(text)
    if results:
        try:
            plot.plot_results([doc], os.path.join(out_dir, "speedups.png"))
        except Exception as exc:  # the measurements are saved; a plotting problem only warns
            print(f"warning: could not draw speedups.png: {type(exc).__name__}: {exc}", file=err)
    print(f"wall time {wall:.1f} s; results in {os.path.abspath(out_dir)}")
    if stopped:
        return exit_code, doc
    # A row that errors is a failure of what the benchmark measures (skips on purpose are not):
    # the command fails, so that CI and scripts see it.
    code = _exit_status(
        [
            f"{rec['label']} {rec['shape_str']} {rec['pass']} {impl}: {e.get('reason')}"
            for rec in results
            for impl, e in rec["impls"].items()
            if e.get("status") == "error"
        ],
        err,
    )
    return code, doc
