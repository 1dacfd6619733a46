"""Where the time of one LSTMCell / GRUCell call goes: the module, the routing, the op with its
autograd kernel and the op itself, peeled off one layer at a time, at a hidden size whose
arithmetic is negligible (H = 8: the per-call costs) and at H = 256 (the serving size). One
thread, fp32, median of repeated 2000-call loops.

    PYTHONPATH=. python scripts/profile_cell_call.py

Rows (microseconds per call):
  torch.nn           torch.nn.LSTMCell / GRUCell (the reference point)
  module             fusedrnn.LSTMCell / GRUCell: argument checks, state handling, then
  _layer.run         the routing (ONNX export, torch.func), then
  op                 torch.ops.fusedrnn.<cell>_forward through the dispatcher: its Autograd
                     kernel (csrc/ops/autograd.cpp) records a C++ node in grad mode around
                     the forward op called below the Autograd key, else calls it below the key
  op below autograd  the op with the Autograd key skipped: dispatcher and C++ driver only
"""

import statistics
import sys
import time

import torch

import fusedrnn
from fusedrnn import _layer, _ops
from fusedrnn.bench.env import cpu_name
from fusedrnn.reference import LayerArgs


def per_call_us(fn, calls=2000, repeats=7):
    for _ in range(200):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e6


def rows_for(name, H, grad):
    torch.manual_seed(0)
    nn_cls, f_cls = (
        (torch.nn.LSTMCell, fusedrnn.LSTMCell)
        if name == "lstm"
        else (torch.nn.GRUCell, fusedrnn.GRUCell)
    )
    ref, mod = nn_cls(H, H), f_cls(H, H)
    mod.load_state_dict(ref.state_dict())
    x, h, c = torch.randn(1, H), torch.randn(1, H), torch.randn(1, H)
    state = (h, c) if name == "lstm" else h
    args = LayerArgs(
        x.unsqueeze(0),
        mod.weight_ih,
        mod.weight_hh,
        mod.bias_ih,
        mod.bias_hh,
        None,
        None,
        h,
        c if name == "lstm" else None,
    )
    op = getattr(torch.ops.fusedrnn, f"{name}_forward")
    op_args = (
        (
            args.input,
            args.weight_ih,
            args.weight_hh,
            args.bias_ih,
            args.bias_hh,
            args.hx,
            None,
            False,
            False,
        )
        if name == "gru"
        else (*args, False)
    )
    calls = [
        ("torch.nn", lambda: ref(x, state)),
        ("module", lambda: mod(x, state)),
        ("_layer.run", lambda: _layer.run(name, args, exposed=False)),
        ("op", lambda: _ops.forward(name, args)),
    ]

    def below_autograd():
        with torch._C._AutoDispatchBelowAutograd():
            op.default(*op_args)

    calls.append(("op below autograd", below_autograd))
    out = []
    for label, fn in calls:
        if grad:
            out.append((label, per_call_us(fn)))
        else:
            with torch.no_grad():
                out.append((label, per_call_us(fn)))
    return out


def main():
    torch.set_num_threads(1)
    info = fusedrnn.build_info()
    print(
        f"{cpu_name()}, fusedrnn CPU kernels {info['cpu_isa']}, torch {torch.__version__}, "
        "1 thread, fp32, B = 1, microseconds per call (median)"
    )
    for name in ("lstm", "gru"):
        for H in (8, 256):
            for grad in (False, True):
                rows = rows_for(name, H, grad)
                mode = "grad mode (forward only)" if grad else "no_grad"
                print(f"\n{name} H={H} {mode}")
                for label, us in rows:
                    print(f"  {label:18s} {us:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
