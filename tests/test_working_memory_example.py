"""examples/working_memory.py: a tiny end-to-end run (in-process), its JSON, plot and table."""

import importlib.util
import json
import os

# The example's dependencies are part of the test install (README command 1): a missing one is
# an install error and must fail here, not skip.
import matplotlib  # noqa: F401,E402
import pytest
import sklearn  # noqa: F401,E402
import torch
import tqdm  # noqa: F401,E402

import fusedrnn

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "working_memory.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("working_memory_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("working_memory")
    argv = ["--tiny", "--no-progress", "--out", str(out)]
    if fusedrnn.backend() != "fused":
        argv.append("--allow-reference")
    threads, flush = (
        torch.get_num_threads(),
        torch.is_flush_denormal_enabled() if hasattr(torch, "is_flush_denormal_enabled") else False,
    )
    try:
        result = example.main(argv)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(flush)
    with open(out / "results.json") as f:
        saved = json.load(f)
    return example, out, result, saved


def test_outputs_written(tiny_run):
    _, out, result, saved = tiny_run
    assert (out / "learning_curves.png").stat().st_size > 0
    for key in (
        "config",
        "environment",
        "tasks",
        "runs",
        "summary",
        "table",
        "eager_timing",
        "denormal_check",
        "timings",
        "digits_permutation",
    ):
        assert key in saved, key
    env = saved["environment"]
    assert env["backend"] == fusedrnn.backend() and env["threads"] == 1
    assert env["flush_denormal"] is True and env["torch"] == torch.__version__
    assert sorted(saved["digits_permutation"]) == list(range(64))
    assert saved["digits_permutation"] != list(range(64))
    assert result["summary"].keys() == saved["summary"].keys()


def test_runs_and_curves_have_the_configured_shape(tiny_run):
    example, _, _, saved = tiny_run
    cfg = saved["config"]
    models, seeds = cfg["models"], cfg["seeds"]
    tasks = ["digits", "pdigits", "adding50"]
    assert list(saved["tasks"]) == tasks
    assert len(saved["runs"]) == len(tasks) * len(models) * seeds
    assert {(r["task"], r["model"], r["seed"]) for r in saved["runs"]} == {
        (t, m, s) for t in tasks for m in models for s in range(seeds)
    }
    for r in saved["runs"]:
        info = saved["tasks"][r["task"]]
        n_points = (
            cfg["digits_epochs"]
            if info["kind"] == "classification"
            else cfg["adding_steps"] // cfg["adding_eval_every"]
        ) + 1
        assert len(r["points"]) == n_points
        assert r["points"][0]["step"] == 0 and r["points"][-1]["step"] == r["steps"]
        assert r["final"] == r["points"][-1][info["metric"]]
        assert r["mid"] in [p[info["metric"]] for p in r["points"]]
        for p in r["points"]:
            if info["kind"] == "classification":
                assert 0.0 <= p["test_acc"] <= 1.0 and p["test_loss"] > 0
            else:
                assert p["test_mse"] > 0
    for task in tasks:
        assert set(saved["summary"][task]) == set(models)
        for s in saved["summary"][task].values():
            assert s["n"] == seeds and len(s["final"]) == seeds and s["final_std"] >= 0
    assert saved["tasks"]["adding50"]["trivial_mse"] == pytest.approx(1 / 6)
    for model in models:
        assert model in saved["table"]


def test_training_loss_decreases_for_every_model(tiny_run):
    _, _, _, saved = tiny_run
    for task in saved["tasks"]:
        for model in saved["config"]["models"]:
            runs = [r for r in saved["runs"] if r["task"] == task and r["model"] == model]
            first = sum(r["points"][1]["train_loss"] for r in runs) / len(runs)
            last = sum(r["points"][-1]["train_loss"] for r in runs) / len(runs)
            assert last < first, (task, model, first, last)


def test_eager_timing_and_denormal_check(tiny_run):
    _, _, _, saved = tiny_run
    eager = saved["eager_timing"]
    assert set(eager["models"]) == set(saved["config"]["models"])
    for r in eager["models"].values():
        assert r["speedup"] > 0 and len(r["fused"]["losses"]) == eager["steps"] + 1
        # the eager loop runs the same network: the same gradients at the same weights, and
        # (over these few steps) the same losses
        assert r["grad_rel_diff"] < 1e-4 and r["max_loss_diff"] < 1e-3
    den = saved["denormal_check"]["scenarios"]
    assert set(den) == {"normal", "denormal-states", "saturated-gates"}
    assert den["normal"]["denormal_frac_output"] == 0.0
    assert den["denormal-states"]["denormal_frac_output"] > 0.5
    for r in den.values():
        assert all(
            r[k] > 0
            for k in (
                "fused_ms_flush_off",
                "fused_ms_flush_on",
                "eager_ms_flush_off",
                "eager_ms_flush_on",
            )
        )


def test_adding_problem_data(example):
    x, y = example.adding_batch(256, 20, torch.Generator().manual_seed(0))
    assert x.shape == (20, 256, 2) and y.shape == (256, 1)
    markers = x[..., 1]
    assert torch.all(markers.sum(0) == 2)
    assert torch.all(markers[:10].sum(0) == 1) and torch.all(markers[10:].sum(0) == 1)
    torch.testing.assert_close(y[:, 0], (x[..., 0] * markers).sum(0))
    assert 0 <= float(x[..., 0].min()) and float(x[..., 0].max()) <= 1


def test_eager_wrapper_matches_fused_module(example):
    for name in example.MODELS:
        torch.manual_seed(0)
        cfg = example.Config()
        model = example.build_model(name, 2, 3, cfg, seed=0)
        twin = example.eager_copy(model)
        x = torch.rand(7, 5, 2)
        # in training, as the example runs them: the same seed draws the same DropConnect mask
        torch.manual_seed(1)
        got = twin(x)
        torch.manual_seed(1)
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)


def test_refuses_the_reference_backend(example, monkeypatch, tmp_path):
    monkeypatch.setattr(fusedrnn, "backend", lambda: "reference")
    with pytest.raises(SystemExit) as info:
        example.main(["--tiny", "--no-progress", "--out", str(tmp_path)])
    assert "not 'fused'" in str(info.value.code) and "--allow-reference" in str(info.value.code)
    assert not (tmp_path / "results.json").exists()
