"""Page faults and time per training step of a fusedrnn layer and of torch.nn's, one thread:
forward + backward of a T x B x H layer (I = H) with the input requiring grad, after a few
untimed steps; minor page faults from getrusage, medians of wall time. Run it with
FUSEDRNN_CPU_POOL_MB=0 and without to see what the pool of the layers' CPU buffers saves
(docs/cpu_kernels.md, "Memory of the calls").

    PYTHONPATH=. python scripts/page_faults.py LSTM,GRU 100 16 128 bfloat16 [steps]
"""

import resource
import sys
import time

import torch

import fusedrnn


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main():
    kinds = sys.argv[1].split(",")
    T, B, H = (int(v) for v in sys.argv[2:5])
    dtype = getattr(torch, sys.argv[5]) if len(sys.argv) > 5 else torch.float32
    steps = int(sys.argv[6]) if len(sys.argv) > 6 else 30
    torch.set_num_threads(1)
    print(
        f"one thread, T={T} B={B} H={H} {dtype}, cpu_isa {fusedrnn.build_info()['cpu_isa']}, "
        f"pool {fusedrnn.build_info()['cpu_pool_mb']} MB"
    )
    for kind in kinds:
        for lib in (fusedrnn, torch.nn):
            if not hasattr(lib, kind):  # the layers torch.nn lacks
                continue
            torch.manual_seed(0)
            module = getattr(lib, kind)(H, H, dtype=dtype)
            x = torch.randn(T, B, H, dtype=dtype, requires_grad=True)

            def step(module=module, x=x):
                out, _ = module(x)
                out.sum().backward()

            for _ in range(5):
                step()
            times = []
            f0 = faults()
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            per_step = (faults() - f0) / steps
            median = sorted(times)[len(times) // 2] * 1e3
            print(f"{lib.__name__:9s} {kind}: {median:8.2f} ms, {per_step:8.1f} page faults a step")


if __name__ == "__main__":
    main()
