"""DropConnect on the recurrent weight (`dropconnect=p`): one mask per forward call, shared by
every step of that call, scaled by 1 / (1 - p), in training only; the gradient reaches the
parameter through the mask."""

import math
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import fusedrnn
from fusedrnn import modules

CELLS = list(modules.SEQUENCE_MODULES)
T, B, I, H = 5, 3, 4, 8


def _sequence(cell, p, **kwargs):
    torch.manual_seed(0)
    return modules.SEQUENCE_MODULES[cell](I, H, dropconnect=p, dtype=torch.float64, **kwargs)


def _masked_call(module, x, seed, p):
    """The module's forward with dropconnect=0 and each weight_hh replaced by
    F.dropout(weight_hh, p) drawn under `seed` in the module's order (layer by layer, forward
    then reverse direction): what one mask per call and per layer-direction means."""
    params = dict(module.named_parameters())
    torch.manual_seed(seed)
    for layer in range(module.num_layers):
        for sfx in ("", "_reverse") if module.bidirectional else ("",):
            name = f"weight_hh_l{layer}{sfx}"
            params[name] = nn.functional.dropout(params[name], p, True)
    saved = module.dropconnect
    module.dropconnect = 0.0
    try:
        return functional_call(module, params, (x,))
    finally:
        module.dropconnect = saved


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layout", ["plain", "bidir2", "packed"])
def test_training_is_one_mask_per_call_shared_by_every_step(cell, layout):
    kwargs = {"num_layers": 2, "bidirectional": True} if layout == "bidir2" else {}
    m = _sequence(cell, 0.4, **kwargs).train()
    x = torch.randn(T, B, I, dtype=torch.float64)
    if layout == "packed":
        x = nn.utils.rnn.pack_padded_sequence(x, [5, 4, 2], enforce_sorted=False)
    torch.manual_seed(7)
    out = m(x)
    expected = _masked_call(m, x, 7, 0.4)
    got_out, want_out = out[0], expected[0]
    if layout == "packed":
        got_out, want_out = got_out.data, want_out.data
    # the same arithmetic on the same masked weights: fp64 rounding only
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1], expected[1], rtol=1e-12, atol=1e-12)
    torch.manual_seed(7)
    again = m(x)
    assert torch.equal(again[0].data if layout == "packed" else again[0], got_out)
    torch.manual_seed(8)
    other = m(x)
    assert not torch.equal(other[0].data if layout == "packed" else other[0], got_out)


@pytest.mark.parametrize("cell", CELLS)
def test_eval_and_zero_rate_are_the_plain_layer_and_draw_nothing(cell):
    m = _sequence(cell, 0.5)
    plain = _sequence(cell, 0.0)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    m.eval()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    assert torch.equal(m(x)[0], plain.eval()(x)[0])
    plain.train()
    plain(x)
    # neither eval nor p = 0 draws a random number (torch.nn's modules draw none either)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("cell", CELLS)
def test_the_gradient_reaches_the_parameter_through_the_mask(cell):
    p = 0.3
    m = _sequence(cell, p).train()
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.manual_seed(3)
    out = m(x)[0]
    out.square().sum().backward()
    grads = {n: q.grad for n, q in m.named_parameters()}
    m.zero_grad()
    expected = _masked_call(m, x, 3, p)[0]
    expected.square().sum().backward()
    for name, q in m.named_parameters():
        torch.testing.assert_close(grads[name], q.grad, rtol=1e-10, atol=1e-12)
    # the dropped weights get no gradient; their fraction is p within a binomial bound: 4.5
    # standard deviations, a false failure once in ~150000 runs
    g = grads["weight_hh_l0"]
    n = g.numel()
    dropped = (g == 0).sum().item()
    assert abs(dropped - p * n) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1


def test_kept_fraction_is_binomial_on_a_large_weight():
    """The mask the modules draw (fusedrnn.reference.dropconnect) over a 4H x H = 262144-element
    weight: its kept fraction within 4.5 standard deviations of 1 - p (a false failure once in
    ~150000 runs), the kept weights scaled by 1 / (1 - p), every weight dropped at p = 1."""
    p = 0.25
    w = modules.LSTM(4, 256).weight_hh_l0.detach()
    masked = fusedrnn.reference.dropconnect(w, p, True)
    kept = masked != 0
    n = w.numel()
    assert abs(kept.sum().item() - (1 - p) * n) <= 4.5 * math.sqrt(n * p * (1 - p))
    # dropout multiplies by 1 / (1 - p) rounded to fp32: a rounding or two from the quotient
    torch.testing.assert_close(masked[kept], w[kept] / (1 - p), rtol=2.5e-7, atol=0)
    assert not fusedrnn.reference.dropconnect(w, 1.0, True).any()


@pytest.mark.parametrize("cell", CELLS)
def test_cell_draws_a_fresh_mask_per_call(cell):
    torch.manual_seed(0)
    c = modules.CELL_MODULES[cell](I, H, dropconnect=0.5, dtype=torch.float64)
    x = torch.randn(B, I, dtype=torch.float64)
    hx = torch.randn(B, H, dtype=torch.float64)
    state = (hx, torch.randn(B, H, dtype=torch.float64)) if cell != "gru" else hx
    torch.manual_seed(5)
    got = c(x, state)
    params = dict(c.named_parameters())
    torch.manual_seed(5)
    params["weight_hh"] = nn.functional.dropout(params["weight_hh"], 0.5, True)
    c.dropconnect = 0.0
    want = functional_call(c, params, (x, state))
    c.dropconnect = 0.5
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    c.eval()  # no mask in eval
    c.dropconnect = 0.0
    plain = c(x, state)
    c.dropconnect = 0.5
    assert all(torch.equal(a, b) for a, b in zip(_tuple(c(x, state)), _tuple(plain)))


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", True, None, float("nan")])
@pytest.mark.parametrize("kind", ["sequence", "cell"])
def test_bad_rate_is_a_clear_error(bad, kind):
    make = modules.LSTM if kind == "sequence" else modules.GRUCell
    with pytest.raises(ValueError, match=r"dropconnect should be a number in range \[0, 1\]"):
        make(I, H, dropconnect=bad)


def test_names_repr_state_dict_and_pickle():
    m = modules.GRU(I, H, num_layers=2, dropconnect=0.2)
    ref = nn.GRU(I, H, num_layers=2)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert "dropconnect=0.2" in repr(m) and "dropconnect" not in repr(modules.GRU(I, H))
    assert "dropconnect=0.2" in repr(modules.LSTMCell(I, H, dropconnect=0.2))
    m.load_state_dict(ref.state_dict())
    back = pickle.loads(pickle.dumps(m))
    assert back.dropconnect == 0.2
    # a module pickled before the attribute existed loads with the default
    del back.__dict__["dropconnect"]
    assert pickle.loads(pickle.dumps(back)).dropconnect == 0.0
    with pytest.raises(TypeError):  # keyword-only: torch.nn's positional order is unchanged
        modules.LSTM(I, H, 1, True, False, 0.0, False, 0, None, None, 0.5)


def test_compile_fullgraph_training_matches_eager_under_a_seed(monkeypatch):
    """torch.compile(fullgraph=True) of a training step: with Inductor's random numbers taken
    from torch's generator (fallback_random), the same seed gives eager's result."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    m = _sequence("lstm", 0.5).float().train()
    x = torch.randn(T, B, I)

    def step(x):
        out, _ = m(x)
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True)
    torch.manual_seed(2)
    loss = compiled(x)
    loss.backward()
    got = m.weight_hh_l0.grad.clone()
    m.zero_grad()
    torch.manual_seed(2)
    want_loss = step(x)
    want_loss.backward()
    # fp32, the same masks and the same kernels; the compiled graph may order the sums of the
    # loss differently
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, m.weight_hh_l0.grad, rtol=1e-5, atol=1e-6)
    assert (got == 0).any()  # the mask ran in the compiled graph


class _WeightDrop(nn.Module):
    """A weight-drop wrapper as AWD-LSTM writes one: the recurrent weight becomes a parameter
    `<name>_raw` of the wrapped module, and a dropped copy is set before every call."""

    def __init__(self, module, p):
        super().__init__()
        self.module, self.p = module, p
        w = module.weight_hh_l0
        del module._parameters["weight_hh_l0"]
        module.register_parameter("weight_hh_l0_raw", nn.Parameter(w.detach().clone()))

    def forward(self, x):
        raw = self.module.weight_hh_l0_raw
        # (in eval a copy: dropout would return the parameter itself, which setattr would
        # register as the module's parameter)
        w = nn.functional.dropout(raw, self.p, True) if self.training else raw.clone()
        setattr(self.module, "weight_hh_l0", w)
        return self.module(x)


def test_the_readme_recipe_replaces_a_weight_drop_wrapper():
    """README's recipe: the wrapper's state_dict, `module.` and `_raw` removed, loads into the
    fused module, which then computes what the wrapper computes, in eval and, under a seed, in
    training."""
    torch.manual_seed(0)
    wrapped = _WeightDrop(nn.LSTM(I, H), 0.5)
    assert "module.weight_hh_l0_raw" in wrapped.state_dict()
    rnn = modules.LSTM(I, H, dropconnect=0.5)
    state = {
        k.replace("module.", "").replace("_raw", ""): v for k, v in wrapped.state_dict().items()
    }
    rnn.load_state_dict(state)
    x = torch.randn(T, B, I)
    # fp32, oneDNN's LSTM against the fused one
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(rnn.eval()(x)[0], wrapped.eval()(x)[0], **tol)
    with warnings.catch_warnings():  # torch.nn warns of a weight that is not a parameter
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(4)
        want = wrapped.train()(x)[0]
    torch.manual_seed(4)
    torch.testing.assert_close(rnn.train()(x)[0], want, **tol)
