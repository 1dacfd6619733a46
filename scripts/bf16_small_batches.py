"""bf16 layers and cells at the batch sizes of serving (1-4 rows a step, the steps' GEMMs of few
rows, not the tiles) against the same in fp32 and torch.nn's bf16: LSTM and GRU layers of
H = I = 512 at T = 200 and 10, B = 1, and of H = 256 at T = 100, B = 4; a 10-step loop of an
LSTMCell / GRUCell at B = 1, H = 512. Forward without grad (--backward: forward + backward of
the outputs' sum, the input not requiring grad), one thread, median of CPU time of the calling
thread (time.thread_time) over rounds in which the three are called in turn, so that a
neighbour's load falls on all of them. --threads N: N threads, wall-clock time (a thread's CPU
time would leave out the others' work).

    PYTHONPATH=. python scripts/bf16_small_batches.py [rounds] [--no-nn] [--backward] [--threads N]

--no-nn leaves out torch.nn's bf16 column (on a CPU without oneDNN's bf16 GEMMs it runs ATen's
fallback loops and takes most of the time).
"""

import sys
import time

import torch

import fusedrnn
from fusedrnn.bench.env import cpu_name

LAYERS = [("LSTM", 200, 1, 512), ("LSTM", 10, 1, 512), ("LSTM", 100, 4, 256)]
LAYERS += [("GRU", 200, 1, 512), ("GRU", 10, 1, 512), ("GRU", 100, 4, 256)]
CELLS = [("LSTMCell", 10, 1, 512), ("GRUCell", 10, 1, 512)]


def elapsed_ms(fn, clock):
    t0 = clock()
    fn()
    return (clock() - t0) * 1e3


def call(module, x, backward):
    if "Cell" in type(module).__name__:
        state, outs = None, []
        for t in range(x.shape[0]):  # a step loop, the state fed back
            state = module(x[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        out = torch.stack(outs)
    else:
        out = module(x)[0]
    if backward:
        out.float().sum().backward()


def main():
    argv = sys.argv[1:]
    threads = 1
    if "--threads" in argv:
        i = argv.index("--threads")
        threads = int(argv[i + 1])
        del argv[i : i + 2]
    args = [a for a in argv if not a.startswith("--")]
    rounds = int(args[0]) if args else 5
    with_nn = "--no-nn" not in sys.argv
    backward = "--backward" in sys.argv
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    info = fusedrnn.build_info()
    isa = info["cpu_isa"]
    print(f"{cpu_name()}, torch {torch.__version__}, cpu_isa {isa}, {threads} thread(s)")
    what = "forward + backward" if backward else "forward, no grad"
    kind = "CPU time" if threads == 1 else "wall-clock time"
    print(f"{what}; ms, medians of {kind} over", rounds, "rounds")
    header = f"{'case':<26}{'fused fp32':>12}{'fused bf16':>12}{'bf16 x fp32':>12}"
    print(header + (f"{'nn bf16':>12}{'x nn':>8}" if with_nn else ""))
    for name, T, B, H in LAYERS + CELLS:
        torch.manual_seed(0)
        ref = getattr(torch.nn, name)(H, H)
        f32 = getattr(fusedrnn, name)(H, H)
        f32.load_state_dict(ref.state_dict())
        f16 = getattr(fusedrnn, name)(H, H).bfloat16()
        f16.load_state_dict(ref.state_dict())
        ref = ref.bfloat16()
        x32 = torch.randn(T, B, H)
        x16 = x32.bfloat16()
        runs = [("f32", f32, x32), ("f16", f16, x16)] + ([("nn", ref, x16)] if with_nn else [])
        times = {k: [] for k, _, _ in runs}
        with torch.set_grad_enabled(backward):
            for k, m, x in runs:  # warm-up
                call(m, x, backward)
            for _ in range(rounds):
                for k, m, x in runs:
                    times[k].append(elapsed_ms(lambda: call(m, x, backward), clock))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        line = f"{name} T={T} B={B} H={H}".ljust(26)
        line += f"{med['f32']:12.2f}{med['f16']:12.2f}{med['f32'] / med['f16']:11.2f}x"
        if with_nn:
            line += f"{med['nn']:12.2f}{med['nn'] / med['f16']:7.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
