"""Where a training step of a cell loop goes: fusedrnn.LSTMCell at B = 1, H = 256, 100 steps
forward and one backward through all of them, one thread, fp32, under torch.profiler. Prints,
per step, the forward op, the backward op (whose work is two 1 MB products with the weights and
2 MB of fresh weight gradients) and autograd's summing of the steps' weight gradients into one
(aten::add_, called by the engine for each parameter that several steps feed).

    PYTHONPATH=. python scripts/profile_cell_backward.py
"""

import torch
from torch.profiler import ProfilerActivity, profile

import fusedrnn
from fusedrnn.bench.env import cpu_name

STEPS, H = 100, 256


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cell, x = fusedrnn.LSTMCell(H, H), torch.randn(1, H)

    def loop():
        state = None
        for _ in range(STEPS):
            state = cell(x, state)
        state[0].sum().backward()

    for _ in range(3):
        loop()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loop()
    rows = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(
        f"{cpu_name()}, ISA {fusedrnn.build_info()['cpu_isa']}, one thread, fp32, "
        f"LSTMCell B=1 H={H}, microseconds per step (CPU time under the profiler)"
    )
    print(f"  whole step (forward + backward)   {total / STEPS:8.1f}")
    for label, key, field in (
        ("forward op", "fusedrnn::lstm_forward", "cpu_time_total"),
        ("backward op", "fusedrnn::lstm_backward", "cpu_time_total"),
        ("gradient sums (aten::add_)", "aten::add_", "self_cpu_time_total"),
    ):
        us = getattr(rows[key], field) / STEPS if key in rows else float("nan")
        print(f"  {label:33s} {us:8.1f}")


if __name__ == "__main__":
    main()
