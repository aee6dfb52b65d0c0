"""Full policy weights out of a (possibly ZeRO-3 partitioned) module: for weight sync and for export.

Under ZeRO-3 each rank holds a slice of every parameter, and reading a full one is a collective:
every rank must enter ``deepspeed.zero.GatheredParameters`` for the same parameters in the same
order. ``full_parameters`` gathers a chunk of about ``chunk_bytes`` at a time, so peak memory is
one chunk, not a second copy of the model; ranks other than the consumer iterate it just to take
part in the gathers. A yielded tensor is only valid until the next one is requested: copy it.

``export_hf`` writes a Hugging Face directory (safetensors weights, config, processor files) that
transformers and vLLM load, into a temp sibling that is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from segr1.core.files import move_into_place

DEFAULT_CHUNK_BYTES = 256 << 20


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def parameter_metas(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, full shape, dtype) of every parameter, in ``full_parameters`` order, without a gather."""
    return [(name, tuple(_full_shape(p)), p.dtype) for name, p in module.named_parameters()]


def _chunks(
    named: list[tuple[str, torch.nn.Parameter]], chunk_bytes: int
) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    chunk: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for name, param in named:
        nbytes = _full_shape(param).numel() * param.element_size()
        if chunk and size + nbytes > chunk_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, param))
        size += nbytes
    if chunk:
        yield chunk


def full_parameters(
    module: torch.nn.Module, zero3: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` for every parameter; every rank must consume it to the end."""
    named = list(module.named_parameters())
    if zero3:
        import deepspeed

        gather = lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)  # noqa: E731
    else:
        gather = lambda params: nullcontext()  # noqa: E731
    for chunk in _chunks(named, chunk_bytes):
        with gather([p for _, p in chunk]):
            for name, param in chunk:
                yield name, param.detach()


def weights_digest(module: torch.nn.Module, zero3: bool, prefix: str = "") -> str:
    """SHA-256 over the names and bytes of the parameters whose names start with ``prefix``.

    Equal digests mean bit-identical weights. Every rank gathers every parameter (the gathers are
    collective), whatever the prefix.
    """
    digest = hashlib.sha256()
    for name, tensor in full_parameters(module, zero3):
        if not name.startswith(prefix):
            continue
        digest.update(name.encode())
        raw = tensor.to("cpu").contiguous().view(-1)
        digest.update(raw.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_hf(
    module: torch.nn.Module,
    processor: Any,
    out_dir: str | Path,
    zero3: bool,
    write: bool,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Path:
    """Write ``module`` (an HF ``PreTrainedModel``) and ``processor`` to ``out_dir`` atomically.

    All ranks call this (the gathers are collective); only the rank with ``write=True`` writes.
    The weights are copied to CPU one gathered chunk at a time and saved with ``save_pretrained``.
    """
    out_dir = Path(out_dir)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in full_parameters(module, zero3, chunk_bytes):
        if write:
            state[name] = tensor.to("cpu", copy=True).contiguous()
    if not write:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        module.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
