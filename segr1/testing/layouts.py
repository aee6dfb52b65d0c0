"""Tensors laid out in memory as DeepSpeed keeps a module's parameters (weight-sync tests and benchmark)."""

from __future__ import annotations

import torch


def zero2_like(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors as DeepSpeed ZeRO-1/2 holds a module's parameters: views of one flat buffer per
    parameter group (here matrices, and vectors), each group in the module's order."""
    out = dict(tensors)
    for group in ([n for n, t in tensors if t.dim() >= 2], [n for n, t in tensors if t.dim() < 2]):
        flat = torch.cat([out[n].reshape(-1) for n in group])
        offset = 0
        for name in group:
            out[name] = flat[offset : offset + out[name].numel()].view(out[name].shape)
            offset += out[name].numel()
    return [(name, out[name]) for name, _ in tensors]
