"""Honest saved-memory measurement: the bytes a training step keeps for the backward.

``saved_tensors_hooks`` sees every tensor that a compiled (or eager) forward saves. The bytes of unique
storages are summed, keyed by storage pointer, leaving out the storages of parameters, buffers and inputs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    if hasattr(t, "to_local"):  # a DTensor (FSDP2's sharded parameters): this process's shard
        t = t.to_local()
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_storages(forward: Callable[[], Any], exclude: tuple[torch.Tensor, ...] = ()) -> tuple[dict, Any]:
    """Run ``forward()`` and return ({(storage pointer, bytes): a tensor saved on it}, its output).

    ``exclude``: tensors whose storages are not activations (parameters, buffers, inputs).
    """
    skip = {_storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.nn.Parameter):  # FSDP2's unsharded parameters: not in ``exclude``, not activations
            return t
        key = _storage_key(t)
        if key not in skip and key[0] != 0:
            seen[key] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return seen, out


def saved_bytes(forward: Callable[[], Any], exclude: tuple[torch.Tensor, ...] = ()) -> tuple[int, Any]:
    """Run ``forward()`` and return (bytes saved for backward, its output); ``exclude`` as in saved_storages."""
    seen, out = saved_storages(forward, exclude)
    return sum(nbytes for _, nbytes in seen), out


def model_saved_bytes(model: torch.nn.Module, *inputs: Any, loss: Callable[[Any], torch.Tensor] | None = None) -> int:
    """Saved bytes of ``model(*inputs)``, excluding parameters, buffers and the inputs."""
    exclude = (*model.parameters(), *model.buffers(), *[i for i in inputs if isinstance(i, torch.Tensor)])
    nbytes, _ = saved_bytes(lambda: model(*inputs), exclude)
    return nbytes
