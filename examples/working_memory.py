#!/usr/bin/env python
"""Working-memory connections in practice: LSTM, peephole LSTM, LSTM-WM and GRU, all fused.

Trains `fusedrnn.LSTM`, `fusedrnn.PeepholeLSTM`, `fusedrnn.WorkingMemoryLSTM` and `fusedrnn.GRU`
(one layer, hidden 64, a linear head on the last hidden state, Adam, gradient clipping), and on
request (`--models LSTM,LayerNormLSTM+DC,LayerNormLSTM+DC+ZO`) the regularised LSTMs:
`fusedrnn.LayerNormLSTM` with `dropconnect=0.25`, and with `zoneout=0.1` besides, on

* sequential digits: scikit-learn's bundled 8x8 digits read pixel by pixel (T = 64, one feature
  per step, scaled to [0, 1]), plain and with one fixed (seeded) pixel permutation, with a fixed
  stratified held-out test split;
* the adding problem (Hochreiter & Schmidhuber 1997): T steps of (uniform value, marker) with
  exactly two markers, one in each half; the target is the sum of the two marked values. The
  trivial predictor (always 1) has test MSE 1/6.

It prints a table (mean ± std over seeds of the final test metric and of the metric at the
mid-training checkpoint), the fused-vs-eager training speed-up and a denormal check, and writes
`results.json` (every per-seed curve, config, timings, environment) and `learning_curves.png`
into `--out`.

    PYTHONPATH=. python examples/working_memory.py --quick       # < 10 min on one CPU thread
    PYTHONPATH=. python examples/working_memory.py               # full: 5 seeds, T up to 200

The models must run on the fused ops: the script stops when `fusedrnn.backend()` is not "fused"
unless `--allow-reference` is given.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List

import numpy as np
import torch
from torch import nn

try:
    import fusedrnn
except ImportError:  # run from a checkout without PYTHONPATH: the package is one folder up
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import fusedrnn
from fusedrnn import reference

DROPCONNECT = 0.25  # the recurrent weight's DropConnect rate of the regularised LSTMs
ZONEOUT = 0.1  # both states' zoneout rate of the zoned one (Tacotron 2's)


class RegularisedLSTM(fusedrnn.LayerNormLSTM):
    """The layer-normalised LSTM (Ba et al. 2016) with DropConnect on its recurrent weight
    (AWD-LSTM's weight drop): the regularised layer to compare with the plain LSTM."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size, dropconnect=DROPCONNECT)


class ZonedLSTM(fusedrnn.LayerNormLSTM):
    """The regularised LSTM with zoneout (Krueger et al. 2016) on both states besides."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size, dropconnect=DROPCONNECT, zoneout=ZONEOUT)


MODELS = {  # display name -> (cell name of the fused ops / fusedrnn.reference, module class)
    "LSTM": ("lstm", fusedrnn.LSTM),
    "PeepholeLSTM": ("peephole_lstm", fusedrnn.PeepholeLSTM),
    "WorkingMemoryLSTM": ("wm_lstm", fusedrnn.WorkingMemoryLSTM),
    "GRU": ("gru", fusedrnn.GRU),
    "LayerNormLSTM+DC": ("lstm", RegularisedLSTM),
    "LayerNormLSTM+DC+ZO": ("lstm", ZonedLSTM),
}
# The models of a run without --models: the four cells (the regularised LSTM on request).
DEFAULT_MODELS = ("LSTM", "PeepholeLSTM", "WorkingMemoryLSTM", "GRU")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "working_memory")
TRIVIAL_ADDING_MSE = 1.0 / 6.0


@dataclasses.dataclass
class Config:
    mode: str = "full"
    seeds: int = 5
    hidden: int = 64
    clip: float = 1.0  # gradient-norm clipping (0: off)
    # sequential digits
    digits_epochs: int = 50
    digits_batch: int = 64
    digits_lr: float = 2e-2
    digits_schedule: str = "cosine"  # "cosine" (per step, to 0 at the end) or "constant"
    digits_train_limit: int = 0  # > 0: train on the first N training samples only
    digits_test_limit: int = 0  # > 0: evaluate on the first N test samples only
    test_fraction: float = 0.25
    split_seed: int = 0
    perm_seed: int = 1234
    # adding problem (fresh training batches every step from a seeded generator)
    adding_T: tuple = (50, 100, 200)
    adding_steps: int = 3000
    adding_batch: int = 64
    adding_lr: float = 5e-3
    adding_schedule: str = "constant"  # a constant rate leaves the 1/6 plateau sooner
    adding_eval_every: int = 100
    adding_test_size: int = 2000
    adding_test_seed: int = 10_000
    # side measurements
    eager_steps: int = 0  # 0: one epoch of the digits training set
    denormal_T: int = 64
    denormal_batch: int = 64
    denormal_repeats: int = 9
    # run
    models: tuple = DEFAULT_MODELS
    tasks: tuple = ()  # () -> digits, pdigits, adding<T> for every T
    threads: int = 1
    flush_denormal: bool = True
    device: str = "cpu"


PRESETS = {
    "full": {},
    "quick": dict(
        seeds=3,
        digits_epochs=30,
        adding_T=(50,),
        adding_steps=1100,
        adding_eval_every=50,
        adding_test_size=1000,
    ),
    "tiny": dict(
        seeds=2,
        digits_epochs=3,
        digits_batch=32,
        digits_lr=1e-2,
        digits_train_limit=160,
        digits_test_limit=128,
        adding_T=(50,),
        adding_steps=30,
        adding_batch=32,
        adding_eval_every=15,
        adding_test_size=128,
        eager_steps=2,
        denormal_T=8,
        denormal_batch=8,
        denormal_repeats=2,
    ),
}


# ----------------------------------------------------------------------------------------------
# models
class EagerRNN(nn.Module):
    """One-layer recurrent module that runs `fusedrnn.reference.layer` (the eager per-step
    PyTorch loop) over the parameters of a fused module. Same call and return convention."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.fused = fused
        self.cell = next(c for c, cls in MODELS.values() if type(fused) is cls)

    def forward(self, x):
        r = self.fused
        # DropConnect as the module draws it: one mask per call (none at rate 0 or in eval)
        w_hh = reference.dropconnect(r.weight_hh_l0, r.dropconnect, r.training)
        args = reference.LayerArgs(
            x,
            r.weight_ih_l0,
            w_hh,
            getattr(r, "bias_ih_l0", None),
            getattr(r, "bias_hh_l0", None),
            getattr(r, "weight_ch_l0", None),
        )
        ln = r._ln_params(0, 0) if r._layer_norm else ()  # the layer-normalised equations
        keep = None
        if r.zoneout and not r.training:  # zoneout in eval: the expectation
            keep = (r.zoneout, r.zoneout)
        elif r.zoneout:  # the masks as the module draws them: the cell state's, then h's
            rows, H = x.shape[0] * x.shape[1], r.hidden_size
            keep = tuple(reference.zoneout_masks(rows, H, r.zoneout, x) for _ in range(2))
        out, h, c = reference.layer_of(self.cell, args, ln, keep)
        return (out, h[None]) if c is None else (out, (h[None], c[None]))


class SequenceModel(nn.Module):
    """Recurrent layer over (T, B, I) input, linear head on the last hidden state."""

    def __init__(self, rnn: nn.Module, hidden: int, n_out: int):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])


def build_model(name: str, n_in: int, n_out: int, cfg: Config, seed: int) -> SequenceModel:
    torch.manual_seed(seed)
    rnn = MODELS[name][1](n_in, cfg.hidden)
    return SequenceModel(rnn, cfg.hidden, n_out).to(cfg.device)


def eager_copy(model: SequenceModel) -> SequenceModel:
    """The same network (a copy of the same weights) running the eager reference loop."""
    twin = copy.deepcopy(model)
    twin.rnn = EagerRNN(twin.rnn)
    return twin


# ----------------------------------------------------------------------------------------------
# data
def load_digits_data(cfg: Config) -> Dict[str, dict]:
    """Plain and permuted sequential digits: time-major (64, N, 1) float tensors in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = digits.images.reshape(len(digits.images), 64).astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=cfg.test_fraction, stratify=y, random_state=cfg.split_seed
    )
    if cfg.digits_train_limit:
        X_tr, y_tr = X_tr[: cfg.digits_train_limit], y_tr[: cfg.digits_train_limit]
    if cfg.digits_test_limit:
        X_te, y_te = X_te[: cfg.digits_test_limit], y_te[: cfg.digits_test_limit]
    perm = np.random.RandomState(cfg.perm_seed).permutation(64)

    def seq(a):  # (N, 64) -> (64, N, 1)
        return torch.from_numpy(np.ascontiguousarray(a.T)).unsqueeze(-1).to(cfg.device)

    out = {}
    for task, order in (("digits", np.arange(64)), ("pdigits", perm)):
        out[task] = dict(
            x_train=seq(X_tr[:, order]),
            y_train=torch.from_numpy(y_tr).to(cfg.device),
            x_test=seq(X_te[:, order]),
            y_test=torch.from_numpy(y_te).to(cfg.device),
            permutation=order.tolist(),
        )
    return out


def adding_batch(n: int, T: int, gen: torch.Generator, device="cpu"):
    """n sequences of the adding problem: x (T, n, 2) = (value, marker), y (n, 1)."""
    values = torch.rand(n, T, generator=gen)
    first = torch.randint(0, T // 2, (n,), generator=gen)
    second = torch.randint(T // 2, T, (n,), generator=gen)
    rows = torch.arange(n)
    markers = torch.zeros(n, T)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], -1).transpose(0, 1).contiguous()
    y = (values[rows, first] + values[rows, second]).unsqueeze(1)
    return x.to(device), y.to(device)


def task_list(cfg: Config) -> List[str]:
    return (
        list(cfg.tasks)
        if cfg.tasks
        else ["digits", "pdigits"] + [f"adding{T}" for T in cfg.adding_T]
    )


def task_info(task: str) -> dict:
    if task in ("digits", "pdigits"):
        return dict(
            kind="classification",
            metric="test_acc",
            higher_is_better=True,
            T=64,
            n_in=1,
            n_out=10,
            x_axis="epoch",
            description=(
                "sequential 8x8 digits, pixel by pixel"
                if task == "digits"
                else "sequential 8x8 digits, fixed random pixel permutation"
            ),
        )
    T = int(task[len("adding") :])
    return dict(
        kind="regression",
        metric="test_mse",
        higher_is_better=False,
        T=T,
        n_in=2,
        n_out=1,
        x_axis="step",
        trivial_mse=TRIVIAL_ADDING_MSE,
        description=f"adding problem, T={T}",
    )


# ----------------------------------------------------------------------------------------------
# training
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step(model, opt, loss, clip, sched=None):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if sched is not None:
        sched.step()


def make_optimizer(model: nn.Module, lr: float, total_steps: int, schedule: str):
    """Adam; with schedule "cosine" the learning rate decays to 0 over total_steps."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
        if schedule == "cosine"
        else None
    )
    return opt, sched


@torch.no_grad()
def evaluate(model: nn.Module, task: str, data: dict) -> dict:
    model.eval()
    out = model(data["x_test"])
    model.train()
    if task_info(task)["kind"] == "classification":
        return dict(
            test_loss=float(nn.functional.cross_entropy(out, data["y_test"])),
            test_acc=float((out.argmax(1) == data["y_test"]).float().mean()),
        )
    return dict(test_mse=float(nn.functional.mse_loss(out, data["y_test"])))


def digits_batches(n: int, batch: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    return [order[i : i + batch] for i in range(0, n, batch)]


def train_digits(model, task, data, cfg: Config, seed: int, progress=None) -> dict:
    n = data["x_train"].shape[1]
    opt, sched = make_optimizer(
        model, cfg.digits_lr, steps_per_run("digits", cfg, n), cfg.digits_schedule
    )
    gen = torch.Generator().manual_seed(seed)
    points = [dict(epoch=0, step=0, train_loss=None, elapsed_s=0.0, **evaluate(model, task, data))]
    step, t_train = 0, 0.0
    for epoch in range(1, cfg.digits_epochs + 1):
        _sync(cfg.device)
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for idx in digits_batches(n, cfg.digits_batch, gen):
            idx = idx.to(cfg.device)
            loss = nn.functional.cross_entropy(model(data["x_train"][:, idx]), data["y_train"][idx])
            _step(model, opt, loss, cfg.clip, sched)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            step += 1
            if progress is not None:
                progress.update(1)
        _sync(cfg.device)
        t_train += time.perf_counter() - t0
        points.append(
            dict(
                epoch=epoch,
                step=step,
                train_loss=total / count,
                elapsed_s=t_train,
                **evaluate(model, task, data),
            )
        )
    return dict(points=points, train_s=t_train, steps=step)


def train_adding(model, task, data, cfg: Config, seed: int, progress=None) -> dict:
    T = task_info(task)["T"]
    opt, sched = make_optimizer(model, cfg.adding_lr, cfg.adding_steps, cfg.adding_schedule)
    gen = torch.Generator().manual_seed(seed * 1000 + T)
    points = [dict(step=0, train_loss=None, elapsed_s=0.0, **evaluate(model, task, data))]
    t_train, total, count = 0.0, 0.0, 0
    for step in range(1, cfg.adding_steps + 1):
        x, y = adding_batch(cfg.adding_batch, T, gen, cfg.device)
        _sync(cfg.device)
        t0 = time.perf_counter()
        loss = nn.functional.mse_loss(model(x), y)
        _step(model, opt, loss, cfg.clip, sched)
        total += float(loss.detach())
        count += 1
        _sync(cfg.device)
        t_train += time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
        if step % cfg.adding_eval_every == 0 or step == cfg.adding_steps:
            points.append(
                dict(
                    step=step,
                    train_loss=total / count,
                    elapsed_s=t_train,
                    **evaluate(model, task, data),
                )
            )
            total, count = 0.0, 0
    return dict(points=points, train_s=t_train, steps=cfg.adding_steps)


def steps_per_run(task: str, cfg: Config, n_digits_train: int) -> int:
    if task_info(task)["kind"] == "classification":
        return cfg.digits_epochs * math.ceil(n_digits_train / cfg.digits_batch)
    return cfg.adding_steps


def mid_point(points: List[dict]) -> dict:
    """The evaluation closest to half of the training budget (the earlier one on a tie)."""
    last = points[-1]["step"]
    return min(points, key=lambda p: (abs(p["step"] - last / 2), p["step"]))


def train_run(
    task: str, model_name: str, seed: int, data: dict, cfg: Config, progress=None
) -> dict:
    info = task_info(task)
    model = build_model(model_name, info["n_in"], info["n_out"], cfg, seed)
    t0 = time.perf_counter()
    if info["kind"] == "classification":
        res = train_digits(model, task, data, cfg, seed, progress)
    else:
        res = train_adding(model, task, data, cfg, seed, progress)
    metric = info["metric"]
    mid = mid_point(res["points"])
    return dict(
        task=task,
        model=model_name,
        seed=seed,
        n_params=sum(p.numel() for p in model.parameters()),
        final=res["points"][-1][metric],
        mid=mid[metric],
        mid_step=mid["step"],
        mid_epoch=mid.get("epoch"),
        steps=res["steps"],
        train_s=res["train_s"],
        wall_s=time.perf_counter() - t0,
        points=res["points"],
    )


def summarize(runs: List[dict]) -> Dict[str, Dict[str, dict]]:
    """task -> model -> mean and sample std (ddof=1) over seeds of the final and mid metric."""
    out: Dict[str, Dict[str, dict]] = {}
    for r in runs:
        out.setdefault(r["task"], {}).setdefault(r["model"], {"final": [], "mid": []})
        out[r["task"]][r["model"]]["final"].append(r["final"])
        out[r["task"]][r["model"]]["mid"].append(r["mid"])
    for task, per_model in out.items():
        for model, v in per_model.items():
            f, m = np.array(v["final"]), np.array(v["mid"])

            def sd(a):
                return float(a.std(ddof=1)) if len(a) > 1 else 0.0

            per_model[model] = dict(
                n=len(f),
                final_mean=float(f.mean()),
                final_std=sd(f),
                mid_mean=float(m.mean()),
                mid_std=sd(m),
                final=v["final"],
                mid=v["mid"],
            )
    return out


# ----------------------------------------------------------------------------------------------
# side measurements
def eager_speedup(cfg: Config, digits: dict, models) -> dict:
    """Train each model for the same steps of plain digits (the batches of epoch 1) with the
    fused ops and with the eager reference loop over a copy of the same weights; report the time
    per step and the speed-up. Agreement: the relative difference of the gradients of one batch
    at identical weights (the two fp32 trajectories themselves drift apart over many steps, as
    any two summation orders do after a loss spike; their loss difference is kept as well)."""
    data = digits["digits"]
    n = data["x_train"].shape[1]
    batches = digits_batches(n, cfg.digits_batch, torch.Generator().manual_seed(0))
    steps = cfg.eager_steps or len(batches)
    batches = [batches[i % len(batches)] for i in range(steps + 1)]  # +1: untimed warm-up step
    out = {"task": "digits", "steps": steps, "batch": cfg.digits_batch, "models": {}}

    def batch_loss(model, idx):
        return nn.functional.cross_entropy(model(data["x_train"][:, idx]), data["y_train"][idx])

    for name in models:
        fused_model = build_model(name, 1, 10, cfg, seed=0)
        eager_model = eager_copy(fused_model)
        grads = []
        for model in (fused_model, eager_model):
            torch.manual_seed(0)  # the same DropConnect mask for both
            batch_loss(model, batches[0]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
        res = {
            "grad_rel_diff": max(
                float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(*grads)
            )
        }
        for label, model in (("fused", fused_model), ("eager", eager_model)):
            opt = torch.optim.Adam(model.parameters(), lr=cfg.digits_lr)
            losses, elapsed = [], 0.0
            for k, idx in enumerate(batches):
                _sync(cfg.device)
                t0 = time.perf_counter()
                loss = batch_loss(model, idx)
                _step(model, opt, loss, cfg.clip)
                _sync(cfg.device)
                if k > 0:
                    elapsed += time.perf_counter() - t0
                losses.append(float(loss.detach()))
            res[label] = dict(total_s=elapsed, ms_per_step=1e3 * elapsed / steps, losses=losses)
        res["speedup"] = res["eager"]["total_s"] / res["fused"]["total_s"]
        res["max_loss_diff"] = max(
            abs(a - b) for a, b in zip(res["fused"]["losses"], res["eager"]["losses"])
        )
        out["models"][name] = res
    sp = [v["speedup"] for v in out["models"].values()]
    out["speedup_geomean"] = float(np.exp(np.mean(np.log(sp))))
    return out


def _denormal_fraction(t: torch.Tensor) -> float:
    """Share of the elements that are subnormal (call with flush-denormal off: with it on the
    comparisons read subnormal inputs as zero)."""
    t = t.detach().float()
    a = t.abs()
    return float(((a > 0) & (a < torch.finfo(torch.float32).tiny)).float().mean())


def denormal_check(cfg: Config) -> dict:
    """Time a working-memory LSTM forward+backward (fused ops, and the eager reference loop for
    comparison) in three regimes, with flush-denormal off and on:

    * normal: the experiment's shape, default initialisation, inputs in [0, 1];
    * denormal-states: zero biases and inputs scaled by 1e-38, so every pre-activation, gate
      input, cell and hidden state of the forward pass is subnormal (as are the input-weight
      gradients of the backward);
    * saturated-gates: i, f, o biases at -90, so those gates and their derivatives are
      subnormal (sigmoid(-90) ~ 1e-39): strongly saturated gates.

    Denormal counts are read from the fused op's saved workspace with flush-denormal off. The
    repeats of all twelve (regime, flush mode, implementation) cases are interleaved so that a
    change of the machine's load hits all of them alike; the best time of each is the figure
    compared (the median is kept too)."""
    flush_before = (
        torch.is_flush_denormal_enabled()
        if hasattr(torch, "is_flush_denormal_enabled")
        else cfg.flush_denormal
    )
    T, B, H = cfg.denormal_T, cfg.denormal_batch, cfg.hidden
    out = {
        "shape": dict(T=T, B=B, I=1, H=H),
        "repeats": cfg.denormal_repeats,
        "statistic": "best of the interleaved repeats (ms); medians in *_median_ms_*",
        "scenarios": {},
    }

    def build(scenario: str):
        torch.manual_seed(0)
        m = fusedrnn.WorkingMemoryLSTM(1, H).to(cfg.device)
        x = torch.rand(T, B, 1, device=cfg.device)
        with torch.no_grad():
            if scenario == "denormal-states":
                m.bias_ih_l0.zero_()
                m.bias_hh_l0.zero_()
                x = x * 1e-38
            elif scenario == "saturated-gates":
                b = m.bias_ih_l0.view(4, H)
                b[0], b[1], b[3] = -90.0, -90.0, -90.0
        weights = (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, m.weight_ch_l0)

        def fused():
            m.zero_grad(set_to_none=True)
            y, _ = m(x)
            y.sum().backward()

        def eager():
            m.zero_grad(set_to_none=True)
            y, _, _ = reference.layer("wm_lstm", x, *weights)
            y.sum().backward()

        res = {}
        fused()
        res["denormal_frac_output"] = _denormal_fraction(m(x)[0])
        res["denormal_frac_grad_weight_ih"] = _denormal_fraction(m.weight_ih_l0.grad)
        if fusedrnn.backend() == "fused":
            with torch.no_grad():
                ws = torch.ops.fusedrnn.wm_lstm_forward(x, *weights, None, None, None, None, False)[
                    3
                ]
            res["denormal_frac_workspace"] = _denormal_fraction(ws)
        return res, {"fused": fused, "eager": eager}

    scenarios = ("normal", "denormal-states", "saturated-gates")
    try:
        torch.set_flush_denormal(False)  # build the tensors with their subnormals kept
        fns = {}
        for scenario in scenarios:
            out["scenarios"][scenario], per_impl = build(scenario)
            for flush in (False, True):
                for impl, fn in per_impl.items():
                    fns[(scenario, flush, impl)] = fn
        # every (regime, flush mode, implementation) once per round, rounds repeated: a change
        # of the machine's load hits all of them alike
        times = {key: [] for key in fns}
        for rnd in range(cfg.denormal_repeats + 2):  # the first two rounds warm up
            for key, fn in fns.items():
                torch.set_flush_denormal(key[1])
                _sync(cfg.device)
                t0 = time.perf_counter()
                fn()
                _sync(cfg.device)
                if rnd >= 2:
                    times[key].append(1e3 * (time.perf_counter() - t0))
    finally:
        torch.set_flush_denormal(flush_before)
    for (scenario, flush, impl), v in times.items():
        key = "flush_on" if flush else "flush_off"
        out["scenarios"][scenario][f"{impl}_ms_{key}"] = min(v)
        out["scenarios"][scenario][f"{impl}_median_ms_{key}"] = float(np.median(v))
    base = out["scenarios"]["normal"]
    for res in out["scenarios"].values():
        for impl in ("fused", "eager"):
            res[f"{impl}_slowdown_flush_off"] = (
                res[f"{impl}_ms_flush_off"] / base[f"{impl}_ms_flush_off"]
            )
            res[f"{impl}_slowdown_flush_on"] = (
                res[f"{impl}_ms_flush_on"] / base[f"{impl}_ms_flush_on"]
            )
    return out


# ----------------------------------------------------------------------------------------------
# reporting
def _fmt(task: str, v: float) -> str:
    return f"{v:.3f}" if task_info(task)["kind"] == "classification" else f"{v:.4f}"


def format_table(summary: dict, runs: List[dict], models) -> str:
    """Markdown table: one row per task, one column per model, `final ± std (mid ± std)`."""
    lines = ["| task (metric) | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for task, per_model in summary.items():
        info = task_info(task)
        mids = {
            (r["mid_epoch"] if info["x_axis"] == "epoch" else r["mid_step"])
            for r in runs
            if r["task"] == task
        }
        mid_label = f"{info['x_axis']} {'/'.join(str(m) for m in sorted(mids))}"
        label = f"{task} ({'acc ↑' if info['higher_is_better'] else 'MSE ↓'}; mid = {mid_label})"
        cells = []
        for model in models:
            s = per_model.get(model)
            if s is None:
                cells.append("—")
                continue
            cells.append(
                f"{_fmt(task, s['final_mean'])} ± {_fmt(task, s['final_std'])} "
                f"({_fmt(task, s['mid_mean'])} ± {_fmt(task, s['mid_std'])})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_speedup(eager: dict) -> str:
    lines = [
        f"fused vs eager reference loop, {eager['steps']} training steps of digits "
        f"(batch {eager['batch']}, T=64, H=64), ms per step:",
        "| model | fused | eager | speed-up | gradient rel. diff |",
        "|---|---|---|---|---|",
    ]
    for name, r in eager["models"].items():
        lines.append(
            f"| {name} | {r['fused']['ms_per_step']:.1f} | {r['eager']['ms_per_step']:.1f}"
            f" | {r['speedup']:.2f}x | {r['grad_rel_diff']:.1e} |"
        )
    lines.append(f"geometric mean speed-up: {eager['speedup_geomean']:.2f}x")
    return "\n".join(lines)


def format_denormal(den: dict) -> str:
    s = den["shape"]
    lines = [
        f"denormal check, WorkingMemoryLSTM forward+backward, T={s['T']} B={s['B']} "
        f"H={s['H']}, best of {den['repeats']} interleaved runs, ms (x vs normal regime):",
        "| regime | subnormal share (workspace / output) | fused, flush off | fused, flush on"
        " | eager, flush off | eager, flush on |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in den["scenarios"].items():
        ws = r.get("denormal_frac_workspace")
        share = (f"{ws:.0%}" if ws is not None else "n/a") + f" / {r['denormal_frac_output']:.0%}"
        cells = [
            f"{r[f'{i}_ms_flush_{k}']:.1f} ({r[f'{i}_slowdown_flush_{k}']:.2f}x)"
            for i in ("fused", "eager")
            for k in ("off", "on")
        ]
        lines.append(f"| {name} | {share} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: List[dict], tasks: List[str], models, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        info = task_info(task)
        for model in models:
            rs = [r for r in runs if r["task"] == task and r["model"] == model]
            if not rs:
                continue
            xs = np.array([p[info["x_axis"]] for p in rs[0]["points"]])
            ys = np.array([[p[info["metric"]] for p in r["points"]] for r in rs])
            (line,) = ax.plot(xs, ys.mean(0), label=model)
            ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
        if info["kind"] == "regression":
            ax.axhline(TRIVIAL_ADDING_MSE, color="gray", ls="--", lw=1)
            ax.text(
                xs[-1],
                TRIVIAL_ADDING_MSE * 1.15,
                "trivial predictor (1/6)",
                ha="right",
                va="bottom",
                fontsize=7,
                color="gray",
            )
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1)
        ax.set_title(info["description"], fontsize=9)
        ax.set_xlabel(info["x_axis"])
        ax.set_ylabel(("test accuracy" if info["kind"] == "classification" else "test MSE"))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    n_seeds = len({r["seed"] for r in runs})
    fig.suptitle(
        f"fusedrnn: {' / '.join(models)}; line: mean over {n_seeds} seeds, band: min to max",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------
# command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="< 10 min on one CPU thread: 3 seeds, digits (plain and permuted) and adding T=50",
    )
    mode.add_argument("--tiny", action="store_true", help="a few steps of everything (tests)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    p.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...)")
    p.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--tasks", help="comma-separated subset of digits,pdigits,adding<T>")
    p.add_argument("--epochs", type=int, help="digits epochs")
    p.add_argument("--adding-steps", type=int, help="adding-problem training steps")
    p.add_argument("--adding-T", help="comma-separated adding-problem lengths, e.g. 50,100,200")
    p.add_argument("--lr", type=float, help="learning rate of every task")
    p.add_argument("--batch", type=int, help="batch size of every task")
    p.add_argument("--schedule", choices=("cosine", "constant"), help="learning-rate schedule")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--no-flush-denormal",
        action="store_true",
        help="keep subnormal floats (torch.set_flush_denormal(False))",
    )
    p.add_argument(
        "--allow-reference",
        action="store_true",
        help="run even when the compiled ops are not loaded (reference backend)",
    )
    p.add_argument("--skip-eager", action="store_true", help="skip the fused-vs-eager timing")
    p.add_argument("--skip-denormal", action="store_true", help="skip the denormal check")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    name = "quick" if args.quick else "tiny" if args.tiny else "full"
    cfg = Config(mode=name, **PRESETS[name])
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.models:
        cfg.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        bad = [m for m in cfg.models if m not in MODELS]
        if bad or not cfg.models:
            p.error(f"--models: unknown model(s) {bad}; choose from {','.join(MODELS)}")
    if args.adding_T:
        cfg.adding_T = tuple(int(t) for t in args.adding_T.split(","))
    if args.tasks:
        cfg.tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        for t in cfg.tasks:
            if t not in ("digits", "pdigits") and not (
                t.startswith("adding") and t[6:].isdigit() and int(t[6:]) >= 2
            ):
                p.error(f"--tasks: unknown task {t!r}")
    if args.epochs is not None:
        cfg.digits_epochs = args.epochs
    if args.adding_steps is not None:
        cfg.adding_steps = args.adding_steps
    if args.lr is not None:
        cfg.digits_lr = cfg.adding_lr = args.lr
    if args.batch is not None:
        cfg.digits_batch = cfg.adding_batch = args.batch
    if args.schedule is not None:
        cfg.digits_schedule = cfg.adding_schedule = args.schedule
    for flag, v in (
        ("--seeds", cfg.seeds),
        ("--epochs", cfg.digits_epochs),
        ("--adding-steps", cfg.adding_steps),
        ("--threads", args.threads),
        ("--batch", args.batch if args.batch is not None else 1),
    ):
        if v < 1:
            p.error(f"{flag}: must be a positive integer, got {v}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    cfg.threads = args.threads
    cfg.device = args.device
    cfg.flush_denormal = not args.no_flush_denormal
    return args, cfg


def main(argv=None) -> dict:
    args, cfg = parse_args(argv)
    backend = fusedrnn.backend()
    if backend != "fused" and not args.allow_reference:
        sys.exit(
            f"error: fusedrnn backend is {backend!r}, not 'fused' (the compiled extension "
            f"did not load: {fusedrnn.build_info()['load_error']}). Build it with "
            "`pip install --no-build-isolation -e .`, or pass --allow-reference to run the "
            "slow pure-PyTorch reference."
        )
    info = fusedrnn.build_info()
    torch.set_num_threads(cfg.threads)
    print(
        f"backend: {backend} (fusedrnn {info['version']}, torch {torch.__version__}, "
        f"compiled ops: cpu={info['cpu']} cuda={info['cuda']}); device {cfg.device}, "
        f"{cfg.threads} thread(s), flush-denormal {'on' if cfg.flush_denormal else 'off'}, "
        f"mode {cfg.mode}",
        flush=True,
    )
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    torch.set_flush_denormal(cfg.flush_denormal)

    tasks = task_list(cfg)
    digits = (
        load_digits_data(cfg)
        if any(t in ("digits", "pdigits") for t in tasks) or (not args.skip_eager)
        else None
    )
    data = {}
    for task in tasks:
        if task in ("digits", "pdigits"):
            data[task] = digits[task]
        else:
            T = task_info(task)["T"]
            x, y = adding_batch(
                cfg.adding_test_size,
                T,
                torch.Generator().manual_seed(cfg.adding_test_seed + T),
                cfg.device,
            )
            data[task] = dict(x_test=x, y_test=y)
    n_digits = digits["digits"]["x_train"].shape[1] if digits else 0

    eager = None
    if not args.skip_eager:
        eager = eager_speedup(cfg, digits, cfg.models)
        print(format_speedup(eager), flush=True)

    denormal = None
    if not args.skip_denormal and cfg.device == "cpu":
        denormal = denormal_check(cfg)  # restores the flush mode it found
        print(format_denormal(denormal), flush=True)

    jobs = [(t, m, s) for t in tasks for m in cfg.models for s in range(cfg.seeds)]
    total_steps = sum(steps_per_run(t, cfg, n_digits) for t, _, _ in jobs)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, unit="step", mininterval=1.0, file=sys.stderr)
    runs = []
    t_train = time.perf_counter()
    try:
        for task, model, seed in jobs:
            if progress is not None:
                progress.set_description(f"{task} {model} seed {seed}")
            runs.append(train_run(task, model, seed, data[task], cfg, progress))
    finally:
        if progress is not None:
            progress.close()
    train_wall = time.perf_counter() - t_train

    summary = summarize(runs)
    table = format_table(summary, runs, cfg.models)
    wall = time.perf_counter() - t_start
    print("\nfinal test metric, mean ± std over seeds (in parentheses: at mid-training)")
    print(table)
    for task in tasks:
        if task_info(task)["kind"] == "regression":
            print(f"{task}: trivial predictor MSE = {TRIVIAL_ADDING_MSE:.4f}")
    if eager is not None:
        print(
            f"fused training speed-up over the eager loop: {eager['speedup_geomean']:.2f}x "
            f"(geometric mean; "
            + ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in eager["models"].items())
            + ")"
        )
    print(f"backend: {backend}; training {train_wall:.0f} s, total wall {wall:.0f} s")

    result = dict(
        config=dataclasses.asdict(cfg),
        argv=list(sys.argv[1:] if argv is None else argv),
        environment=dict(
            backend=backend,
            build_info=info,
            torch=torch.__version__,
            python=platform.python_version(),
            cpu=cpu_name(),
            platform=platform.platform(),
            threads=torch.get_num_threads(),
            flush_denormal=cfg.flush_denormal,
            device=cfg.device,
        ),
        tasks={
            t: dict(
                task_info(t),
                n_train=(data[t]["x_train"].shape[1] if "x_train" in data[t] else None),
                n_test=data[t]["x_test"].shape[1],
            )
            for t in tasks
        },
        runs=runs,
        summary=summary,
        table=table,
        eager_timing=eager,
        denormal_check=denormal,
        timings=dict(
            total_wall_s=wall,
            training_wall_s=train_wall,
            per_task_train_s={t: sum(r["wall_s"] for r in runs if r["task"] == t) for t in tasks},
        ),
    )
    if digits is not None:
        result["digits_permutation"] = digits["pdigits"]["permutation"]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_curves(runs, tasks, cfg.models, os.path.join(args.out, "learning_curves.png"))
    print(f"wrote {os.path.join(args.out, 'results.json')} and learning_curves.png")
    return result


if __name__ == "__main__":
    main()
