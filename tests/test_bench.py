"""The benchmark command: argument checking, a tiny end-to-end run and the plot command; the
package's import graph."""

import ast
import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import fusedrnn.bench
from fusedrnn import cells
from fusedrnn.bench import cli, env, impls, measure, plot, scaling
from fusedrnn.bench.cases import CELLS, QUICK_SHAPE_CPU, Settings, build_cases, slow_repeats

TINY = ["--device", "cpu", "--shapes", "3,2,4,5", "--repeats", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _error(capsys, argv, main=cli.main):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _bench_imports() -> dict:
    """{module: the modules of fusedrnn.bench it imports}, read from the sources with ast,
    imports inside functions included."""
    pkg = Path(fusedrnn.bench.__file__).parent
    graph = {}
    for path in sorted(pkg.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from . / from .x
                deps.update(
                    [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                )
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "fusedrnn.bench"
            ):
                parts = node.module.split(".")
                deps.update([parts[2]] if len(parts) > 2 else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                deps.update(
                    a.name.split(".")[2] for a in node.names if a.name.startswith("fusedrnn.bench.")
                )
        graph[path.stem] = deps
    return graph


def test_import_graph_is_the_documented_one_without_cycles():
    """The package docstring lists the modules in an order in which each imports only modules
    above it; the code has exactly those imports, so there is no cycle."""
    documented, order = {}, []
    for line in fusedrnn.bench.__doc__.splitlines():
        if "->" in line and line.startswith("    "):
            name, _, deps = line.partition("->")
            order.append(name.strip())
            documented[name.strip()] = {d.strip() for d in deps.split(",") if d.strip()}
    graph = _bench_imports()
    assert set(order) == set(graph), "the docstring lists every module, once"
    assert len(order) == len(set(order))
    assert graph == documented
    for k, name in enumerate(order):
        assert graph[name] <= set(order[:k]), f"{name} imports a module listed below it"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cells", "lstm,foo"], "unknown cell 'foo'"),
        (["--cells", ","], "comma-separated list of cells"),
        (["--shapes", "3,2"], "four positive integers, got '3,2'"),
        (["--shapes", "3,2,4,x"], "four positive integers"),
        (["--shapes", "3,2,4,0"], "four positive integers"),
        (
            ["--threads", "0"],
            "--threads: must be positive integers or 'all', comma-separated, got 0",
        ),
        (["--threads", "two"], "--threads: must be positive integers or 'all'"),
        (["--threads", "1,"], "--threads: must be positive integers or 'all'"),
        (["--serving", "--threads", "1,2"], "the serving group runs at one thread count"),
        (["--repeats", "0"], "--repeats: must be a positive integer"),
        (["--dtype", "float16", "--device", "cpu"], "float16 is not supported on the CPU"),
        (["--dtype", "int8"], "invalid choice"),
        (["--grid", "--fastrnns"], "not allowed with"),
    ],
)
def test_bad_arguments_exit_with_one_line(capsys, argv, message):
    assert message in _error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable(capsys):
    assert "CUDA is not available" in _error(capsys, ["--device", "cuda"])


def test_thread_counts():
    """--threads takes a list; the default is one thread and every core on a CPU (one thread for
    the serving group), torch's own setting on a GPU."""
    cores = cli.all_cores()
    assert cores >= 1
    assert cli.parse_args(["--threads", "4,1,all,4"]).threads == sorted({1, 4, cores})
    cpu = torch.device("cpu")
    assert cli.thread_counts(cli.parse_args(["--device", "cpu"]), cpu) == sorted({1, cores})
    assert cli.thread_counts(cli.parse_args(["--device", "cpu", "--threads", "3"]), cpu) == [3]
    assert cli.thread_counts(cli.parse_args(["--serving"]), cpu) == [1]
    args = cli.parse_args(["--device", "cpu"])
    assert cli.thread_counts(args, torch.device("cuda")) == [None]


def test_parse_presets():
    args = cli.parse_args(["--device", "cpu"])
    assert args.shape_list == [QUICK_SHAPE_CPU] and args.cells == list(CELLS)
    assert cli.parse_args(["--fastrnns"]).shape_list == [(100, 64, 512, 512)]
    grid = cli.parse_args(["--grid"]).shape_list
    assert len(grid) == 32 and (200, 256, 1024, 1024) in grid
    args = cli.parse_args(["--shapes", "3,2,4,5; 6,7,8,9", "--cells", "gru,lstm,gru"])
    assert args.shape_list == [(3, 2, 4, 5), (6, 7, 8, 9)] and args.cells == ["gru", "lstm"]
    cases = build_cases(["lstm", "wm_lstm"], [(3, 2, 4, 5)])
    assert [c.label for c in cases] == [
        "lstm",
        "wm_lstm",
        "lstm +dx",
        "lstm 3-layer bidir",
        "lstm dropconnect",
        "lstm zoneout",
        "layer-norm lstm",
    ]
    assert cases[4].dropconnect > 0 and cases[4].passes == ("fwd+bwd",)
    assert "compiled" not in cases[4].impls
    # zoneout: training only, against the eager loop (torch.nn has none)
    assert cases[5].zoneout > 0 and cases[5].passes == ("fwd+bwd",)
    assert cases[5].impls == ("fused", "eager")
    # the layer-normalised LSTM: no torch.nn module, both passes
    assert cases[6].layer_norm and "torch" not in cases[6].impls and len(cases[6].passes) == 2
    assert [c.label for c in build_cases(["gru"], [(3, 2, 4, 5)])] == ["gru", "layer-norm gru"]
    assert "torch" not in cases[1].impls and cases[2].passes == ("fwd+bwd",)
    assert slow_repeats(10) == 3 and slow_repeats(2) == 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    threads = torch.get_num_threads()
    try:
        rc = cli.main(TINY + ["--no-compile", "--no-memory", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def test_tiny_run_writes_json_table_and_png(tiny_run):
    assert (tiny_run / "speedups.png").stat().st_size > 0
    assert (tiny_run / "table.txt").read_text().startswith("cell")
    doc = json.loads((tiny_run / "results.json").read_text())
    for key in ("command", "argv", "timestamp", "wall_s", "env", "settings", "results"):
        assert key in doc
    assert doc["command"].startswith("python -m fusedrnn.bench")
    env = doc["env"]
    for key in (
        "device_name",
        "torch",
        "cuda",
        "fusedrnn",
        "git_revision",
        "dtype",
        "threads",
        "omp_wait_policy",
        "build_info",
        "backend",
    ):
        assert key in env
    assert env["device"] == "cpu" and env["threads"] == 1 and env["dtype"] == "float32"
    assert doc["settings"]["compile_mode"] == "compiled step loop"
    results = doc["results"]
    labels = {(r["label"], r["pass"]) for r in results}
    for cell in CELLS:
        assert (cell, "fwd") in labels and (cell, "fwd+bwd") in labels
    assert ("lstm 3-layer bidir", "fwd+bwd") in labels
    assert ("lstm +dx", "fwd+bwd") in labels
    assert ("lstm dropconnect", "fwd+bwd") in labels
    assert ("lstm zoneout", "fwd+bwd") in labels
    for rec in results:
        # the stacked row and its single-layer "+dx" comparison run at half the sequence length
        # (the stacked row is the slowest)
        stack_rows = rec["layers"] == 3 or rec["label"] == "lstm +dx"
        assert rec["input_grad"] is (rec["label"] == "lstm +dx")
        T = 1 if stack_rows else 3
        assert rec["shape"] == {"T": T, "B": 2, "I": 4, "H": 5}
        fused = rec["impls"]["fused"]
        assert fused["status"] == "ok" and len(fused["times_ms"]) == 2
        assert fused["median_ms"] > 0 and rec["memory"] is None
        assert (
            rec["impls"]["compiled"]["status"] == "skipped"
            if "compiled" in rec["impls"]
            else stack_rows or rec["label"] in ("lstm dropconnect", "lstm zoneout")
        )
        assert rec["dropconnect"] == (0.5 if rec["label"] == "lstm dropconnect" else 0.0)
        assert rec["zoneout"] == (0.1 if rec["label"] == "lstm zoneout" else 0.0)
        if "torch" in rec["impls"]:
            assert rec["impls"]["torch"]["kernel"] in ("oneDNN", "ATen")
            assert rec["speedup"]["torch"] > 0
        if rec["pass"] == "fwd":
            assert rec["impls"]["eager"]["max_abs_diff_vs_fused"] < 1e-4


def test_memory_and_compiled_loop(tmp_path):
    out = tmp_path / "mem"
    # the "eager" compile backend runs the compiled-step-loop path without code generation
    assert (
        cli.main(
            TINY
            + ["--cells", "lstm", "--compile-backend", "eager", "--input-grad", "--out", str(out)]
        )
        == 0
    )
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["input_grad"] is True and doc["settings"]["memory_method"]
    train = [r for r in doc["results"] if r["pass"] == "fwd+bwd"]
    # lstm, lstm 3-layer bidir, lstm dropconnect, lstm zoneout, layer-norm lstm (--input-grad:
    # no "+dx" row)
    assert [r["label"] for r in train] == [
        "lstm",
        "lstm 3-layer bidir",
        "lstm dropconnect",
        "lstm zoneout",
        "layer-norm lstm",
    ]
    for rec in train:
        for impl, entry in rec["impls"].items():
            assert entry["status"] == "ok", entry
            if impl != "compiled":  # the compiled loop's memory is not measured
                assert rec["memory"][impl]["peak_mb"] > 0
        assert "compiled" not in rec["memory"]
    single = train[0]
    assert single["impls"]["compiled"]["mode"] == "compiled step loop"
    assert set(single["speedup"]) == {"torch", "eager", "compiled"}


def test_plot_one_and_two_files(tiny_run, tmp_path, capsys):
    first = tiny_run / "results.json"
    (tiny_run / "speedups.png").unlink()
    assert plot.main([str(first)]) == 0
    assert (tiny_run / "speedups.png").stat().st_size > 0
    second = tmp_path / "other.json"
    doc = json.loads(first.read_text())
    for rec in doc["results"]:  # a "before" run: every speed-up halved
        rec["speedup"] = {k: v / 2 for k, v in rec["speedup"].items()}
    second.write_text(json.dumps(doc))
    assert plot.main([str(first), str(second), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "speedups_compare.png").stat().st_size > 0
    assert plot.main([str(second), "--out", str(tmp_path / "x.png")]) == 0
    assert os.path.getsize(tmp_path / "x.png") > 0
    capsys.readouterr()
    assert "expected one or two" in _error(capsys, [str(first)] * 3, plot.main)
    assert "cannot read" in _error(capsys, [str(tmp_path / "missing.json")], plot.main)


def test_compile_failure_is_skipped_per_cell(tmp_path, capsys):
    out = tmp_path / "nocompile"
    assert (
        cli.main(
            TINY
            + ["--cells", "gru", "--no-memory", "--compile-backend", "no_such", "--out", str(out)]
        )
        == 0
    )
    doc = json.loads((out / "results.json").read_text())
    for rec in doc["results"]:
        compiled = rec["impls"]["compiled"]
        assert compiled["status"] == "skipped" and "no_such" in compiled["reason"]
        assert rec["impls"]["fused"]["status"] == "ok" and "compiled" not in rec["speedup"]
    assert "torch.compile path failed" in capsys.readouterr().out


def test_failed_fused_row_fails_the_command(tmp_path, capsys, monkeypatch):
    """A fused row that errors makes the command exit 1 (CI runs it), naming the row; rows
    skipped on purpose (--no-compile) do not."""
    calls = impls.Workload.calls

    def broken(self, impl, pass_):
        if impl == "fused" and pass_ == "fwd+bwd":
            raise RuntimeError("simulated kernel failure")
        return calls(self, impl, pass_)

    monkeypatch.setattr(impls.Workload, "calls", broken)
    out = tmp_path / "broken"
    assert (
        cli.main(TINY + ["--cells", "gru", "--no-memory", "--no-compile", "--out", str(out)]) == 1
    )
    err = capsys.readouterr().err
    assert "measurement(s) failed" in err and "simulated kernel failure" in err
    doc = json.loads((out / "results.json").read_text())
    statuses = {rec["pass"]: rec["impls"]["fused"]["status"] for rec in doc["results"]}
    assert statuses == {"fwd": "ok", "fwd+bwd": "error"}


def test_throughput_report(tiny_run):
    """results.json holds the GEMM rate measured in the same run, in the run's dtype, and each
    single-layer fused row's matrix-product rate against the best rate of its own shapes."""
    report = json.loads((tiny_run / "results.json").read_text())["throughput"]
    assert report["gemm"] and all(g["gflops"] > 0 for g in report["gemm"])
    assert report["gemm_best_gflops"] == max(g["gflops"] for g in report["gemm"])
    labels = {(r["label"], r["pass"]) for r in report["rows"]}
    assert ("lstm", "fwd") in labels and ("gru", "fwd+bwd") in labels
    assert report["dtype"] == "float32"
    rates = {(g["m"], g["k"], g["n"]): g["gflops"] for g in report["gemm"]}
    for r in report["rows"]:
        # TINY is T,B,I,H = 3,2,4,5 (T = 1 for the "+dx" row): the row's own two shapes
        T = 1 if r["label"] == "lstm +dx" else 3
        G = 15 if r["label"].endswith("gru") else 20  # the GRU and the layer-norm GRU
        own = max(rates[(2, 5, G)], rates[(T * 2, 4, G)])
        assert r["gemm_gflops"] == own and r["fused_gflops"] > 0
        assert r["of_gemm"] == r["fused_gflops"] / own


# --- TF32, interruption, progress -----------------------------------------------------------


def _flags():
    b = torch.backends
    return b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32


def _set_flags(cudnn: bool, matmul: bool):
    torch.backends.cudnn.allow_tf32 = cudnn
    torch.backends.cuda.matmul.allow_tf32 = matmul


@pytest.fixture
def keep_tf32():
    old = _flags()
    yield
    _set_flags(*old)


def _run_seeing_flags(monkeypatch, argv):
    """Runs the tiny benchmark; returns (exit code, results.json, the TF32 flags every case
    was measured under)."""
    seen = []
    run_case = measure.run_case

    def spy(case, settings, progress=None):
        seen.append(_flags())
        return run_case(case, settings, progress)

    monkeypatch.setattr(measure, "run_case", spy)
    rc = cli.main(argv)
    out = argv[argv.index("--out") + 1]
    return rc, json.loads((Path(out) / "results.json").read_text()), seen


@pytest.mark.parametrize(
    "before, tf32",
    [((True, False), False), ((False, True), False), ((False, False), True)],
    ids=["torch-defaults", "mixed", "tf32-flag"],
)
def test_tf32_same_on_both_sides_recorded_and_restored(
    tmp_path, monkeypatch, keep_tf32, before, tf32
):
    """Whatever the flags were (torch's defaults: cuDNN on, cuBLAS off), every case runs with
    both off, or both on with --tf32; results.json records it; the flags are restored."""
    _set_flags(*before)
    argv = TINY + ["--cells", "gru", "--no-memory", "--no-compile", "--out", str(tmp_path / "r")]
    rc, doc, seen = _run_seeing_flags(monkeypatch, argv + (["--tf32"] if tf32 else []))
    assert rc == 0
    assert seen and all(flags == (tf32, tf32) for flags in seen), seen
    st = doc["settings"]
    assert st["tf32"] is tf32
    assert st["tf32_flags"]["cudnn_allow_tf32"] is tf32
    assert st["tf32_flags"]["cuda_matmul_allow_tf32"] is tf32
    assert "cuDNN" in st["tf32_note"] and "cuBLAS" in st["tf32_note"]
    assert _flags() == before


def test_tf32_restored_after_an_error(keep_tf32):
    _set_flags(True, False)
    with pytest.raises(RuntimeError, match="inside"):
        with env.tf32(True):
            assert _flags() == (True, True)
            raise RuntimeError("inside")
    assert _flags() == (True, False)
    with pytest.raises(TypeError, match="tf32: expected a bool, got str 'yes'"):
        with env.tf32("yes"):
            pass
    assert _flags() == (True, False)


def test_parse_tf32_default_off():
    assert cli.parse_args(["--device", "cpu"]).tf32 is False
    assert cli.parse_args(["--device", "cpu", "--tf32"]).tf32 is True


def test_results_rewritten_after_every_case(tmp_path, monkeypatch):
    """results.json exists, incomplete, after each case, so that a run killed outright (no
    handler runs on SIGKILL) keeps what it measured."""
    out = tmp_path / "rows"
    seen = []
    run_case = measure.run_case

    def spy(case, settings, progress=None):
        path = out / "results.json"
        seen.append(json.loads(path.read_text()) if path.exists() else None)
        return run_case(case, settings, progress)

    monkeypatch.setattr(measure, "run_case", spy)
    assert (
        cli.main(TINY + ["--cells", "lstm,gru", "--no-memory", "--no-compile", "--out", str(out)])
        == 0
    )
    # lstm, gru, lstm +dx, lstm 3-layer bidir, lstm dropconnect, lstm zoneout, layer-norm lstm,
    # layer-norm gru, with 2, 2, 1, 1, 1, 1, 2 and 2 rows (passes)
    rows = [2, 2, 1, 1, 1, 1, 2, 2]
    assert seen[0] is None and len(seen) == len(rows)
    for k, doc in enumerate(seen[1:], start=1):
        assert doc["complete"] is False and doc["interrupted"] is False
        assert doc["cases_done"] == k and doc["cases_total"] == len(rows)
        assert len(doc["results"]) == sum(rows[:k])
        assert doc["throughput"] is None
    final = json.loads((out / "results.json").read_text())
    assert final["complete"] is True and final["cases_done"] == len(rows) and final["throughput"]


def test_sigterm_keeps_what_was_measured(tmp_path, monkeypatch):
    """SIGTERM (what `timeout` sends) as the second case starts: the command exits 143 with
    the first case's rows in results.json, marked interrupted, and the previous handler is
    back."""
    run_case = measure.run_case
    calls = []

    def then_terminate(case, settings, progress=None):
        calls.append(case.label)
        if len(calls) == 2:  # in the middle of the run; the handler runs in this thread
            os.kill(os.getpid(), signal.SIGTERM)
        return run_case(case, settings, progress)

    monkeypatch.setattr(measure, "run_case", then_terminate)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "stopped"
    rc = cli.main(TINY + ["--cells", "lstm,gru", "--no-memory", "--no-compile", "--out", str(out)])
    assert rc == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert len(calls) == 2  # no case after the signal
    doc = json.loads((out / "results.json").read_text())
    assert doc["interrupted"] is True and doc["complete"] is False
    assert doc["interrupt_reason"] == "SIGTERM" and doc["cases_done"] == 1
    assert [(r["label"], r["pass"]) for r in doc["results"]] == [
        ("lstm", "fwd"),
        ("lstm", "fwd+bwd"),
    ]
    assert all(r["impls"]["fused"]["status"] == "ok" for r in doc["results"])
    assert (out / "table.txt").read_text().startswith("cell")


def test_progress_lines_without_tqdm_or_terminal(monkeypatch, capsys):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    bar = cli._progress(2, Tty())
    assert isinstance(bar, cli._LineProgress)
    log = io.StringIO()  # a log file: lines even where tqdm is installed
    monkeypatch.delitem(sys.modules, "tqdm")
    with cli._progress(2, log) as bar:
        bar.set_description("lstm 3x2x4x5 fwd fused")
        bar.update(1)
        bar.set_description("lstm 3x2x4x5 fwd torch.nn")
        bar.update(1)
    assert log.getvalue().splitlines() == [
        "[1/2] lstm 3x2x4x5 fwd fused",
        "[2/2] lstm 3x2x4x5 fwd torch.nn",
    ]


def test_plot_without_matplotlib_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as info:
        plot.main([str(tiny_run / "results.json"), "--out", str(tmp_path / "x.png")])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot plot without matplotlib" in err[0]
    assert not (tmp_path / "x.png").exists()


# --- the serving group ------------------------------------------------------------------------


@pytest.fixture
def small_serving(monkeypatch):
    """The serving group at toy sizes, so that the whole command runs in seconds."""
    from fusedrnn.bench import serving

    monkeypatch.setattr(serving, "STEPS", 4)
    monkeypatch.setattr(serving, "CELL_SIZE", 16)
    monkeypatch.setattr(serving, "LAYER_CASES", (("lstm", 6, 1, 16), ("gru", 6, 2, 8)))
    return serving


def test_serving_grid_writes_every_row_and_the_plot(tmp_path, capsys, small_serving):
    out = tmp_path / "serving"
    assert cli.main(["--serving-grid", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads((out / "serving.json").read_text())
    rows = doc["rows"]
    cells_ = [r for r in rows if r["group"] == "cells"]
    assert {(r["cell"], r["batch"], r["pass"]) for r in cells_} == {
        (c, b, p) for c in CELLS for b in small_serving.GRID_BATCHES for p in ("fwd", "fwd+bwd")
    }
    assert [r["case"] for r in rows if r["group"] == "layers"] == [
        "lstm layer T=6 B=1 H=16",
        "gru layer T=6 B=2 H=8",
    ]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["fused_ms"])
        assert r["bound_us_per_step"] > 0 and r["weight_bytes_per_step"] > 0
        assert r["mm_us_per_step"] == pytest.approx(r["flops_per_step"] / r["mm_flops_per_s"] * 1e6)
    # the matrix-product FLOPs of a step: (I + H) x gates*H per row, three times with backward
    lstm1 = {r["pass"]: r for r in cells_ if r["cell"] == "lstm" and r["batch"] == 1}
    assert lstm1["fwd"]["flops_per_step"] == 2 * (16 + 16) * 4 * 16
    assert lstm1["fwd+bwd"]["flops_per_step"] == 3 * lstm1["fwd"]["flops_per_step"]
    # the peephole and WM cells are timed against the eager reference step, LSTM / GRU torch.nn
    in_nn = {name for name, c in cells.CELLS.items() if c.in_torch_nn}
    assert {r["baseline"] for r in cells_ if r["cell"] in in_nn} == {"torch.nn"}
    assert {r["baseline"] for r in cells_ if r["cell"] not in in_nn} == {"eager step"}
    assert (out / "serving.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "bound us/step" in printed and "torch.mm us/step" in printed
    assert "thread(s), float32" in printed


def test_serving_row_that_fails_fails_the_command(tmp_path, capsys, monkeypatch, small_serving):
    loop = small_serving._cell_loop

    def broken(step, x, state, has_c, training):
        if training:

            def fail():
                raise RuntimeError("simulated backward failure")

            return fail
        return loop(step, x, state, has_c, training)

    monkeypatch.setattr(small_serving, "_cell_loop", broken)
    out = tmp_path / "broken"
    assert cli.main(["--serving", "--repeats", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "measurement(s) failed" in err and "simulated backward failure" in err
    rows = json.loads((out / "serving.json").read_text())["rows"]
    assert {r["status"] for r in rows if r["pass"] == "fwd+bwd"} == {"error"}
    assert {r["status"] for r in rows if r["pass"] != "fwd+bwd"} == {"ok"}


def test_serving_refuses_other_devices_and_dtypes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--serving", "--dtype", "bfloat16"])
    assert "the serving group runs on the CPU in float32" in capsys.readouterr().err


def test_two_thread_counts_write_a_folder_each_and_the_scaling(tmp_path, capsys):
    """Several --threads counts: one complete run per count in threads-<N>/, and the scaling
    report, whose ratios are the two runs' medians divided."""
    out = tmp_path / "scale"
    argv = TINY[:-2] + ["--threads", "2,1", "--cells", "lstm", "--no-compile", "--no-memory"]
    assert cli.main(argv + ["--out", str(out)]) == 0
    docs = [json.loads((out / f"threads-{n}" / "results.json").read_text()) for n in (1, 2)]
    for n, doc in zip((1, 2), docs):
        assert doc["complete"] and doc["settings"]["threads"] == n and doc["env"]["threads"] == n
        assert (out / f"threads-{n}" / "table.txt").read_text().startswith("cell")
    assert (out / "speedups_compare.png").stat().st_size > 0
    report = json.loads((out / "scaling.json").read_text())
    assert report["threads"] == [1, 2]
    assert len(report["rows"]) == len(docs[1]["results"]) > 0
    one = {(r["label"], r["pass"]): r for r in docs[0]["results"]}
    for row in report["rows"]:
        before = one[(row["label"], row["pass"])]["impls"]
        after = next(
            r for r in docs[1]["results"] if (r["label"], r["pass"]) == (row["label"], row["pass"])
        )["impls"]
        assert (row["threads_from"], row["threads_to"]) == (1, 2)
        for impl, ratio in row["scaling"].items():
            assert ratio == pytest.approx(before[impl]["median_ms"] / after[impl]["median_ms"])
        if "torch" in row["scaling"]:
            assert row["fused_over_torch"] == pytest.approx(
                row["scaling"]["fused"] / row["scaling"]["torch"]
            )
    # the paired measurement: fused and torch.nn of every case with both, each pass, medians
    # at both counts from one loop
    paired = report["paired"]
    assert paired["rounds"] == scaling.paired_rounds(int(TINY[TINY.index("--repeats") + 1]))
    with_nn = {(r["label"], r["pass"]) for r in docs[0]["results"] if "torch" in r["impls"]}
    assert {(r["label"], r["pass"]) for r in paired["rows"]} == with_nn
    for row in paired["rows"]:
        med = row["median_ms"]
        for impl in ("fused", "torch"):
            assert set(med[impl]) == {"1", "2"} and min(med[impl].values()) > 0
            assert row["scaling"][impl] == pytest.approx(med[impl]["1"] / med[impl]["2"])
        assert row["fused_over_torch"] == pytest.approx(
            row["scaling"]["fused"] / row["scaling"]["torch"]
        )
    assert torch.get_num_threads() == 2  # the last count's, as the suites leave it
    text = (out / "scaling.txt").read_text()
    assert text.startswith("thread scaling") and "1 -> 2" in text
    assert "paired thread scaling" in text
    assert text.strip() in capsys.readouterr().out


def test_sigterm_during_the_paired_scaling_keeps_the_suites_scaling(tmp_path, monkeypatch):
    """SIGTERM during the paired measurement (after every suite): the command exits 143 and still
    writes scaling.txt / scaling.json of the complete suites, with no paired table."""
    paired = scaling.paired

    def then_terminate(cases, settings, counts, progress=None):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this thread
        return paired(cases, settings, counts, progress)

    monkeypatch.setattr(scaling, "paired", then_terminate)
    out = tmp_path / "stopped"
    argv = TINY[:-2] + ["--threads", "1,2", "--cells", "lstm", "--no-compile", "--no-memory"]
    assert cli.main(argv + ["--out", str(out)]) == 128 + signal.SIGTERM
    for n in (1, 2):
        assert json.loads((out / f"threads-{n}" / "results.json").read_text())["complete"]
    report = json.loads((out / "scaling.json").read_text())
    assert report["paired"] is None and len(report["rows"]) > 0
    text = (out / "scaling.txt").read_text()
    assert "1 -> 2" in text and "paired thread scaling" not in text


def test_dropconnect_row_drops_the_same_weight_in_every_implementation():
    """The "lstm dropconnect" row: under one seed, fused, torch.nn and the eager loop compute the
    same training output (each drops weight_hh with torch's dropout once per call)."""
    case = next(c for c in build_cases(["lstm"], [(3, 2, 4, 5)]) if c.dropconnect)
    work = impls.Workload(case, Settings(torch.device("cpu"), torch.float64))
    outs = {}
    for impl in case.impls:
        forward, _ = work.get(impl)
        torch.manual_seed(1)
        outs[impl] = forward()
    # fp64, the same dropped weight: rounding only
    torch.testing.assert_close(outs["fused"], outs["torch"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs["fused"], outs["eager"], rtol=1e-10, atol=1e-12)
    torch.manual_seed(2)
    assert not torch.equal(work.get("fused")[0](), outs["fused"])


def test_zoneout_row_zones_alike_in_both_implementations():
    """The "lstm zoneout" row: under one seed, fused and the eager loop draw the same masks and
    compute the same training output."""
    case = next(c for c in build_cases(["lstm"], [(3, 2, 4, 5)]) if c.zoneout)
    work = impls.Workload(case, Settings(torch.device("cpu"), torch.float64))
    outs = {}
    for impl in case.impls:
        forward, _ = work.get(impl)
        torch.manual_seed(1)
        outs[impl] = forward()
    # fp64, the same masks: rounding only
    torch.testing.assert_close(outs["fused"], outs["eager"], rtol=1e-10, atol=1e-12)
    torch.manual_seed(2)
    assert not torch.equal(work.get("fused")[0](), outs["fused"])
