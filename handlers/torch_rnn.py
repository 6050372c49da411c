"""RNN weights laid out for cuDNN once, at load, instead of at every call.

cuDNN runs an LSTM, GRU or RNN from one contiguous weight buffer. A TorchScript archive
loaded onto the GPU and a `torch.export` program moved there hold each weight in its own
allocation: cuDNN then copies them into a buffer at every call and prints a warning on
stderr each time (one journal line per batch). `nn.RNNBase.flatten_parameters` fixes a plain
module; scripted and exported RNNs don't have it, so their weights are handed to the same
torch routine it uses, which turns them, in place, into views of one buffer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# cuDNN's RNN modes, as torch.backends.cudnn.rnn numbers them.
_CUDNN_MODE = {"RNN_RELU": 0, "RNN_TANH": 1, "LSTM": 2, "GRU": 3}
_GATES = {"RNN_RELU": 1, "RNN_TANH": 1, "LSTM": 4, "GRU": 3}


def flatten_rnn_weights(module: Any) -> int:
    """Lays out every RNN's weights in `module` for cuDNN (a plain, scripted or exported
    module). Returns how many RNNs it laid out; 0 where cuDNN does not run them (the CPU)."""
    if not torch._use_cudnn_rnn_flatten_weight():
        return 0
    done = 0
    with torch.no_grad():
        if isinstance(module, torch.fx.GraphModule):
            done += _flatten_exported(module)
        for sub in module.modules():
            if isinstance(sub, torch.nn.RNNBase):
                if _on_cuda(sub._flat_weights):
                    sub.flatten_parameters()
                    done += 1
            elif getattr(sub, "original_name", None) in ("LSTM", "GRU", "RNN"):
                done += _flatten_scripted(sub)
    return done


def _on_cuda(weights: list[Any]) -> bool:
    return bool(weights) and all(isinstance(w, torch.Tensor) and w.is_cuda for w in weights)


def _flatten(weights: list[torch.Tensor], per_direction: int, mode: str, hidden: int,
             proj: int, layers: int, batch_first: bool, bidirectional: bool) -> int:
    if mode not in _CUDNN_MODE or not _on_cuda(weights):
        return 0
    torch._cudnn_rnn_flatten_weight(
        weights, per_direction, int(weights[0].shape[1]), _CUDNN_MODE[mode], hidden, proj,
        layers, batch_first, bidirectional,
    )
    return 1


def _flatten_scripted(rnn: Any) -> int:
    """A scripted nn.LSTM/GRU/RNN: its constants and `_flat_weights` are still attributes."""
    try:
        per_direction = (4 if rnn.bias else 2) + (1 if rnn.proj_size > 0 else 0)
        return _flatten(list(rnn._flat_weights), per_direction, str(rnn.mode),
                        int(rnn.hidden_size), int(rnn.proj_size), int(rnn.num_layers),
                        bool(rnn.batch_first), bool(rnn.bidirectional))
    except (AttributeError, RuntimeError) as exc:  # not torch's RNN after all: left as it is
        log.debug("could not lay out a scripted %s for cuDNN: %s", rnn.original_name, exc)
        return 0


def _exported_ops() -> dict[Any, str]:
    aten = torch.ops.aten
    return {aten.lstm.input: "LSTM", aten.gru.input: "GRU", aten.rnn_tanh.input: "RNN_TANH",
            aten.rnn_relu.input: "RNN_RELU"}


def _flatten_exported(graph_module: torch.fx.GraphModule) -> int:
    """An exported program's RNN call: `aten.lstm.input(x, hx, params, has_biases,
    num_layers, dropout, train, bidirectional, batch_first)` (GRU and RNN alike), its
    weights the module's own attributes."""
    ops, done = _exported_ops(), 0
    for node in graph_module.graph.nodes:
        mode = ops.get(node.target) if node.op == "call_function" else None
        if mode is None:
            continue
        try:
            params, _, layers, _, _, bidirectional, batch_first = node.args[2:9]
            weights = [_attribute(graph_module, p.target) for p in params]
            per_direction = len(weights) // (layers * (2 if bidirectional else 1))
            hidden = int(weights[0].shape[0]) // _GATES[mode]
            proj = int(weights[per_direction - 1].shape[0]) if per_direction in (3, 5) else 0
            done += _flatten(weights, per_direction, mode, hidden, proj, int(layers),
                             bool(batch_first), bool(bidirectional))
        except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
            log.debug("could not lay out an exported %s for cuDNN: %s", mode, exc)
    return done


def _attribute(root: Any, dotted: str) -> torch.Tensor:
    value = root
    for part in dotted.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{dotted} is not a tensor")
    return value
