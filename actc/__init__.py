"""actc: activation-compressed training as a torch.compile backend.

    actc.compile(model, memory_budget="2bit")   # or torch.compile(model, backend="actc", options={...})

Public names: ``compile`` (in place, options checked at once), ``ActcConfig``, ``explain`` (the per-tensor
plan of a model), and the eager pair
``compress`` / ``decompress``.
"""
from actc.config import ActcConfig, ActcOptionError

__all__ = ["compile", "ActcConfig", "ActcOptionError", "explain", "compress", "decompress", "__version__"]
__version__ = "0.1.0"


def __getattr__(name):  # keep `import actc` light: torch.compile machinery loads on first use
    if name in ("compile", "explain"):
        from actc import api
        return getattr(api, name)
    if name in ("compress", "decompress", "Compressed"):
        from actc import eager
        return getattr(eager, name)
    raise AttributeError(f"module 'actc' has no attribute {name!r}")
