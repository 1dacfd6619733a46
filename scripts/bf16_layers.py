"""bf16 LSTM and GRU layers against torch.nn's, one thread: forward (no grad) and forward +
backward at T=100 and (B, H) = (16, 128), (64, 256), (64, 512), I = H, with the input requiring
grad; medians of CPU time of the calling thread (time.thread_time: on a shared machine it does not
count the time the thread waits for a core). The path fusedrnn's bf16 calls take is what
FUSEDRNN_CPU_BF16_TILES / FUSEDRNN_CPU_ISA / FUSEDRNN_CPU_FUSED select (docs/cpu_kernels.md);
torch.nn's bf16 LSTM is oneDNN's (AMX where the CPU has it and ONEDNN_MAX_CPU_ISA allows it).

    PYTHONPATH=. python scripts/bf16_layers.py [repeats]
"""

import sys
import time

import torch

import fusedrnn

SHAPES = ((100, 16, 128), (100, 64, 256), (100, 64, 512))


def median_ms(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def main():
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.set_num_threads(1)
    info = fusedrnn.build_info()
    print(
        f"torch {torch.__version__}, one thread, cpu_isa {info['cpu_isa']}, "
        f"bf16 tiles {info['cpu_bf16_tiles']}, oneDNN bf16 AMX {info['cpu_onednn_bf16_amx']}"
    )
    for fused_cls, nn_cls in ((fusedrnn.LSTM, torch.nn.LSTM), (fusedrnn.GRU, torch.nn.GRU)):
        for T, B, H in SHAPES:
            torch.manual_seed(0)
            fused = fused_cls(H, H).bfloat16()
            ref = nn_cls(H, H).bfloat16()
            ref.load_state_dict(fused.state_dict())
            x = torch.randn(T, B, H).bfloat16()
            with torch.no_grad():
                f_fwd = median_ms(lambda: fused(x), repeats)
                n_fwd = median_ms(lambda: ref(x), repeats)
            xg = x.clone().requires_grad_()

            def train(m):
                return lambda: m(xg)[0].float().sum().backward()

            f_fb = median_ms(train(fused), repeats)
            n_fb = median_ms(train(ref), repeats)
            print(
                f"{nn_cls.__name__} T={T} B={B} H={H}: fwd {f_fwd:.1f} ms vs nn {n_fwd:.1f} "
                f"({n_fwd / f_fwd:.2f}x nn); fwd+bwd {f_fb:.1f} vs {n_fb:.1f} "
                f"({n_fb / f_fb:.2f}x nn)",
                flush=True,
            )


if __name__ == "__main__":
    main()
