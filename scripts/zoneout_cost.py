"""What zoneout costs: fusedrnn.LSTM, GRU and their layer-normalised forms with and without
zoneout=0.1, fp32, T=100 B=64 I=H=256, the training pass (forward+backward) and the eval forward,
timed alternately in one process (median of the rounds), and the time of drawing the masks alone
(fusedrnn.reference.zoneout_masks, as the modules draw them: in the op's dtype). One
thread unless told; with proj_size, the LSTM-family modules projected to that width.

    python scripts/zoneout_cost.py [rounds] [LSTM,GRU,LayerNormLSTM,LayerNormGRU] [threads] \
        [proj_size]
"""

import statistics
import sys
import time

import torch

import fusedrnn
from fusedrnn import reference

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
T, B, I, H = 100, 64, 256, 256
P = int(sys.argv[4]) if len(sys.argv) > 4 else 0
x = torch.randn(T, B, I)
g = torch.randn(T, B, P or H)
for kind in sys.argv[2].split(",") if len(sys.argv) > 2 else ("LSTM", "GRU"):
    torch.manual_seed(0)
    kwargs = {"proj_size": P} if P else {}
    plain = getattr(fusedrnn, kind)(I, H, **kwargs)
    zoned = getattr(fusedrnn, kind)(I, H, zoneout=0.1, **kwargs)
    zoned.load_state_dict(plain.state_dict())

    def train(m):
        m.zero_grad(set_to_none=True)
        m(x)[0].backward(g)

    def fwd(m):
        with torch.no_grad():
            m(x)

    def masks(m):
        for width in (H, P or H) if "LSTM" in kind else (H,):
            reference.zoneout_masks(T * B, width, 0.1, x, x.dtype)

    for name, fn, mods in (("train", train, (plain, zoned)), ("eval fwd", fwd, (plain, zoned))):
        for m in mods:
            m.train(name == "train")
        times = {0: [], 1: []}
        for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 7):
            for i, m in enumerate(mods):
                fn(m)
                t0 = time.perf_counter()
                fn(m)
                times[i].append(time.perf_counter() - t0)
        p, z = statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3
        print(
            f"{kind:4s} {name:8s} plain {p:7.1f} ms  zoneout {z:7.1f} ms  "
            f"cost {100 * (z / p - 1):+5.1f}%",
            flush=True,
        )
    t = []
    for r in range(5):
        t0 = time.perf_counter()
        masks(None)
        t.append(time.perf_counter() - t0)
    print(f"{kind:4s} drawing the masks alone: {statistics.median(t) * 1e3:.1f} ms")
