"""The rational tanh measured as an alternative to the cells' (docs/performance.md, "The cells'
tanh"; not used): tanh(x) = x P(x^2) / Q(x^2) on [-C, C], C = 7.9053 (where the fit reaches 1
in float), P of degree 5 and Q of degree 3 in x^2 (Q(0) = 1). Fits the coefficients and measures
the error of the float evaluation (scripts/tanh_variants.cpp measures it with FMAs, and its
speed).

The fit minimises the largest relative error of P / Q against tanh(x) / x by Lawson's iteration:
weighted linear least squares on P - f Q (f = tanh(x) / x), each weight divided by the previous
Q (so that the linear residual is the relative error), and each weight multiplied by the square
root of its point's error every round, which moves the weight towards the points of largest error
until the error curve levels (a minimax fit). In x^2 / C^2 for the conditioning; the coefficients
are then scaled back and rounded to float.

The measurement evaluates the rounded coefficients in float32 with numpy (each operation rounded,
no FMA: within an ulp or so of the kernels' FMA evaluation) on every float in [0, 12] when
`--all` is given (1.1e9 values, a few minutes), else on 5e6 samples, against tanh in float64.

    python scripts/fit_tanh.py [--all]
"""

import sys

import numpy as np

C = 7.90531110763549805
NP, NQ = 6, 4  # coefficients of P and Q (in x^2)


def fit(rounds=80):
    x = np.unique(np.concatenate([np.linspace(1e-4, C, 40000), np.geomspace(1e-6, 1, 4000)]))
    s = x * x / (C * C)
    f = np.tanh(x) / x
    a_p = np.vstack([s**k for k in range(NP)]).T
    a_q = np.vstack([s**k for k in range(NQ)]).T
    w = np.ones_like(s)
    q_prev = np.ones_like(s)
    for _ in range(rounds):
        scale = w / (f * q_prev)
        m = np.hstack([a_p, -(f[:, None] * a_q[:, 1:])]) * scale[:, None]
        c = np.linalg.lstsq(m, f * scale, rcond=None)[0]
        p, q = c[:NP], np.concatenate([[1.0], c[NP:]])
        q_prev = a_q @ q
        err = np.abs((a_p @ p / q_prev - f) / f)
        w = w * np.sqrt(err / err.max() + 1e-3)
        w /= w.max()
    to_t = (C * C) ** -np.arange(max(NP, NQ))
    return (p * to_t[:NP]).astype(np.float32), (q * to_t[:NQ]).astype(np.float32), err.max()


def tanh_f32(x, p, q):
    """The kernels' evaluation, in float32: clamp, x P(t) / Q(t) by Horner."""
    c = np.float32(C)
    x = np.minimum(np.maximum(x, -c), c)
    t = x * x
    pv = np.full_like(x, p[-1])
    for k in p[-2::-1]:
        pv = pv * t + k
    qv = np.full_like(x, q[-1])
    for k in q[-2::-1]:
        qv = qv * t + k
    return x * pv / qv


def main():
    p, q, fit_err = fit()
    print(f"fit: largest relative error {fit_err:.2e} (exact arithmetic)")
    print("P (t^0 ..):", ", ".join(f"{v:.9g}" for v in p))
    print("Q (t^0 ..):", ", ".join(f"{v:.9g}" for v in q))
    if "--all" in sys.argv:
        top = np.array(12.0, np.float32).view(np.uint32)
        chunks = (
            np.arange(a, min(a + 1 << 24, top), dtype=np.uint32) for a in range(0, top, 1 << 24)
        )
    else:
        rng = np.random.default_rng(0)
        chunks = [
            np.concatenate(
                [
                    rng.uniform(0, 12, 3_000_000),
                    rng.uniform(0, 1, 1_000_000),
                    np.geomspace(1e-30, 1, 1_000_000),
                ]
            ).astype(np.float32)
        ]
    worst_ulp = worst_rel = top_value = 0.0
    at = None
    for chunk in chunks:
        x = chunk.view(np.float32) if chunk.dtype == np.uint32 else chunk
        y = tanh_f32(x, p, q).astype(np.float64)
        ref = np.tanh(x.astype(np.float64))
        err = np.abs(y - ref)
        ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
        k = int(np.argmax(err / ulp))
        if err[k] / ulp[k] > worst_ulp:
            worst_ulp, at = err[k] / ulp[k], float(x[k])
        pos = ref > 0
        worst_rel = max(worst_rel, float((err[pos] / ref[pos]).max(initial=0.0)))
        top_value = max(top_value, float(y.max()))
    print(
        f"float32 evaluation: largest error {worst_ulp:.2f} ulp (at x = {at:.7g}), relative "
        f"{worst_rel:.2e}; largest value {top_value!r} (never above 1)"
    )
    assert top_value <= 1.0


if __name__ == "__main__":
    main()
