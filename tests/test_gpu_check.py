"""The GPU check (scripts/gpu_check.sh and its inline stage, scripts/gpu_check_inline.py) only
proves anything on a machine with a GPU, which most runs of this suite do not have. What can be
checked here is checked here, so that a mistake in the script never costs GPU time: the shell
script parses, the inline stage runs end to end on the CPU fused path (`--device cpu`, the same
cases, dtypes and tolerance rule as on the GPU), and its tolerance rule rejects wrong results."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layer_cases import CELLS, make_layer_args, run_layer, within_tolerance
from fusedrnn import functional, reference

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check_inline.py"


def test_gpu_check_script_parses():
    res = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
def test_inline_check_dry_run_on_cpu(tmp_path, tiny):
    out = tmp_path / "inline.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)]
    res = subprocess.run(cmd + (["--tiny"] if tiny else []), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["tiny"] is tiny and doc["failures"] == []
    records = doc["records"]
    assert len(records) == doc["checks"] > 100 and all(r["ok"] for r in records)
    dtypes = {"float32", "bfloat16"} if tiny else {"float64", "float32", "bfloat16", "float16"}
    assert {r["dtype"] for r in records} == dtypes
    assert {r["check"].split("/")[0] for r in records} == set(CELLS)


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_inline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_inline_checker_rejects_wrong_results():
    """The script's Checker fails a result that is off by more than the SPEC tolerance: fp32
    off by 1e-4 in one element, a bf16 result with 3x the error of the bf16 reference,
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
    got = run_layer(functional.rnn_layer, "wm_lstm", args, "cpu", torch.float32)
    ref = run_layer(reference.layer, "wm_lstm", args, "cpu", torch.float64)
    assert set(got) == set(ref) and "grad_weight_hr" in got and "grad_weight_ch" in got
    for k in ref:
        ok, bound = within_tolerance(got[k], ref[k], torch.float32)
        assert ok, f"{k}: bound {bound}"
