"""The AVX2 kernels under an x86 emulator (QEMU user mode presenting a Haswell CPU), which, unlike
real CPUs, faults on a masked load with every lane off from an invalid address. A backward step
without an output gradient (every cell backward; a layer whose loss reads only h_n) has a null
dy: the step loops fix "has an output gradient" at compile time (kernels/step_elements.h, kDy),
so that no load from dy is formed at all. Before that, 17 of 48 such cases died with SIGSEGV in
the emulator. Needs `qemu-x86_64` (Debian's qemu-user); CI installs it, and under CI the test
fails rather than skips without it."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each module once through a backward whose loss reads only the final state (no output
# gradient), once through one that reads the output too; fp32 and bf16, padded and packed, so
# that both the step loops (short calls) and the tiles (>= 4 steps, >= 32 rows) run.
CASES = r"""
import torch, fusedrnn
assert fusedrnn.build_info()["cpu_isa"] == "avx2", fusedrnn.build_info()
torch.manual_seed(0)
n = 0
for dtype in (torch.float32, torch.bfloat16):
    for name in ("LSTM", "GRU", "PeepholeLSTM", "WorkingMemoryLSTM"):
        for T, B in ((3, 2), (6, 8)):
            for only_state in (True, False):
                m = getattr(fusedrnn, name)(5, 7).to(dtype)
                x = torch.randn(T, B, 5, dtype=dtype, requires_grad=True)
                out, state = m(x)
                h = state[0] if isinstance(state, tuple) else state
                loss = h.float().sum() + (0 if only_state else out.float().sum())
                loss.backward()
                assert x.grad is not None and torch.isfinite(x.grad.float()).all()
                n += 1
    for name in ("LSTMCell", "GRUCell", "PeepholeLSTMCell", "WorkingMemoryLSTMCell"):
        m = getattr(fusedrnn, name)(5, 7).to(dtype)
        x = torch.randn(3, 5, dtype=dtype, requires_grad=True)
        h = m(x)
        h = h[0] if isinstance(h, tuple) else h
        h.float().sum().backward()
        assert torch.isfinite(x.grad.float()).all()
        n += 1
print("cases", n)
"""


def test_avx2_backward_without_output_gradient_under_emulator():
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-x86_64 is not installed (CI installs Debian's qemu-user)")
        pytest.skip("qemu-x86_64 is not installed (apt-get install qemu-user)")
    env = dict(
        os.environ,
        FUSEDRNN_CPU_ISA="avx2",
        ATEN_CPU_CAPABILITY="avx2",
        ONEDNN_MAX_CPU_ISA="AVX2",
        OMP_NUM_THREADS="1",
    )
    r = subprocess.run(
        [qemu, "-cpu", "Haswell", sys.executable, "-c", CASES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.stdout.strip().endswith("cases 40"), r.stdout


def test_avx2_backward_loops_have_no_masked_loads():
    """The instantiation of the step loops, read off the library: the AVX2 backward loops (the
    LSTM family's rows, the GRU's step; every dtype and cell) contain no masked vector moves
    (`vmaskmovps` / `vpmaskmovd` ...). gcc 12 if-converted `if (has_dy) dh += dy[j]` into masked
    loads there while has_dy was a run-time value (34 of them in these loops in the build before
    kDy became a compile-time option); with kDy and kPrev fixed per step and row, the loops have
    none. Needs objdump (binutils, which the build's compiler comes with)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    import fusedrnn._C as ext

    r = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", ext.__file__],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    loops, masked, name = set(), [], None
    for line in r.stdout.splitlines():
        if line.endswith(">:"):
            is_loop = "avx2::" in line and (
                "lstm_backward_rows<" in line or "gru_backward_step<" in line
            )
            name = line if is_loop else None
            if is_loop:
                loops.add(line)
        elif name is not None and "maskmov" in line:
            masked.append((name[:160], line.strip()))
    assert loops, "no AVX2 backward step loop found in the library's disassembly"
    assert not masked, masked[:5]
