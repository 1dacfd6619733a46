"""fusedrnn.convert: swap torch.nn's recurrent modules for the fused ones, weights kept."""

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from . import modules

_SEQUENCE = {nn.LSTM: modules.LSTM, nn.GRU: modules.GRU}
_CELLS = {nn.LSTMCell: modules.LSTMCell, nn.GRUCell: modules.GRUCell}


def _base_type(m: nn.Module) -> type:
    """The class of `m` before torch.nn.utils.parametrize made it a Parametrized* subclass."""
    return parametrize.type_before_parametrizations(m)


def _fused_copy(m: nn.Module) -> nn.Module:
    base = _base_type(m)
    w = next(m.parameters())
    factory = {"device": w.device, "dtype": w.dtype}
    # The new module's random initialisation is overwritten by the old weights below; it must
    # not advance the random generators either, or a seeded program would draw other dropout
    # masks from then on than the same program with torch.nn.
    devices = [w.device.index] if w.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=w.device.type if devices else "cuda"):
        if base in _SEQUENCE:
            kwargs = dict(
                num_layers=m.num_layers,
                bias=m.bias,
                batch_first=m.batch_first,
                dropout=m.dropout,
                bidirectional=m.bidirectional,
                **factory,
            )
            if base is nn.LSTM:
                kwargs["proj_size"] = m.proj_size
            with warnings.catch_warnings():  # torch.nn warned of a one-layer dropout already
                warnings.filterwarnings("ignore", "dropout option adds dropout", UserWarning)
                new = _SEQUENCE[base](m.input_size, m.hidden_size, **kwargs)
        else:
            new = _CELLS[base](m.input_size, m.hidden_size, bias=m.bias, **factory)
    # Hooks: the old-style torch.nn.utils.weight_norm is re-applied with the same name and dim
    # (it replaces the weight by weight_g / weight_v parameters and recomputes the weight before
    # every forward); any other hook is carried over as it is.
    for hook_id, hook in m._forward_pre_hooks.items():
        if isinstance(hook, WeightNorm):
            with warnings.catch_warnings():  # its deprecation was shown when it was applied
                warnings.simplefilter("ignore", FutureWarning)
                nn.utils.weight_norm(new, hook.name, hook.dim)
        else:
            new._forward_pre_hooks[hook_id] = hook
            if hook_id in m._forward_pre_hooks_with_kwargs:
                new._forward_pre_hooks_with_kwargs[hook_id] = True
    for hook_id, hook in m._forward_hooks.items():
        new._forward_hooks[hook_id] = hook
        for d in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hook_id in getattr(m, d):
                getattr(new, d)[hook_id] = True
    # torch.nn.utils.parametrize: the same parametrizations (copies of them) on the same
    # tensors, in the same order; their `original` tensors come with the state_dict below.
    if parametrize.is_parametrized(m):
        for name, plist in m.parametrizations.items():
            for p in plist:
                parametrize.register_parametrization(new, name, copy.deepcopy(p), unsafe=True)
    missing, unexpected = new.load_state_dict(m.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"fusedrnn.convert: cannot convert {type(m).__name__}: its state_dict does not map "
            f"onto fusedrnn.{type(new).__name__} (missing {missing}, unexpected {unexpected}). "
            "Remove what modifies the module's parameters before converting, and apply it to "
            "the converted module instead."
        )
    params = dict(new.named_parameters())
    for name, param in m.named_parameters():  # frozen weights stay frozen
        params[name].requires_grad_(param.requires_grad)
    new.train(m.training)
    return new


def _convert(module: nn.Module, memo: dict) -> nn.Module:
    if id(module) in memo:  # a module used in several places: one fused module, the tie kept
        return memo[id(module)]
    if _base_type(module) in _SEQUENCE or _base_type(module) in _CELLS:
        new = _fused_copy(module)
    else:
        new = module
        for name, child in list(module._modules.items()):
            if child is not None:
                setattr(module, name, _convert(child, memo))
    memo[id(module)] = new
    return new


def convert(module: nn.Module) -> nn.Module:
    """Replace, recursively and in place, every nn.LSTM / nn.GRU / nn.LSTMCell / nn.GRUCell
    (exact types, not subclasses; parametrized ones included) by the fused module with the same
    weights, device, dtype, training mode, parametrizations (torch.nn.utils.parametrize and the
    old-style torch.nn.utils.weight_norm) and hooks, and return `module` (or its replacement
    when it is one of those itself). A module reachable under several names becomes one fused
    module reachable under the same names, so that tied modules stay tied."""
    return _convert(module, {})
