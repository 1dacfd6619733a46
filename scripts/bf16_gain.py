"""fusedrnn's bf16 layers against its fp32 layers, one thread: LSTM and GRU at T=100, B=64,
I=H=512 (or the T B H given), forward (no grad) and forward + backward, fp32 and bf16 modules with
the same weights. Medians of CPU time of the calling thread (time.thread_time), the four calls of
a layer interleaved round by round, so that a neighbour's load falls on all of them.

    PYTHONPATH=. python scripts/bf16_gain.py [T B H] [rounds]
"""

import sys
import time

import torch

import fusedrnn


def median_ms(fn, calls):
    ts = []
    for _ in range(calls):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return sorted(ts)[calls // 2] * 1e3


def main():
    args = [int(a) for a in sys.argv[1:]]
    T, B, H = args[:3] if len(args) >= 3 else (100, 64, 512)
    rounds = args[3] if len(args) >= 4 else 3
    torch.set_num_threads(1)
    info = fusedrnn.build_info()
    print(f"torch {torch.__version__}, one thread, cpu_isa {info['cpu_isa']}, T={T} B={B} I=H={H}")
    for cls in (fusedrnn.LSTM, fusedrnn.GRU):
        torch.manual_seed(0)
        m32 = cls(H, H)
        m16 = cls(H, H)
        m16.load_state_dict(m32.state_dict())
        m16 = m16.bfloat16()
        x32 = torch.randn(T, B, H)
        x16 = x32.bfloat16()

        def forward(m, x):
            def run():
                with torch.no_grad():
                    m(x)

            return run

        def training(m, x):
            def run():
                m(x)[0].sum().backward()

            return run

        calls = {
            "fp32 fwd": forward(m32, x32),
            "bf16 fwd": forward(m16, x16),
            "fp32 fwd+bwd": training(m32, x32),
            "bf16 fwd+bwd": training(m16, x16),
        }
        for run in calls.values():
            run()  # warm-up
        times = {k: [] for k in calls}
        for _ in range(rounds):
            for k, run in calls.items():
                times[k].append(median_ms(run, 3))
        ms = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(
            f"{cls.__name__}: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
            + f"; bf16 over fp32: fwd {ms['fp32 fwd'] / ms['bf16 fwd']:.2f}x, "
            f"fwd+bwd {ms['fp32 fwd+bwd'] / ms['bf16 fwd+bwd']:.2f}x"
        )


if __name__ == "__main__":
    main()
