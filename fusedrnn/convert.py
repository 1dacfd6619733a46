"""fusedrnn.convert: swap torch.nn's recurrent modules for the fused ones, weights kept."""
from torch import nn

from . import modules

_SEQUENCE = {nn.LSTM: modules.LSTM, nn.GRU: modules.GRU}
_CELLS = {nn.LSTMCell: modules.LSTMCell, nn.GRUCell: modules.GRUCell}


def _fused_copy(m: nn.Module) -> nn.Module:
    w = next(m.parameters())
    factory = {"device": w.device, "dtype": w.dtype}
    if type(m) in _SEQUENCE:
        kwargs = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                      dropout=m.dropout, bidirectional=m.bidirectional, **factory)
        if isinstance(m, nn.LSTM):
            kwargs["proj_size"] = m.proj_size
        new = _SEQUENCE[type(m)](m.input_size, m.hidden_size, **kwargs)
    else:
        new = _CELLS[type(m)](m.input_size, m.hidden_size, bias=m.bias, **factory)
    new.load_state_dict(m.state_dict())
    for name, param in m.named_parameters():  # frozen weights stay frozen
        getattr(new, name).requires_grad_(param.requires_grad)
    new.train(m.training)
    return new


def convert(module: nn.Module) -> nn.Module:
    """Replace, recursively and in place, every nn.LSTM / nn.GRU / nn.LSTMCell / nn.GRUCell
    (exact types, not subclasses) by the fused module with the same weights, device, dtype and
    training mode, and return `module` (or its replacement when it is one of those itself)."""
    if type(module) in _SEQUENCE or type(module) in _CELLS:
        return _fused_copy(module)
    for name, child in module.named_children():
        setattr(module, name, convert(child))
    return module
