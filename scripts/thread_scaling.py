"""Thread scaling of the fused LSTM / GRU against torch.nn's, timed alternately in one process.

    python scripts/thread_scaling.py [--dtype float32|bfloat16] [--rounds N] [--shape T,B,I,H]

The benchmark (`python -m fusedrnn.bench`) runs each thread count as a separate pass, minutes
apart, so on a shared machine its one-thread-to-all-cores ratios carry whatever the neighbours
did in between. Here every round times each module at one thread and at every core the process
may use, one after the other (best of 3 calls each), and the report is the median over the
rounds: time at one thread / time at all cores, for fused and torch.nn, forward (no grad) and
forward+backward, and fused's scaling over torch.nn's (>= 1: fused gains at least as much).
"""

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedrnn  # noqa: E402
from fusedrnn.bench.cli import all_cores  # noqa: E402
from fusedrnn.bench.env import cpu_name  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--shape", default="100,64,256,256", metavar="T,B,I,H")
    args = p.parse_args()
    T, B, I, H = (int(v) for v in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    cores = all_cores()
    counts = (1, cores)
    torch.manual_seed(0)
    x = torch.randn(T, B, I, dtype=dtype)
    modules = {}
    for cell, torch_cls in (("lstm", nn.LSTM), ("gru", nn.GRU)):
        ref = torch_cls(I, H)
        fused = fusedrnn.modules.SEQUENCE_MODULES[cell](I, H)
        fused.load_state_dict(ref.state_dict())
        modules[cell] = {"fused": fused.to(dtype), "nn": ref.to(dtype)}

    def run(m, train):
        if train:
            out, _ = m(x)
            out.float().sum().backward()
        else:
            with torch.no_grad():
                m(x)

    def best_of_3(m, train):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            run(m, train)
            best = min(best, time.perf_counter() - t0)
        return best

    times = {}
    for _ in range(args.rounds):
        for n in counts:
            torch.set_num_threads(n)
            for cell, pair in modules.items():
                for impl, m in pair.items():
                    for train in (False, True):
                        run(m, train)  # warm-up at this thread count
                        times.setdefault((cell, impl, train, n), []).append(best_of_3(m, train))
    print(
        f"{cpu_name()}, fusedrnn CPU kernels: {fusedrnn.build_info()['cpu_isa']}, "
        f"{args.dtype}, T,B,I,H = {T},{B},{I},{H}, threads 1 and {cores}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, median of {args.rounds} rounds"
    )
    for cell in modules:
        for train in (False, True):
            ratio = {}
            parts = []
            for impl in ("fused", "nn"):
                one = statistics.median(times[(cell, impl, train, 1)]) * 1e3
                many = statistics.median(times[(cell, impl, train, cores)]) * 1e3
                ratio[impl] = one / many
                parts.append(f"{impl} {one:7.1f} -> {many:7.1f} ms ({ratio[impl]:.2f}x)")
            pass_ = "fwd+bwd" if train else "fwd"
            print(
                f"{cell:4} {pass_:7}  "
                + "  ".join(parts)
                + f"  fused / nn {ratio['fused'] / ratio['nn']:.2f}"
            )


if __name__ == "__main__":
    main()
