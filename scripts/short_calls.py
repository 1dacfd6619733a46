"""Short calls, where the per-call work (packing the weights for the tiled steps, the buffers)
is a visible share of the call: fusedrnn's LSTM / GRU layers and cells against torch.nn's,
inference, one thread, fp32. The two are called alternately, 40 times each (a cell: a 10-step
loop), and the fastest call of each is reported (on a shared machine the minimum moves less than
the median between runs).

    PYTHONPATH=. python scripts/short_calls.py
    FUSEDRNN_CPU_FUSED=0 PYTHONPATH=. python scripts/short_calls.py   # without the tiled steps
"""

import time

import torch

import fusedrnn
from fusedrnn.bench.env import cpu_name

# (module, T, B, H), input size = H: 4 and 16 steps at B = 32 (the tiled steps pack W_ih and
# W_hh, 2 MB at H = 256, on every call), and a small serving layer
CASES = [("LSTM", 4, 32, 256), ("LSTM", 16, 32, 256), ("GRU", 4, 32, 256), ("LSTM", 8, 16, 128)]
# (cell, B, H): one-step forwards of 32 rows and more also run the tiled steps
CELL_CASES = [("LSTMCell", 32, 256), ("LSTMCell", 64, 256), ("GRUCell", 32, 256)]


def fastest_ms(fused, ref, x, calls=40):
    """The fastest of `calls` alternating calls of fused(x) and ref(x) (x None: fused())."""
    args = () if x is None else (x,)
    with torch.no_grad():
        for _ in range(5):
            fused(*args)
            ref(*args)
        tf, tn = [], []
        for _ in range(calls):
            t0 = time.perf_counter()
            fused(*args)
            tf.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref(*args)
            tn.append(time.perf_counter() - t0)
    return min(tf) * 1e3, min(tn) * 1e3


def cell_loop(cell, x, steps=10):
    def run():
        state = None
        for _ in range(steps):
            state = cell(x, state)

    return run


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    info = fusedrnn.build_info()
    print(f"{cpu_name()}, ISA {info['cpu_isa']}, torch {torch.__version__}, one thread, fp32")
    print(
        f"{'case':<24} {'fused ms':>9} {'torch.nn ms':>12} {'speed-up':>9}   "
        f"(tiled steps {'on' if info['cpu_fused_steps'] else 'off'})"
    )
    for name, T, B, H in CASES:
        fused = getattr(fusedrnn, name)(H, H)
        ref = getattr(torch.nn, name)(H, H)
        fused.load_state_dict(ref.state_dict())
        f, n = fastest_ms(fused, ref, torch.randn(T, B, H))
        case = f"{name} T={T} B={B} H={H}"
        print(f"{case:<24} {f:>9.2f} {n:>12.2f} {n / f:>8.2f}x")
    for name, B, H in CELL_CASES:
        fused = getattr(fusedrnn, name)(H, H)
        ref = getattr(torch.nn, name)(H, H)
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(B, H)
        f, n = fastest_ms(cell_loop(fused, x), cell_loop(ref, x), None)
        case = f"{name} x10 B={B} H={H}"
        print(f"{case:<24} {f:>9.2f} {n:>12.2f} {n / f:>8.2f}x")


if __name__ == "__main__":
    main()
