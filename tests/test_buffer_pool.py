"""The pool of the layers' large CPU buffers (csrc/execution/buffer_pool.h): the outputs,
workspaces, scratch and zoneout masks of a call come from blocks earlier calls released; no call
reads a pooled buffer before writing it; the pool is bounded by FUSEDRNN_CPU_POOL_MB, emptied by
fusedrnn.empty_cpu_cache(), and seen by the profiler as PyTorch's CPU allocator is."""

import os
import subprocess
import sys

import pytest
import torch

import fusedrnn

F32, BF16 = torch.float32, torch.bfloat16
pytestmark = pytest.mark.skipif(not fusedrnn.build_info()["cpu"], reason="needs the CPU ops")

# Big enough that every buffer of the step is pooled (kPooledMinBytes, 256 KiB): the LSTM
# workspace is T * B * 4H values (1.6 MB in fp32), the output T * B * H.
T, B, I, H = 50, 32, 48, 64
KINDS = ["LSTM", "GRU", "PeepholeLSTM", "WorkingMemoryLSTM", "LayerNormLSTM", "LayerNormGRU"]


def _stats():
    limit, free, in_use = torch.ops.fusedrnn.cpu_pool_stats()
    return limit, free, in_use


def _step(module, x, seed, poison=False):
    """One training step: the output, the final states and every gradient. `poison` fills the
    pool's free blocks with NaN bytes before the forward and again before the backward."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # zoneout's masks
    if poison:
        torch.ops.fusedrnn._cpu_pool_poison()
    out, state = module(x)
    if poison:
        torch.ops.fusedrnn._cpu_pool_poison()
    g = torch.Generator().manual_seed(seed)
    (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
    states = state if isinstance(state, tuple) else (state,)
    return [out.detach(), *(s.detach() for s in states), x.grad] + [
        p.grad for p in module.parameters()
    ]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_poisoned_pool_changes_nothing(kind, dtype):
    """A training step (zoneout on, so that its masks are pooled too) gives the same bits from
    fresh memory and from pooled blocks full of NaN: every buffer is written before it is read.
    Fresh pages are zeros, which would hide a read of an unwritten buffer."""
    torch.manual_seed(0)
    module = getattr(fusedrnn, kind)(I, H, zoneout=0.1, dtype=dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    fusedrnn.empty_cpu_cache()
    fresh = _step(module, x, seed=1)
    assert _stats()[1] > 0, "the step released nothing into the pool"
    pooled = _step(module, x, seed=1, poison=True)
    for a, b in zip(fresh, pooled):
        assert torch.equal(a, b)


def test_pool_reuses_blocks():
    """A second identical step takes its blocks from the pool: the pool does not grow, and every
    block it lent is back after the step."""
    torch.manual_seed(0)
    module = fusedrnn.LSTM(I, H)
    x = torch.randn(T, B, I)
    _step(module, x, seed=1)
    _, free1, in_use1 = _stats()
    _step(module, x, seed=1)
    _, free2, in_use2 = _stats()
    assert free1 > 0
    assert (free2, in_use2) == (free1, in_use1)
    # a shorter sequence takes blocks larger than it asks for (by at most a quarter); what it
    # took is what it gives back
    _step(module, x[: T - 2], seed=1)
    _, free3, in_use3 = _stats()
    assert in_use3 == in_use1 and free3 >= free1
    fusedrnn.empty_cpu_cache()
    assert _stats()[1] == 0


def test_profiler_counts_pooled_buffers():
    """profile_memory sees the pooled workspace (the benchmark's memory column is computed from
    these events): the peak of a training step is at least the LSTM workspace's size."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    module = fusedrnn.LSTM(I, H)
    x = torch.randn(T, B, I)
    _step(module, x, seed=1)  # the pool holds the step's blocks now
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(module, x, seed=1)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    assert peak >= T * B * 4 * H * 4


def _run(env_value, code):
    env = dict(os.environ, FUSEDRNN_CPU_POOL_MB=env_value)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_pool_limit_from_env():
    """FUSEDRNN_CPU_POOL_MB bounds the free memory kept; 0 keeps none; anything but a whole
    number of megabytes is refused, naming the variable."""
    code = (
        "import torch, fusedrnn\n"
        f"m = fusedrnn.LSTM({I}, {H}); x = torch.randn({T}, {B}, {I})\n"
        "m(x)[0].sum().backward()\n"
        "print(fusedrnn.build_info()['cpu_pool_mb'], *torch.ops.fusedrnn.cpu_pool_stats())\n"
    )
    off = _run("0", code)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0", "0", "0", "0"]
    small = _run("1", code)  # 1 MB: the 1.6 MB workspace is freed, smaller blocks kept
    assert small.returncode == 0, small.stderr
    mb, limit, free, _ = map(int, small.stdout.split())
    assert (mb, limit) == (1, 1 << 20) and 0 < free <= 1 << 20
    bad = _run("lots", code)
    assert bad.returncode != 0
    assert "FUSEDRNN_CPU_POOL_MB" in bad.stderr and "'lots'" in bad.stderr
