"""The GPU check (scripts/gpu_check.sh, its inline stage scripts/gpu_check_inline.py and its
report helper scripts/gpu_check_report.py) only proves anything on a machine with a GPU, which
most runs of this suite do not have. What can be checked here is checked here, so that a mistake
in the script never costs GPU time: the shell script parses, its dry run (`--dry-run`: every
stage on the CPU, with the GPU run's $OUT layout and time limits) ends with the file-count, depth
and summary contract, a stage stopped by its limit leaves the others and its own partial
results, a prebuilt extension of the same stamp is reused, and the inline stage's tolerance rule
rejects wrong results.

The two dry runs take about a minute each on 2 cores; they reuse the in-tree build."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from fusedrnn import functional, reference
from fusedrnn.testing import CELLS, layer_results, make_layer_args, within_tolerance

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check_inline.py"
CHECK = ROOT / "scripts" / "gpu_check.sh"
REPORT = ROOT / "scripts" / "gpu_check_report.py"
MAX_FILES, MAX_DEPTH = 8, 2  # what comes back from the GPU machine's $OUT
TAIL = 12000  # characters of the GPU run's output that come back
STAGE_STATUSES = {"ok", "reused", "FAIL", "timeout", "skipped", "error", "interrupted"}

# The check runs `pytest tests -k cuda`; a test here that runs the check again would recurse.
nested = pytest.mark.skipif(
    os.environ.get("GPU_CHECK_NESTED") == "1", reason="inside a run of the GPU check"
)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _load(REPORT, "gpu_check_report")


def _files(out: Path):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _dry_run(repo: Path, out: Path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    full.pop("GPU_CHECK_NESTED", None)
    full.update(env)
    # 450 s is the check's own budget; the run takes about a minute here
    return subprocess.run(
        ["bash", str(repo / "scripts" / "gpu_check.sh"), "--dry-run"],
        cwd=repo,
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _extension() -> Path:
    found = sorted((ROOT / "fusedrnn").glob("_C*.so"))
    if not found:
        pytest.skip("the extension is not built in place (python setup.py build_ext --inplace)")
    return found[0]


def test_gpu_check_script_parses():
    res = subprocess.run(["bash", "-n", str(CHECK)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--bogus"], {}, "unknown argument '--bogus' (expected --dry-run or --help)"),
        (
            ["--dry-run"],
            {"GPU_CHECK_BUDGET_S": "ten"},
            "BUDGET_S must be a whole number of seconds, got 'ten'",
        ),
        (["--dry-run"], {"PYTHON": "no-such-python-here"}, "PYTHON=no-such-python-here"),
    ],
)
def test_gpu_check_bad_input(tmp_path, argv, env, message):
    res = subprocess.run(
        ["bash", str(CHECK)] + argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OUT=str(tmp_path / "out"), **env),
        timeout=60,
    )
    assert res.returncode == 2 and message in res.stderr, res.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the check in this checkout, reusing its build; GPU_CHECK_PREBUILT names a
    build of another stamp, which must not be installed."""
    _extension()
    tmp = tmp_path_factory.mktemp("gpu_check")
    stale = tmp / "fusedrnn_C.0123456789abcdef.so"
    stale.write_bytes(b"not an extension")
    res = _dry_run(ROOT, tmp / "out", GPU_CHECK_PREBUILT=str(stale))
    logs = tmp / "logs"
    if (tmp / "out" / "logs.tar.gz").exists():
        with tarfile.open(tmp / "out" / "logs.tar.gz") as tar:
            tar.extractall(logs, filter="data")
    return res, tmp / "out", logs / "logs"


@nested
def test_dry_run_layout_and_summary(dry_run):
    res, out, logs = dry_run
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    files = _files(out)
    assert len(files) <= MAX_FILES, files
    assert max(f.count("/") for f in files) <= MAX_DEPTH, files
    assert {
        "summary.json",
        "summary.txt",
        "logs.tar.gz",
        "bench/results_float32.json",
        "bench/results_bfloat16.json",
        "bench/speedups.png",
    } <= set(files), files
    assert [f for f in files if f.startswith("fusedrnn_C.") and f.endswith(".so")], files

    doc = json.loads((out / "summary.json").read_text())
    assert doc["format"] == "fusedrnn-gpu-check/1"
    for key in (
        "ok",
        "dry_run",
        "final",
        "stopped",
        "seconds",
        "budget_s",
        "env",
        "stages",
        "build",
        "inline",
        "pytest",
        "bench",
        "failures",
        "files",
        "layout",
    ):
        assert key in doc, key
    assert doc["ok"] is True and doc["dry_run"] is True and doc["final"] is True
    assert doc["stopped"] is None and doc["failures"] == []
    assert doc["budget_s"] == 450 and 0 < doc["seconds"] < doc["budget_s"]
    assert doc["files"] == files and doc["layout"]["ok"] is True
    stages = {st["stage"]: st for st in doc["stages"]}
    assert [st["stage"] for st in doc["stages"]] == list(report.STAGES)
    assert all(st["status"] in STAGE_STATUSES for st in doc["stages"]), doc["stages"]
    for name in report.STAGES:
        if name != "build":
            assert stages[name]["status"] == "ok", stages[name]
        if stages[name]["limit_s"]:  # every stage that ran had a time limit within the budget
            assert 0 < stages[name]["seconds"] <= stages[name]["limit_s"] <= 450
    # the build was not repeated, and the summary says so; the stale prebuilt was refused
    assert stages["build"]["status"] == "reused"
    assert "not rebuilt (dry run)" in stages["build"]["detail"]
    assert "differs from the current" in doc["build"]["note"]
    assert doc["build"]["returned_so"] == "fusedrnn_C.unverified.so"
    # the CUDA tests were collected and skipped
    assert doc["pytest"]["skipped"] > 50 and doc["pytest"]["failed"] == 0
    # the inline stage: every case in every dtype, each on its own
    inline = doc["inline"]
    assert inline["complete"] is True and inline["not_ok"] == []
    assert set(inline["cases_by_dtype"]) == {"float64", "float32", "bfloat16", "float16"}
    for run in ("float32", "bfloat16", "compiled"):
        bench = doc["bench"][run]
        assert bench["complete"] is True and bench["errors"] == []
        assert bench["tf32"] is False and bench["rows"]
        assert bench["tf32_flags"]["cudnn_allow_tf32"] is False
        assert bench["tf32_flags"]["cuda_matmul_allow_tf32"] is False
    labels = {(r["label"], r["pass"]) for r in doc["bench"]["float32"]["rows"]}
    assert {(c, p) for c in CELLS for p in ("fwd", "fwd+bwd")} <= labels
    assert doc["bench"]["float32"]["compile"] is False
    assert doc["bench"]["compiled"]["compile"] is True

    # the summary is the last thing printed, and fits in what comes back of the output
    text = (out / "summary.txt").read_text()
    assert res.stdout.rstrip().endswith(text.rstrip())
    assert len(text) < TAIL // 2 and "overall: PASS" in text.splitlines()[-1]
    for name in report.STAGES:
        assert f"\n{name} " in text


@nested
def test_dry_run_archive_holds_every_log(dry_run):
    _, out, logs = dry_run
    for name in (
        "env.log",
        "env.json",
        "build_info.json",
        "build.json",
        "inline.log",
        "inline.json",
        "pytest.log",
        "pytest.xml",
        "memcheck.log",
        "memcheck_inline.json",
        "bench_float32.log",
        "bench_float32/results.json",
        "bench_bfloat16/results.json",
        "bench_compiled/results.json",
        "plot.log",
        "gpu_check.log",
        "stages.tsv",
    ):
        assert (logs / name).is_file(), name
    # the benchmark results returned are the ones measured
    assert json.loads((out / "bench" / "results_float32.json").read_text()) == json.loads(
        (logs / "bench_float32" / "results.json").read_text()
    )


@nested
@pytest.mark.parametrize(
    "name, tiny", [("inline.json", False), ("memcheck_inline.json", True)], ids=["full", "tiny"]
)
def test_inline_check_dry_run_on_cpu(dry_run, name, tiny):
    """The inline stage as the dry run ran it on the CPU fused path (--device cpu): the same
    cases, dtypes and tolerance rule as on the GPU, every case and dtype recorded on its own."""
    doc = json.loads((dry_run[2] / name).read_text())
    assert doc["device"] == "cpu" and doc["tiny"] is tiny and doc["failures"] == []
    assert doc["complete"] is True
    records = doc["records"]
    assert len(records) == doc["checks"] > 100 and all(r["ok"] for r in records)
    dtypes = {"float32", "bfloat16"} if tiny else {"float64", "float32", "bfloat16", "float16"}
    assert {r["dtype"] for r in records} == dtypes
    assert {r["check"].split("/")[0] for r in records} == set(CELLS)
    assert len(doc["outcomes"]) == doc["cases"] and all(
        o["status"] == "ok" for o in doc["outcomes"]
    )
    assert {o["dtype"] for o in doc["outcomes"]} >= dtypes


HANG_TESTS = """\
import time


def test_cuda_quick():
    assert True


def test_cuda_hangs():
    time.sleep(600)
"""

# PYTHON for the time-limit test: the fp32 benchmark gets 40 shapes (it takes minutes) and
# pytest runs a test that hangs; every other command runs as it is.
WRAPPER = """\
#!{python}
import os, sys
argv = sys.argv[1:]
if argv[:2] == ["-m", "fusedrnn.bench"] and "float32" in argv and "lstm,gru" not in argv:
    argv += ["--shapes", ";".join(["4,4,8,8"] * 40)]
if argv[:2] == ["-m", "pytest"]:
    argv[argv.index("tests")] = {hang!r}
os.execv({python!r}, [{python!r}] + argv)
"""


@nested
def test_dry_run_time_limits_and_prebuilt(tmp_path):
    """In a copy of the checkout: a stage stopped by its limit is reported as such, with what
    it measured (the benchmark's rows so far; the test pytest was running), and the later
    stages still run; a prebuilt extension of the current stamp is installed, not rebuilt."""
    so = _extension()
    repo = tmp_path / "repo"
    for part in ("csrc", "fusedrnn", "scripts", "tests"):
        shutil.copytree(
            ROOT / part, repo / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    shutil.copy(ROOT / "setup.py", repo / "setup.py")
    os.remove(repo / "fusedrnn" / so.name)  # the build must come from GPU_CHECK_PREBUILT
    stamp = report.stamp(str(repo), "cpu")
    prebuilt = tmp_path / f"fusedrnn_C.{stamp}.so"
    shutil.copy(so, prebuilt)
    hang = tmp_path / "hang"
    hang.mkdir()
    (hang / "test_hang_cuda.py").write_text(HANG_TESTS)
    wrapper = tmp_path / "python"
    wrapper.write_text(WRAPPER.format(python=sys.executable, hang=str(hang)))
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    res = _dry_run(
        repo,
        out,
        PYTHON=str(wrapper),
        GPU_CHECK_PREBUILT=str(prebuilt),
        GPU_CHECK_CAP_pytest="12",
        GPU_CHECK_CAP_bench_float32="15",
        GPU_CHECK_COMPILE_MIN_S="100000",
    )
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-2000:]  # pytest timed out
    doc = json.loads((out / "summary.json").read_text())
    stages = {st["stage"]: st for st in doc["stages"]}
    assert doc["ok"] is False and doc["final"] is True and doc["layout"]["ok"] is True

    assert stages["build"]["status"] == "reused"
    assert "GPU_CHECK_PREBUILT" in stages["build"]["detail"]
    assert (repo / "fusedrnn" / so.name).read_bytes() == so.read_bytes()
    assert (repo / "build" / "gpu_check.stamp").read_text().strip() == stamp
    assert (out / f"fusedrnn_C.{stamp}.so").is_file()

    # pytest: stopped at its limit, the test that was running named, the finished one counted
    assert stages["pytest"]["status"] == "FAIL" and stages["pytest"]["seconds"] <= 12 + 20
    assert "timed out" in stages["pytest"]["detail"]
    assert "test_hang_cuda.py::test_cuda_hangs" in stages["pytest"]["detail"]
    py = doc["pytest"]
    assert py["passed"] == 1 and [n.split("::")[-1] for n in py["unfinished"]] == [
        "test_cuda_hangs"
    ]
    assert any("test_cuda_hangs did not finish" in f for f in doc["failures"])

    # the fp32 benchmark: stopped by SIGTERM at its limit, with the cases it finished
    assert stages["bench_float32"]["status"] == "timeout"
    partial = json.loads((out / "bench" / "results_float32.json").read_text())
    assert partial["complete"] is False and partial["interrupted"] is True
    assert partial["interrupt_reason"] == "SIGTERM"
    assert 0 < partial["cases_done"] < partial["cases_total"]
    assert len(partial["results"]) >= 2 and all(
        r["impls"]["fused"]["status"] == "ok" for r in partial["results"]
    )
    # and every later stage still ran
    for name in ("inline", "bench_bfloat16", "memcheck", "plot"):
        assert stages[name]["status"] == "ok", stages[name]
    assert stages["bench_compiled"]["status"] == "skipped"
    assert "GPU_CHECK_COMPILE_MIN_S" in stages["bench_compiled"]["detail"]
    assert res.stdout.rstrip().endswith((out / "summary.txt").read_text().rstrip())
    assert "overall: FAIL" in res.stdout.rstrip().splitlines()[-1]


HANG_INLINE = """\
#!{python}
import os, sys
argv = sys.argv[1:]
if argv and argv[0].endswith("gpu_check_inline.py") and "--tiny" not in argv:
    os.execvp("sleep", ["sleep", "600"])
os.execv({python!r}, [{python!r}] + argv)
"""


@nested
def test_sigterm_to_the_check_still_publishes(tmp_path):
    """SIGTERM to the script while a stage runs: that stage is stopped and marked interrupted,
    the later ones are marked not run, and the summary is still written and printed last."""
    _extension()
    wrapper = tmp_path / "python"
    wrapper.write_text(HANG_INLINE.format(python=sys.executable))
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=str(wrapper), OMP_NUM_THREADS="1")
    env.pop("GPU_CHECK_NESTED", None)
    proc = subprocess.Popen(
        ["bash", str(CHECK), "--dry-run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until the inline stage (which hangs) has started
            summary = out / "summary.json"
            if summary.exists() and any(
                st["stage"] == "build" and st["status"] != "not run"
                for st in json.loads(summary.read_text())["stages"]
            ):
                break
            time.sleep(0.5)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    doc = json.loads((out / "summary.json").read_text())
    stages = {st["stage"]: st for st in doc["stages"]}
    assert doc["stopped"] == "SIGTERM" and doc["final"] is True and doc["ok"] is False
    assert stages["build"]["status"] == "reused"
    assert stages["inline"]["status"] == "interrupted"
    assert all(stages[n]["status"] == "not run" for n in report.STAGES[3:])
    assert stdout.rstrip().endswith((out / "summary.txt").read_text().rstrip())
    assert "overall: FAIL" in stdout.rstrip().splitlines()[-1]
    assert len(_files(out)) <= MAX_FILES


def test_report_reads_a_stopped_pytest_log(tmp_path):
    """Without junit XML (pytest killed), the -v log gives each finished test's outcome and
    the test still running."""
    log = tmp_path / "pytest.log"
    log.write_text(
        "tests/test_cuda.py::test_a[lstm] PASSED    [ 33%]\n"
        "tests/test_cuda.py::test_a[gru] FAILED     [ 66%]\n"
        "tests/test_cuda.py::test_b[wm_lstm] Timeout (0:01:30)!\n"
        "Thread 0x1 (most recent call first):\n"
    )
    sec = report.pytest_section(str(tmp_path / "missing.xml"), str(log))
    assert sec["source"] == "pytest -v log"
    assert (sec["passed"], sec["failed"], sec["skipped"]) == (1, 1, 0)
    assert sec["failed_tests"][0]["test"] == "tests/test_cuda.py::test_a[gru]"
    assert sec["unfinished"] == ["tests/test_cuda.py::test_b[wm_lstm]"]
    # with the junit XML pytest writes on SIGINT: the stopped test's nameless entry is no pass
    (tmp_path / "pytest.xml").write_text(
        '<testsuites><testsuite tests="2"><testcase classname="tests.test_cuda" name="test_a[lstm]"'
        ' time="1.5" /><testcase classname="tests.test_cuda" name="test_a[gru]" time="0.5">'
        '<failure message="AssertionError: max abs err 3e-4">...</failure></testcase>'
        '<testcase time="0.000" /></testsuite></testsuites>'
    )
    sec = report.pytest_section(str(tmp_path / "pytest.xml"), str(log))
    assert sec["source"] == "junit xml"
    assert (sec["passed"], sec["failed"], sec["errors"]) == (1, 1, 0)
    assert sec["failed_tests"] == [
        {
            "test": "tests.test_cuda::test_a[gru]",
            "outcome": "failed",
            "message": "AssertionError: max abs err 3e-4",
        }
    ]
    assert sec["slowest"][0] == {"test": "tests.test_cuda::test_a[lstm]", "seconds": 1.5}
    assert sec["unfinished"] == ["tests/test_cuda.py::test_b[wm_lstm]"]


def test_report_layout_rule():
    ok = ["summary.json", "bench/a.json", "a/b/c.txt"]
    assert report.layout(ok)["ok"] is True
    assert report.layout(ok + ["a/b/c/d.txt"])["ok"] is False  # three folders deep
    assert report.layout([f"f{k}" for k in range(9)])["ok"] is False  # nine files


def test_stamp_follows_sources_and_target(tmp_path, monkeypatch):
    for name in ("FUSEDRNN_CPU_ARCH", "FUSEDRNN_QUICK_BUILD", "FUSEDRNN_DEBUG_INFO"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cu").write_text("// kernel\n")
    (tmp_path / "setup.py").write_text("# setup\n")
    first = report.stamp(str(tmp_path), "cuda:9.0")
    assert len(first) == 16 and int(first, 16) >= 0
    assert report.stamp(str(tmp_path), "cuda:9.0") == first
    assert report.stamp(str(tmp_path), "cpu") != first
    # an unoptimised build is another build
    monkeypatch.setenv("FUSEDRNN_QUICK_BUILD", "1")
    assert report.stamp(str(tmp_path), "cuda:9.0") != first
    monkeypatch.delenv("FUSEDRNN_QUICK_BUILD")
    (tmp_path / "csrc" / "a.cu").write_text("// kernel, changed\n")
    assert report.stamp(str(tmp_path), "cuda:9.0") != first


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_inline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_inline_checker_rejects_wrong_results():
    """The script's Checker fails a result that is off by more than the tolerance of design.md
    §4: fp32 off by 1e-4 in one element, a bf16 result with 3x the error of the bf16 reference,
    a missing output, a NaN; and passes the exact result."""
    mod = _load_script()
    case = mod.Case("lstm", "time_major", T=3, B=3, I=4, H=5)
    ref = mod.run(reference.layer, case, "cpu", torch.float64)
    lowp = mod.run(reference.layer, case, "cpu", torch.bfloat16)

    chk = mod.Checker()
    chk.compare("exact", ref, ref, torch.float32)
    assert chk.failures == [] and len(chk.records) == len(ref)

    off = dict(ref)
    off["grad_weight_hh"] = ref["grad_weight_hh"].clone()
    off["grad_weight_hh"].view(-1)[7] += 1e-4  # 10x the absolute term of the fp32 rule
    chk.compare("fp32 off", off, ref, torch.float32)
    assert len(chk.failures) == 1 and "grad_weight_hh" in chk.failures[0]

    worse = {k: r + 3 * (lowp[k] - r) for k, r in ref.items()}
    chk.compare("bf16 3x", worse, ref, torch.bfloat16, lowp)
    assert len(chk.failures) > 1

    n = len(chk.failures)
    chk.compare("missing", {k: v for k, v in ref.items() if k != "c_n"}, ref, torch.float64)
    assert len(chk.failures) == n + 1

    nan = dict(ref)
    nan["output"] = ref["output"].clone()
    nan["output"][0, 0, 0] = float("nan")
    ok, bound = within_tolerance(nan["output"], ref["output"], torch.float64)
    assert not ok and bound == "finite values"


def test_layer_case_runs_fused_cpu_within_tolerance():
    """The shared case builder and runner: the fused CPU op on a projection case in fp32 meets
    the fp32 rule against the fp64 reference (a check of the helpers the CUDA tests use)."""
    args = make_layer_args("wm_lstm", "packed_reverse", proj=4)
    got = layer_results(functional.rnn_layer, "wm_lstm", args, "cpu", torch.float32)
    ref = layer_results(reference.layer, "wm_lstm", args, "cpu", torch.float64)
    assert set(got) == set(ref) and "grad_weight_hr" in got and "grad_weight_ch" in got
    for k in ref:
        ok, bound = within_tolerance(got[k], ref[k], torch.float32)
        assert ok, f"{k}: bound {bound}"
