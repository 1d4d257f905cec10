"""actc: activation-compressed training as a torch.compile backend.

    model = torch.compile(model, backend="actc", options={"memory_budget": "2bit"})

Public names: ``ActcConfig``, ``explain`` (the per-tensor plan of a model), and the eager pair
``compress`` / ``decompress``.
"""
from actc.config import ActcConfig, ActcOptionError

__all__ = ["ActcConfig", "ActcOptionError", "explain", "compress", "decompress", "__version__"]
__version__ = "0.1.0"


def __getattr__(name):  # keep `import actc` light: torch.compile machinery loads on first use
    if name == "explain":
        from actc.api import explain
        return explain
    if name in ("compress", "decompress", "Compressed"):
        from actc import eager
        return getattr(eager, name)
    raise AttributeError(f"module 'actc' has no attribute {name!r}")
