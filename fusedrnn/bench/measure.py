"""Measurement: timing of the implementations' calls, the peak memory of a training step, and
the records of one case (one per pass) that ``results.json`` holds.

Timing: warm-up runs, then timed runs; on a CPU ``time.perf_counter`` around each call, on a GPU
CUDA events around the call on the current stream, synchronised after each run, with Python's
garbage collector paused. The first call of ``torch.nn`` runs under the profiler to record which
kernel family it used.
"""

import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .cases import BASELINES, IMPL_LABELS, Case, Settings, memory_impls, shape_str
from .impls import COMPILE_MODE, Workload

MB = float(2**20)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_fd2():
    """Silences what C++ code writes straight to file descriptor 2 (the profiler's start/stop
    log lines) for the duration of the block; Python exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _profiled_names(call: Callable[[], object]) -> Tuple[object, List[str]]:
    """Runs `call` once under the profiler; returns its result and the names of the ops run."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = call()
    return result, sorted({e.name for e in prof.events()})


def kernel_family(names: Iterable[str]) -> str:
    """What torch.nn.LSTM / GRU ran, from op names: cuDNN, oneDNN (mkldnn) or ATen."""
    names = [n.lower() for n in names]
    for key, family in (("cudnn_rnn", "cuDNN"), ("mkldnn_rnn", "oneDNN"), ("miopen_rnn", "MIOpen")):
        if any(key in n for n in names):
            return family
    return "ATen"


def time_calls(
    prepare: Callable[[], None],
    call: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    profile_first: bool = False,
) -> dict:
    """Warm-up runs, then `repeats` timed runs (ms). CPU: time.perf_counter around the call;
    CUDA: CUDA events around the call on the current stream, synchronised after each run."""
    first_s, output, names = None, None, None
    for i in range(max(1, warmup)):
        prepare()
        _sync(device)
        t0 = time.perf_counter()
        if i == 0 and profile_first:
            result, names = _profiled_names(call)
        else:
            result = call()
        _sync(device)
        if i == 0:
            first_s, output = time.perf_counter() - t0, result
        del result
    times: List[float] = []
    gc.collect()
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            prepare()
            _sync(device)
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(float(start.elapsed_time(end)))
            else:
                t0 = time.perf_counter()
                call()
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_enabled:
            gc.enable()
    return {"times_ms": times, "first_call_s": first_s, "output": output, "op_names": names}


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during one training step, minus "
    "torch.cuda.memory_allocated() before it (gradients set to None first)",
    "cpu": "peak of the running sum of the CPU allocator's allocation/free events recorded by "
    "torch.profiler (profile_memory=True) during one training step (gradients set to "
    "None first); counts every tensor and workspace allocated through PyTorch's CPU "
    "allocator, not memory a library mallocs by itself",
}


def peak_memory(
    prepare: Callable[[], None], call: Callable[[], object], device: torch.device
) -> dict:
    """Peak memory (MB) allocated by one run of `call` above what was allocated before it."""
    prepare()
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": (peak - base) / MB, "peak_total_mb": peak / MB}
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    ]
    events.sort(key=lambda e: e[0])
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return {"peak_mb": peak / MB, "allocation_events": len(events)}


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _median(xs: Sequence[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


# --- one case --------------------------------------------------------------------------------


def run_case(case: Case, settings: Settings, progress=None) -> List[dict]:
    """Measures one case; returns one record per pass."""
    device = settings.device
    if settings.compile and "compiled" in case.impls:
        torch._dynamo.reset()  # a fresh compile cache: no recompile limit hit across cases
    work = Workload(case, settings)
    T, B, I, H = case.shape
    records = []
    for pass_ in case.passes:
        rec = {
            "cell": case.cell,
            "label": case.label,
            "shape": {"T": T, "B": B, "I": I, "H": H},
            "shape_str": shape_str(case.shape),
            "layers": case.layers,
            "bidirectional": case.bidirectional,
            "pass": pass_,
            "input_grad": case.needs_input_grad(settings),
            "dropconnect": case.dropconnect,
            "zoneout": case.zoneout,
            "layer_norm": case.layer_norm,
            "impls": {},
            "speedup": {},
            "memory": None,
        }
        reference_output = None
        for impl in case.impls:
            if progress is not None:
                progress.set_description(
                    f"{case.label} {shape_str(case.shape)} {pass_} {IMPL_LABELS[impl]}"
                )
            entry = {"label": IMPL_LABELS[impl]}
            rec["impls"][impl] = entry
            if impl == "compiled":
                entry["mode"] = COMPILE_MODE
                entry["compile_backend"] = settings.compile_backend
            if impl == "compiled" and not settings.compile:
                entry.update(status="skipped", reason="--no-compile")
            elif impl in work.broken:
                entry.update(status="skipped", reason=work.broken[impl])
            else:
                warmup, repeats = settings.counts(impl)
                try:
                    prepare, call = work.calls(impl, pass_)
                    r = time_calls(
                        prepare, call, device, warmup, repeats, profile_first=(impl == "torch")
                    )
                except Exception as exc:  # record and go on with the other implementations
                    reason = _reason(exc)
                    if impl == "compiled":
                        reason = "torch.compile path failed: " + reason
                        work.broken[impl] = reason
                        entry.update(status="skipped", reason=reason)
                    else:
                        entry.update(status="error", reason=reason)
                else:
                    times = r["times_ms"]
                    entry.update(
                        status="ok",
                        warmup=warmup,
                        repeats=repeats,
                        times_ms=times,
                        median_ms=_median(times),
                        min_ms=min(times),
                        max_ms=max(times),
                        first_call_s=r["first_call_s"],
                    )
                    if impl == "torch":
                        entry["kernel"] = kernel_family(r["op_names"] or [])
                    out = r["output"]
                    if pass_ == "fwd" and isinstance(out, Tensor):
                        if impl == "fused":
                            reference_output = out
                        elif reference_output is not None:
                            entry["max_abs_diff_vs_fused"] = float(
                                (out.double() - reference_output.double()).abs().max()
                            )
                    del r, out
            if progress is not None:
                progress.update(1)
        fused = rec["impls"].get("fused", {})
        for b in BASELINES:
            other = rec["impls"].get(b)
            if fused.get("status") == "ok" and other and other.get("status") == "ok":
                rec["speedup"][b] = other["median_ms"] / fused["median_ms"]
        if pass_ == "fwd+bwd" and settings.memory:
            rec["memory"] = {}
            for impl in memory_impls(case):
                if progress is not None:
                    progress.set_description(
                        f"{case.label} {shape_str(case.shape)} peak memory {IMPL_LABELS[impl]}"
                    )
                if rec["impls"][impl].get("status") == "ok":
                    try:
                        prepare, call = work.calls(impl, pass_)
                        rec["memory"][impl] = peak_memory(prepare, call, device)
                    except Exception as exc:
                        rec["memory"][impl] = {"peak_mb": None, "reason": _reason(exc)}
                if progress is not None:
                    progress.update(1)
        work.clear_grads()
        records.append(rec)
    del work
    gc.collect()
    return records


def run_suite(cases: Sequence[Case], settings: Settings, progress=None) -> List[dict]:
    results = []
    for case in cases:
        results.extend(run_case(case, settings, progress))
    return results
