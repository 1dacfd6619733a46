"""Instructions per LSTMCell / GRUCell call (the module call, B = 1, H = 8: the per-call costs),
counted by valgrind's callgrind: unlike times on a shared machine, the count is the same on every
run of the same build, so two builds can be compared in any load (a before/after of a change:
run it in both checkouts).

    PYTHONPATH=. python scripts/call_instructions.py

Each configuration runs twice under `valgrind --tool=callgrind --instr-atstart=no`, with
instrumentation switched on (callgrind_control) around a loop of 100 and of 300 calls after a
warm-up; the difference of the two counts over 200 is one call's instructions, without the
import, the warm-up and the switching. Needs valgrind; takes about a minute per count.
"""

import os
import re
import shutil
import subprocess
import sys

CONFIGS = [("lstm", 8, True), ("lstm", 8, False), ("gru", 8, True), ("gru", 8, False)]
SHORT, LONG = 100, 300


def _loop(name: str, H: int, grad: bool, n: int) -> None:
    """The measured process: `n` calls of the cell module with instrumentation on."""
    import torch

    import fusedrnn

    torch.set_num_threads(1)
    # by class, not by the cell table's registry, so that the script runs on older checkouts too
    mod = {"lstm": fusedrnn.LSTMCell, "gru": fusedrnn.GRUCell}[name](H, H)
    x, h, c = torch.randn(1, H), torch.randn(1, H), torch.randn(1, H)
    state = (h, c) if fusedrnn.cells.CELLS[name].has_cell_state else h
    pid = str(os.getpid())
    with torch.set_grad_enabled(grad):
        for _ in range(50):
            mod(x, state)
        subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True)
        for _ in range(n):
            mod(x, state)
        subprocess.run(["callgrind_control", "-i", "off", pid], capture_output=True)


def _count(name: str, H: int, grad: bool, n: int) -> int:
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--loop",
        name,
        str(H),
        str(int(grad)),
        str(n),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True).stderr
    m = re.search(r"Collected : (\d+)", out)
    if m is None:
        raise RuntimeError(f"no callgrind count in:\n{out[-2000:]}")
    return int(m.group(1))


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--loop":
        _loop(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]))
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind (callgrind_control)", file=sys.stderr)
        return 1
    import fusedrnn

    print(f"fusedrnn {fusedrnn.__file__}, instructions per module call (B = 1)")
    for name, H, grad in CONFIGS:
        per_call = (_count(name, H, grad, LONG) - _count(name, H, grad, SHORT)) / (LONG - SHORT)
        mode = "grad mode" if grad else "no_grad"
        print(f"  {name} H={H} {mode:9s} {per_call / 1e3:8.1f} k", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
