"""An LSTMCell loop as a time-series model trained in double precision runs it (batch 97, input
1, hidden 51: pytorch/examples' time_sequence_prediction): microseconds per step, fusedrnn's cell
against torch.nn's, without grad and with (20 steps, then backward), float64 and float32, one
thread; medians of the calling thread's CPU time (time.thread_time).

    PYTHONPATH=. python scripts/fp64_cell_loop.py [repeats]
"""

import sys
import time

import torch

import fusedrnn

B, I, H, STEPS = 97, 1, 51, 20


def median_us_per_step(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return sorted(ts)[len(ts) // 2] / STEPS * 1e6


def main():
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, cpu_isa {fusedrnn.build_info()['cpu_isa']}")
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        fused = fusedrnn.LSTMCell(I, H).to(dtype)
        ref = torch.nn.LSTMCell(I, H).to(dtype)
        ref.load_state_dict(fused.state_dict())
        x = torch.randn(B, I, dtype=dtype)
        h0, c0 = torch.randn(B, H, dtype=dtype), torch.randn(B, H, dtype=dtype)
        hg = h0.clone().requires_grad_()

        def loop(cell, h, grad):
            def run():
                hh, cc = h, c0
                for _ in range(STEPS):
                    hh, cc = cell(x, (hh, cc))
                if grad:
                    hh.sum().backward()

            return run

        with torch.no_grad():
            f0 = median_us_per_step(loop(fused, h0, False), repeats)
            n0 = median_us_per_step(loop(ref, h0, False), repeats)
        f1 = median_us_per_step(loop(fused, hg, True), repeats)
        n1 = median_us_per_step(loop(ref, hg, True), repeats)
        print(
            f"{dtype}: no grad {f0:.0f} us/step vs nn {n0:.0f} ({n0 / f0:.2f}x nn); "
            f"with grad {f1:.0f} vs {n1:.0f} ({n1 / f1:.2f}x nn)",
            flush=True,
        )


if __name__ == "__main__":
    main()
