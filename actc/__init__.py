"""actc: activation-compressed training as a torch.compile backend.

    actc.compile(model, memory_budget="2bit")   # or torch.compile(model, backend="actc", options={...})

Public names: ``compile`` (in place, options checked at once), ``ActcConfig``, ``explain`` (the per-tensor
plan of a model), and the eager pair
``compress`` / ``decompress``.
"""
from actc.config import ActcConfig, ActcOptionError

__all__ = ["compile", "ActcConfig", "ActcOptionError", "explain", "compress", "decompress", "__version__"]
__version__ = "0.1.0"


def _backend(gm, example_inputs, **kwargs):
    """``backend="actc"`` as registered by ``import actc``; the compiler machinery loads on the first graph."""
    from actc.backend import actc_backend
    return actc_backend(gm, example_inputs, **kwargs)


def _register_backend() -> None:
    """Register ``backend="actc"`` now, so that threads that call ``torch.compile(backend="actc")`` later
    find it registered. Left to torch, the name is registered lazily from the entry point on first use, and
    two threads doing that at once race (``AssertionError: duplicate name: actc``, torch 2.11-2.13).

    Only when dynamo's registry is not imported yet: if it is, this import may be the entry point's own
    load inside ``lookup_backend``, which registers the name itself right after.
    """
    import sys
    if "torch._dynamo.backends.registry" in sys.modules:
        return
    from torch._dynamo import register_backend
    register_backend(_backend, name="actc")


_register_backend()


def __getattr__(name):  # keep `import actc` light: torch.compile machinery loads on first use
    if name in ("compile", "explain"):
        from actc import api
        return getattr(api, name)
    if name in ("compress", "decompress", "Compressed"):
        from actc import eager
        return getattr(eager, name)
    raise AttributeError(f"module 'actc' has no attribute {name!r}")
