"""Forward and backward times of fusedrnn's sequence modules in training, apart: each round runs
`y, _ = m(x)` (x requires grad) and then `y.sum().backward()`, timed separately; the medians of
the rounds, after one untimed round (a process's first call runs slower: page faults of fresh
memory, oneDNN's kernel generation). fp32, T=100 B=64 I=H=256, one thread unless told. With
`eval`, the inference forward instead (`with torch.no_grad(): m(x)`).

    python scripts/layer_timing.py [LayerNormLSTM,LSTM,LayerNormGRU,GRU] [threads] [rounds] [eval]
"""

import statistics
import sys
import time

import torch

import fusedrnn

kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else ["LayerNormLSTM", "LSTM"]
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 7
inference = len(sys.argv) > 4 and sys.argv[4] == "eval"
T, B, I, H = 100, 64, 256, 256
torch.manual_seed(0)
x = torch.randn(T, B, I, requires_grad=True)
print(f"{torch.get_num_threads()} thread(s), ISA {fusedrnn.build_info()['cpu_isa']}")
for kind in kinds:
    m = getattr(fusedrnn, kind)(I, H)
    if inference:
        times = []
        with torch.no_grad():
            m(x)
            for _ in range(rounds):
                t0 = time.perf_counter()
                m(x)
                times.append(time.perf_counter() - t0)
        print(f"{kind:14s} inference forward {statistics.median(times) * 1e3:7.1f} ms")
        continue
    fwd, bwd = [], []
    m(x)[0].sum().backward()
    for _ in range(rounds):
        t0 = time.perf_counter()
        y, _ = m(x)
        t1 = time.perf_counter()
        y.sum().backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    f, b = statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3
    print(f"{kind:14s} forward {f:7.1f} ms  backward {b:7.1f} ms  total {f + b:7.1f} ms")
