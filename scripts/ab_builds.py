"""Two builds of fusedrnn side by side: recurrent layers (bf16, or --dtype float32), one
thread, T=100 at (B, H) = (16, 128), (64, 256), (64, 512) (or --shapes "B,H;B,H"), I = H,
forward (no grad) and forward + backward, the LSTM and GRU each against torch.nn in the same
process (--cells: any of lstm, gru, layer_norm_lstm, layer_norm_gru; default lstm,gru; the
layer-normalised ones have no torch.nn layer); the builds' processes interleaved, `rounds`
each, and the median per build reported. A build is a folder holding a `fusedrnn` package with
its compiled extension (e.g. a copy of the repository's `fusedrnn/` after `setup.py build_ext
--inplace` at one commit, and another at the next).

    python scripts/ab_builds.py BEFORE_DIR AFTER_DIR [rounds] [repeats] [--dtype float32]
        [--cells lstm,gru,layer_norm_lstm,layer_norm_gru] [--shapes "64,256;16,128"]

Timing: medians of `repeats` calls' CPU time of the calling thread (time.thread_time).
"""

import json
import os
import statistics
import subprocess
import sys

SHAPES = ((16, 128), (64, 256), (64, 512))


CELLS = ("lstm", "gru", "layer_norm_lstm", "layer_norm_gru")


def measure(repeats, dtype, cells, shapes):
    """Run inside one build's process: {case: (fused ms, torch.nn ms or None)} as JSON on
    stdout."""
    import torch
    from bf16_layers import median_ms  # this folder's: thread CPU time, the median

    import fusedrnn

    torch.set_num_threads(1)
    layers = {
        "lstm": (fusedrnn.LSTM, torch.nn.LSTM),
        "gru": (fusedrnn.GRU, torch.nn.GRU),
        "layer_norm_lstm": (fusedrnn.LayerNormLSTM, None),
        "layer_norm_gru": (fusedrnn.LayerNormGRU, None),
    }
    out = {}
    for name in cells:
        fused_cls, nn_cls = layers[name]
        for B, H in shapes:
            torch.manual_seed(0)
            fused = fused_cls(H, H).to(dtype)
            nn = None
            if nn_cls is not None:
                nn = nn_cls(H, H).to(dtype)
                nn.load_state_dict(fused.state_dict())
            x = torch.randn(100, B, H).to(dtype)
            for mode in ("fwd", "fwd+bwd"):

                def run(m, mode=mode, x=x):
                    if mode == "fwd":
                        with torch.no_grad():
                            m(x)
                    else:
                        y, _ = m(x)
                        y.float().sum().backward()

                out[f"{name} B={B} H={H} {mode}"] = (
                    median_ms(lambda: run(fused), repeats),
                    median_ms(lambda: run(nn), repeats) if nn is not None else None,
                )
    print(json.dumps(out))


def main():
    import torch

    args = sys.argv[1:]

    def option(flag, default):
        if flag not in args:
            return default
        k = args.index(flag)
        value = args[k + 1]
        del args[k : k + 2]
        return value

    dtype = option("--dtype", "bfloat16")
    cells = option("--cells", "lstm,gru")
    shapes = option("--shapes", ";".join(f"{b},{h}" for b, h in SHAPES))
    if dtype not in ("bfloat16", "float32"):
        raise SystemExit(f"--dtype: expected bfloat16 or float32, got {dtype!r}")
    bad = [c for c in cells.split(",") if c not in CELLS]
    if bad:
        raise SystemExit(f"--cells: expected some of {','.join(CELLS)}, got {cells!r}")
    try:
        shape_list = [tuple(int(v) for v in s.split(",")) for s in shapes.split(";")]
        if any(len(s) != 2 or min(s) < 1 for s in shape_list):
            raise ValueError
    except ValueError:
        raise SystemExit(f'--shapes: expected "B,H;B,H..." of positive sizes, got {shapes!r}')
    if args[0] == "--measure":
        measure(int(args[1]), getattr(torch, dtype), cells.split(","), shape_list)
        return
    builds = args[0:2]
    rounds = int(args[2]) if len(args) > 2 else 3
    repeats = int(args[3]) if len(args) > 3 else 5
    runs = {b: [] for b in builds}
    for _ in range(rounds):
        for b in builds:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(b))
            res = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--measure",
                    str(repeats),
                    "--dtype",
                    dtype,
                    "--cells",
                    cells,
                    "--shapes",
                    shapes,
                ],
                env=env,
                cwd="/",
                check=True,
                capture_output=True,
                text=True,
            )
            runs[b].append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"{dtype}, one thread, {rounds} interleaved processes per build; ms and x torch.nn, medians"
    )
    for case in runs[builds[0]][0]:
        columns = []
        for b in builds:
            fused = statistics.median(r[case][0] for r in runs[b])
            if runs[b][0][case][1] is None:
                columns.append(f"{fused:9.2f} ms      -")
                continue
            ratio = statistics.median(r[case][1] / r[case][0] for r in runs[b])
            columns.append(f"{fused:9.2f} ms {ratio:5.2f}x")
        print(f"{case:34s} " + "   ".join(columns))


if __name__ == "__main__":
    main()
