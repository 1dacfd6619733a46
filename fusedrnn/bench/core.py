"""Measurement: the implementations under test, timing, peak memory and the environment record.

Implementations of one case (cell, shape):

- ``fused``: the fusedrnn module (``fusedrnn.LSTM`` / ``GRU`` / ``PeepholeLSTM`` /
  ``WorkingMemoryLSTM``).
- ``torch``: ``torch.nn.LSTM`` / ``torch.nn.GRU`` with the same weights (LSTM and GRU only);
  cuDNN on a GPU, oneDNN (or ATen) on a CPU. The kernel actually used is read from a profile of
  the first call and recorded.
- ``eager``: ``fusedrnn.reference.layer``, the step-by-step PyTorch loop of the same cell.
- ``compiled``: the *step* function of the same cell (``fusedrnn.reference.*_cell``) compiled
  with ``torch.compile(dynamic=False, fullgraph=True)`` and called from a Python loop over time
  (a "compiled step loop"; compiling the whole unrolled loop takes minutes on a CPU).

Every implementation of one case shares the parameter values, the input and the gradient of the
output. A forward (``fwd``) pass runs under ``torch.no_grad()``; a training pass (``fwd+bwd``)
runs ``output.backward(grad)`` with the parameters' (and, with ``input_grad``, the input's)
gradients set to ``None`` before every run, outside the timed region.
"""
import contextlib
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import fusedrnn
from fusedrnn import reference

CELLS = tuple(reference.CELLS)
IMPLS = ("fused", "torch", "eager", "compiled")
BASELINES = IMPLS[1:]
IMPL_LABELS = {"fused": "fused", "torch": "torch.nn", "eager": "eager loop",
               "compiled": "compiled step loop"}
SLOW_IMPLS = ("eager", "compiled")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
FASTRNNS_SHAPE = (100, 64, 512, 512)
QUICK_SHAPE_CPU = (100, 64, 256, 256)
STACK_LAYERS = 3
COMPILE_MODE = "compiled step loop"
COMPILE_NOTE = ("torch.compile(dynamic=False, fullgraph=True) of the cell's step function "
                "(fusedrnn.reference.*_cell), called in a Python loop over time; the initial "
                "state requires grad in fwd+bwd so every step runs one graph; first_call_s "
                "includes compilation")
WARMUP = {"cpu": 1, "cuda": 3}  # warm-up runs of fused and torch.nn
MB = float(2 ** 20)

_MODULES = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU, "peephole_lstm": fusedrnn.PeepholeLSTM,
            "wm_lstm": fusedrnn.WorkingMemoryLSTM}
_TORCH_MODULES = {"lstm": nn.LSTM, "gru": nn.GRU}
_STEP_FUNCTIONS = {"lstm": reference.lstm_cell, "gru": reference.gru_cell,
                   "peephole_lstm": reference.peephole_lstm_cell,
                   "wm_lstm": reference.wm_lstm_cell}

Shape = Tuple[int, int, int, int]


def quick_shape(device_type: str) -> Shape:
    """The default shape: (100, 64, 256, 256) on a CPU, the fastrnns shape on a GPU."""
    return QUICK_SHAPE_CPU if device_type == "cpu" else FASTRNNS_SHAPE


def grid_shapes() -> List[Shape]:
    """design.md §5: T in {50, 200}, B in {1, 16, 64, 256}, H in {128, ..., 1024}, I = H."""
    return [(T, B, H, H) for T in (50, 200) for B in (1, 16, 64, 256)
            for H in (128, 256, 512, 1024)]


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def slow_repeats(repeats: int) -> int:
    """Timed runs of the slow baselines (eager and compiled loops): a third, at least 3."""
    return max(min(3, repeats), repeats // 3)


@dataclass(frozen=True)
class Case:
    """One cell at one shape, with the passes and implementations to measure."""
    cell: str
    shape: Shape
    passes: Tuple[str, ...] = PASSES
    impls: Tuple[str, ...] = IMPLS
    layers: int = 1
    bidirectional: bool = False
    # whether the input requires grad; None: as the settings say (--input-grad)
    input_grad: Optional[bool] = None

    @property
    def label(self) -> str:
        label = self.cell
        if self.layers > 1 or self.bidirectional:
            label += f" {self.layers}-layer" + (" bidir" if self.bidirectional else "")
        if self.input_grad:
            label += " +dx"
        return label

    def needs_input_grad(self, settings: "Settings") -> bool:
        return settings.input_grad if self.input_grad is None else self.input_grad


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    repeats: int = 10
    warmup: int = 1
    compile: bool = True
    compile_backend: str = "inductor"
    memory: bool = True
    input_grad: bool = False
    seed: int = 0

    @property
    def slow_repeats(self) -> int:
        return slow_repeats(self.repeats)

    def counts(self, impl: str) -> Tuple[int, int]:
        """(warm-up runs, timed runs) of an implementation; the eager and compiled loops get one
        warm-up run (for the compiled loop it is the one that compiles)."""
        if impl in SLOW_IMPLS:
            return 1, self.slow_repeats
        return self.warmup, self.repeats


def build_cases(cells: Iterable[str], shapes: Iterable[Shape], stacked: bool = True,
                input_grad: bool = False) -> List[Case]:
    """Every cell at every shape (fwd and fwd+bwd, all applicable implementations), plus, when
    LSTM is asked, the 3-layer bidirectional LSTM (fused vs torch.nn, fwd+bwd) at every shape
    and beside it the single layer with an input that requires grad ("+dx"): the layers of a
    stack above the first must compute the input gradient, which the first layer of a model (and
    the single-layer rows) skip, so this is the single layer to compare the stack with. With
    `input_grad` (--input-grad) every row computes it and the "+dx" row is left out."""
    cells = list(cells)
    cases = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        for cell in cells:
            impls = tuple(i for i in IMPLS if i != "torch" or cell in _TORCH_MODULES)
            cases.append(Case(cell, shape, PASSES, impls))
        if stacked and "lstm" in cells:
            # Half the sequence length: the stacked row is the slowest of the suite (6 layer
            # directions), and what it shows, the speed-up over torch.nn, does not depend on T.
            stacked_shape = (max(1, shape[0] // 2),) + shape[1:]
            if not input_grad:
                cases.append(Case("lstm", stacked_shape, ("fwd+bwd",), ("fused", "torch"),
                                  input_grad=True))
            cases.append(Case("lstm", stacked_shape, ("fwd+bwd",), ("fused", "torch"),
                              STACK_LAYERS, True))
    return cases


def memory_impls(case: Case) -> Tuple[str, ...]:
    """Implementations whose training-step peak memory is measured: fused and its main baseline
    (torch.nn where it has the cell, else the eager loop); the compiled step loop is left out,
    its memory is the eager loop's plus compiled buffers, and measuring it costs time."""
    return tuple(i for i in case.impls if i != "compiled")


def count_tasks(cases: Iterable[Case], settings: Settings) -> int:
    """Progress-bar length: one task per (pass, implementation) and per memory measurement."""
    n = 0
    for case in cases:
        n += len(case.passes) * len(case.impls)
        if settings.memory and "fwd+bwd" in case.passes:
            n += len(memory_impls(case))
    return n


# --- environment -----------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(args: List[str], cwd: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", cwd] + args, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_revision() -> Dict[str, Optional[object]]:
    """The commit of the repository fusedrnn is imported from (None when it is not in one)."""
    pkg = os.path.dirname(os.path.abspath(fusedrnn.__file__))
    if _git(["ls-files", "--error-unmatch", "__init__.py"], pkg) is None:
        return {"revision": None, "dirty": None}
    rev = _git(["rev-parse", "HEAD"], pkg)
    status = _git(["status", "--porcelain", "--untracked-files=no"], pkg)
    return {"revision": rev, "dirty": None if status is None else bool(status)}


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    cuda = device.type == "cuda"
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # a CPU-only build without the cuDNN library
        cudnn = None
    git = git_revision()
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu_capability": (".".join(map(str, torch.cuda.get_device_capability(device)))
                           if cuda else None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "fusedrnn": fusedrnn.__version__,
        "fusedrnn_path": os.path.dirname(os.path.abspath(fusedrnn.__file__)),
        "git_revision": git["revision"],
        "git_dirty": git["dirty"],
        "backend": fusedrnn.backend(),
        "build_info": fusedrnn.build_info(),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


# --- TF32 ------------------------------------------------------------------------------------

TF32_NOTE = ("TF32 in float32 matrix products, the same on both sides: cuDNN "
             "(torch.backends.cudnn.allow_tf32: torch.nn.LSTM/GRU) and cuBLAS "
             "(torch.backends.cuda.matmul.allow_tf32: fused's GEMMs, the eager and compiled "
             "loops); off unless --tf32. torch's own defaults differ (cuDNN on, cuBLAS off), "
             "which would let torch.nn run TF32 against fused in full fp32")


def tf32_state() -> Dict[str, object]:
    """The TF32 switches in effect: the two legacy flags and, where this torch has them, the
    fp32_precision settings they map to."""
    b = torch.backends
    state: Dict[str, object] = {"cudnn_allow_tf32": bool(b.cudnn.allow_tf32),
                                "cuda_matmul_allow_tf32": bool(b.cuda.matmul.allow_tf32)}
    for key, getter in (("cudnn_rnn_fp32_precision", lambda: b.cudnn.rnn.fp32_precision),
                        ("cuda_matmul_fp32_precision", lambda: b.cuda.matmul.fp32_precision)):
        try:
            state[key] = getter()
        except (AttributeError, RuntimeError):  # an older torch without fp32_precision
            pass
    return state


@contextlib.contextmanager
def tf32(enabled: bool):
    """Sets cuDNN's and cuBLAS's TF32 flags both to `enabled` for the block, then restores them."""
    if not isinstance(enabled, bool):
        raise TypeError(f"tf32: expected a bool, got {type(enabled).__name__} {enabled!r}")
    b = torch.backends
    old_cudnn, old_matmul = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
    b.cudnn.allow_tf32 = enabled
    b.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        b.cudnn.allow_tf32 = old_cudnn
        b.cuda.matmul.allow_tf32 = old_matmul


# --- the implementations ---------------------------------------------------------------------

class Workload:
    """Module, input, output gradient and the forward function of each implementation."""

    def __init__(self, case: Case, settings: Settings):
        T, B, I, H = case.shape
        self.case, self.settings = case, settings
        dev, dt = settings.device, settings.dtype
        torch.manual_seed(settings.seed)
        D = 2 if case.bidirectional else 1
        self.module = _MODULES[case.cell](I, H, num_layers=case.layers,
                                          bidirectional=case.bidirectional, device=dev, dtype=dt)
        self.x = torch.randn(T, B, I, device=dev, dtype=dt).requires_grad_(
            case.needs_input_grad(settings))
        self.grad = torch.randn(T, B, D * H, device=dev, dtype=dt)
        self._built: Dict[str, Tuple[Callable[[], Tensor], List[Tensor]]] = {}
        self.broken: Dict[str, str] = {}

    def get(self, impl: str) -> Tuple[Callable[[], Tensor], List[Tensor]]:
        if impl not in self._built:
            self._built[impl] = getattr(self, "_build_" + impl)()
        return self._built[impl]

    def _layer0(self) -> List[Optional[Tensor]]:
        m = self.module
        return [getattr(m, n + "_l0", None) for n in
                ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch")]

    def _build_fused(self):
        m, x = self.module, self.x
        return (lambda: m(x)[0]), list(m.parameters())

    def _build_torch(self):
        c, (_, _, I, H) = self.case, self.case.shape
        t = _TORCH_MODULES[c.cell](I, H, num_layers=c.layers, bidirectional=c.bidirectional,
                                   device=self.settings.device, dtype=self.settings.dtype)
        t.load_state_dict(self.module.state_dict())
        x = self.x
        return (lambda: t(x)[0]), list(t.parameters())

    def _build_eager(self):
        cell, x, w = self.case.cell, self.x, self._layer0()
        return (lambda: reference.layer(cell, x, *w)[0]), list(self.module.parameters())

    def _build_compiled(self):
        cell, x = self.case.cell, self.x
        T, B, _, H = self.case.shape
        w_ih, w_hh, b_ih, b_hh, w_ch = self._layer0()
        step = torch.compile(_STEP_FUNCTIONS[cell], backend=self.settings.compile_backend,
                             dynamic=False, fullgraph=True)
        # The initial state requires grad when grad is on, so that every step (the first one
        # included) runs the same compiled graph; that adds one small GEMM (dh_0) to backward.
        def zeros():
            return x.new_zeros(B, H).requires_grad_(torch.is_grad_enabled())

        if cell == "gru":
            def forward():
                h, outs = zeros(), []
                for t in range(T):
                    h = step(x[t], h, w_ih, w_hh, b_ih, b_hh)
                    outs.append(h)
                return torch.stack(outs)
        else:
            extra = () if cell == "lstm" else (w_ch,)

            def forward():
                h, c, outs = zeros(), zeros(), []
                for t in range(T):
                    h, c = step(x[t], h, c, w_ih, w_hh, b_ih, b_hh, *extra)
                    outs.append(h)
                return torch.stack(outs)
        return forward, list(self.module.parameters())

    def clear_grads(self) -> None:
        """Sets every gradient the implementations built so far may hold to None."""
        for _, params in self._built.values():
            for p in params:
                p.grad = None
        self.x.grad = None

    def calls(self, impl: str, pass_: str):
        """(prepare, call): `prepare` resets the gradients (untimed), `call` is one timed run.
        The forward call returns the output; the training call returns None."""
        forward, params = self.get(impl)
        x, grad = self.x, self.grad
        if pass_ == "fwd":
            def prepare():
                pass

            def call():
                with torch.no_grad():
                    return forward()
        else:
            def prepare():
                for p in params:
                    p.grad = None
                x.grad = None

            def call():
                forward().backward(grad)
        return prepare, call


# --- timing and memory -----------------------------------------------------------------------

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
    for key, family in (("cudnn_rnn", "cuDNN"), ("mkldnn_rnn", "oneDNN"),
                        ("miopen_rnn", "MIOpen")):
        if any(key in n for n in names):
            return family
    return "ATen"


def time_calls(prepare: Callable[[], None], call: Callable[[], object], device: torch.device,
               warmup: int, repeats: int, profile_first: bool = False) -> dict:
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


def peak_memory(prepare: Callable[[], None], call: Callable[[], object],
                device: torch.device) -> dict:
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
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]"]
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
        rec = {"cell": case.cell, "label": case.label,
               "shape": {"T": T, "B": B, "I": I, "H": H}, "shape_str": shape_str(case.shape),
               "layers": case.layers, "bidirectional": case.bidirectional, "pass": pass_,
               "input_grad": case.needs_input_grad(settings),
               "impls": {}, "speedup": {}, "memory": None}
        reference_output = None
        for impl in case.impls:
            if progress is not None:
                progress.set_description(f"{case.label} {shape_str(case.shape)} {pass_} "
                                         f"{IMPL_LABELS[impl]}")
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
                    r = time_calls(prepare, call, device, warmup, repeats,
                                   profile_first=(impl == "torch"))
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
                    entry.update(status="ok", warmup=warmup, repeats=repeats, times_ms=times,
                                 median_ms=_median(times), min_ms=min(times),
                                 max_ms=max(times), first_call_s=r["first_call_s"])
                    if impl == "torch":
                        entry["kernel"] = kernel_family(r["op_names"] or [])
                    out = r["output"]
                    if pass_ == "fwd" and isinstance(out, Tensor):
                        if impl == "fused":
                            reference_output = out
                        elif reference_output is not None:
                            entry["max_abs_diff_vs_fused"] = float(
                                (out.double() - reference_output.double()).abs().max())
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
                    progress.set_description(f"{case.label} {shape_str(case.shape)} peak memory "
                                             f"{IMPL_LABELS[impl]}")
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


# --- the table -------------------------------------------------------------------------------

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
TABLE_COLUMNS = (["cell", "shape TxBxIxH", "pass"]
                 + [f"{SHORT_LABELS[i]} ms" for i in IMPLS]
                 + [f"x {SHORT_LABELS[b]}" for b in BASELINES]
                 + [f"MB {SHORT_LABELS[i]}" for i in IMPLS])


def table_rows(results: Sequence[dict]) -> List[List[str]]:
    rows = []
    for rec in results:
        impls = rec["impls"]
        rows.append([rec["label"], rec["shape_str"], rec["pass"]]
                    + [_fmt_ms(impls.get(i)) for i in IMPLS]
                    + [_fmt_x(rec["speedup"].get(b)) for b in BASELINES]
                    + [_fmt_mb(rec, i) for i in IMPLS])
    return rows


def format_table(results: Sequence[dict]) -> str:
    rows = table_rows(results)
    widths = [max(len(str(r[k])) for r in rows + [TABLE_COLUMNS])
              for k in range(len(TABLE_COLUMNS))]
    left = 3  # text columns are left-aligned, numbers right-aligned

    def fmt(row):
        return "  ".join(str(v).ljust(w) if k < left else str(v).rjust(w)
                         for k, (v, w) in enumerate(zip(row, widths))).rstrip()
    lines = [fmt(TABLE_COLUMNS), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    notes = {}
    for rec in results:
        for impl, e in rec["impls"].items():
            if e.get("status") in ("skipped", "error"):
                notes.setdefault(f"{IMPL_LABELS[impl]} {e['status']}: {e.get('reason')}",
                                 []).append(rec["label"])
    for text, where in notes.items():
        cells = sorted(set(where), key=where.index)
        lines.append(f"note: {text} ({', '.join(cells)})")
    return "\n".join(lines)
