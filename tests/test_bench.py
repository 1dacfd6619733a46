"""The benchmark command: argument checking, a tiny end-to-end run and the plot command."""
import json
import os

import pytest
import torch

from fusedrnn.bench import cli, core, plot

TINY = ["--device", "cpu", "--shapes", "3,2,4,5", "--repeats", "2"]


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


@pytest.mark.parametrize("argv, message", [
    (["--cells", "lstm,foo"], "unknown cell 'foo'"),
    (["--cells", ","], "comma-separated list of cells"),
    (["--shapes", "3,2"], "four positive integers, got '3,2'"),
    (["--shapes", "3,2,4,x"], "four positive integers"),
    (["--shapes", "3,2,4,0"], "four positive integers"),
    (["--threads", "0"], "--threads: must be a positive integer, got 0"),
    (["--threads", "two"], "--threads: must be a positive integer"),
    (["--repeats", "0"], "--repeats: must be a positive integer"),
    (["--dtype", "float16", "--device", "cpu"], "float16 is not supported on the CPU"),
    (["--dtype", "int8"], "invalid choice"),
    (["--grid", "--fastrnns"], "not allowed with"),
])
def test_bad_arguments_exit_with_one_line(capsys, argv, message):
    assert message in _error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable(capsys):
    assert "CUDA is not available" in _error(capsys, ["--device", "cuda"])


def test_parse_presets():
    args = cli.parse_args(["--device", "cpu"])
    assert args.shape_list == [core.QUICK_SHAPE_CPU] and args.cells == list(core.CELLS)
    assert cli.parse_args(["--fastrnns"]).shape_list == [(100, 64, 512, 512)]
    grid = cli.parse_args(["--grid"]).shape_list
    assert len(grid) == 32 and (200, 256, 1024, 1024) in grid
    args = cli.parse_args(["--shapes", "3,2,4,5; 6,7,8,9", "--cells", "gru,lstm,gru"])
    assert args.shape_list == [(3, 2, 4, 5), (6, 7, 8, 9)] and args.cells == ["gru", "lstm"]
    cases = core.build_cases(["lstm", "wm_lstm"], [(3, 2, 4, 5)])
    assert [c.label for c in cases] == ["lstm", "wm_lstm", "lstm +dx", "lstm 3-layer bidir"]
    assert "torch" not in cases[1].impls and cases[2].passes == ("fwd+bwd",)
    assert core.slow_repeats(10) == 3 and core.slow_repeats(2) == 2


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
    for key in ("device_name", "torch", "cuda", "fusedrnn", "git_revision", "dtype", "threads",
                "omp_wait_policy", "build_info", "backend"):
        assert key in env
    assert env["device"] == "cpu" and env["threads"] == 1 and env["dtype"] == "float32"
    assert doc["settings"]["compile_mode"] == "compiled step loop"
    results = doc["results"]
    labels = {(r["label"], r["pass"]) for r in results}
    for cell in core.CELLS:
        assert (cell, "fwd") in labels and (cell, "fwd+bwd") in labels
    assert ("lstm 3-layer bidir", "fwd+bwd") in labels
    assert ("lstm +dx", "fwd+bwd") in labels
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
        assert rec["impls"]["compiled"]["status"] == "skipped" if "compiled" in rec["impls"] \
            else stack_rows
        if "torch" in rec["impls"]:
            assert rec["impls"]["torch"]["kernel"] in ("oneDNN", "ATen")
            assert rec["speedup"]["torch"] > 0
        if rec["pass"] == "fwd":
            assert rec["impls"]["eager"]["max_abs_diff_vs_fused"] < 1e-4


def test_memory_and_compiled_loop(tmp_path):
    out = tmp_path / "mem"
    # the "eager" compile backend runs the compiled-step-loop path without code generation
    assert cli.main(TINY + ["--cells", "lstm", "--compile-backend", "eager", "--input-grad",
                            "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["input_grad"] is True and doc["settings"]["memory_method"]
    train = [r for r in doc["results"] if r["pass"] == "fwd+bwd"]
    assert len(train) == 2
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
    assert cli.main(TINY + ["--cells", "gru", "--no-memory", "--compile-backend", "no_such",
                            "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    for rec in doc["results"]:
        compiled = rec["impls"]["compiled"]
        assert compiled["status"] == "skipped" and "no_such" in compiled["reason"]
        assert rec["impls"]["fused"]["status"] == "ok" and "compiled" not in rec["speedup"]
    assert "torch.compile path failed" in capsys.readouterr().out


def test_failed_fused_row_fails_the_command(tmp_path, capsys, monkeypatch):
    """A fused row that errors makes the command exit 1 (CI runs it), naming the row; rows
    skipped on purpose (--no-compile) do not."""
    calls = core.Workload.calls

    def broken(self, impl, pass_):
        if impl == "fused" and pass_ == "fwd+bwd":
            raise RuntimeError("simulated kernel failure")
        return calls(self, impl, pass_)

    monkeypatch.setattr(core.Workload, "calls", broken)
    out = tmp_path / "broken"
    assert cli.main(TINY + ["--cells", "gru", "--no-memory", "--no-compile",
                            "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "measurement(s) failed" in err and "simulated kernel failure" in err
    doc = json.loads((out / "results.json").read_text())
    statuses = {rec["pass"]: rec["impls"]["fused"]["status"] for rec in doc["results"]}
    assert statuses == {"fwd": "ok", "fwd+bwd": "error"}


def test_throughput_report(tiny_run):
    """results.json holds the GEMM rate measured in the same run and each single-layer fused
    row's matrix-product rate against it."""
    report = json.loads((tiny_run / "results.json").read_text())["throughput"]
    assert report["gemm"] and all(g["gflops"] > 0 for g in report["gemm"])
    assert report["gemm_best_gflops"] == max(g["gflops"] for g in report["gemm"])
    labels = {(r["label"], r["pass"]) for r in report["rows"]}
    assert ("lstm", "fwd") in labels and ("gru", "fwd+bwd") in labels
    for r in report["rows"]:
        assert r["fused_gflops"] > 0 and r["of_gemm"] == r["fused_gflops"] / report[
            "gemm_best_gflops"]
