"""The dynamo backend: ``torch.compile(model, backend="actc", options={...})``.

It is found by name through the ``torch_dynamo_backends`` entry point, so no ``import actc`` is needed.
Options (or ``ACTC_MEMORY_BUDGET``) become one frozen ``ActcConfig`` and one ``Session`` per
``torch.compile`` call; each graph dynamo hands over is compiled by Inductor's ``compile_fx`` with actc's
partitioner, which compresses what the forward saves for the backward.

Every graph is returned wrapped in a ``CompiledGraph``. When a re-plan changes the bits of its tensors
(measured sensitivities, or an absolute budget that a later graph needs a share of), the wrapper compiles
the same graph again with the new plan before its next call: one recompile, and the old compiled function
is dropped. Graphs with symbolic shapes keep their first plan (a recompile outside dynamo could not add
the guards it might need).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from typing import Any, Mapping

import torch

from actc import _torch_compat as compat
from actc.config import ActcConfig, ActcOptionError
from actc.session import Session

log = logging.getLogger("actc")
compat.register_torch_log("actc")  # TORCH_LOGS="actc" (totals per graph) or "+actc" (each graph's table)


class CompiledGraph:
    """What the backend returns for one dynamo graph: its compiled function, recompiled after a re-plan."""

    def __init__(self, session: Session, gm: torch.fx.GraphModule, example_inputs,
                 patches: Mapping[str, Any] | None = None) -> None:
        self.session, self.gm, self.example_inputs = session, gm, list(example_inputs)
        self.patches = dict(patches or {})  # Inductor options of the compile call's ``mode``
        # the graph's inputs, named after their sources in the model: two identical blocks split by a graph
        # break are two regions, and a dynamo recompile of one block is the same region
        names = ",".join(str(n.target) for n in gm.graph.find_nodes(op="placeholder"))
        self.source_key = hashlib.sha1(names.encode()).hexdigest()[:12]
        self.static = not compat.has_symbolic_inputs(gm, self.example_inputs)
        self.activation_inputs = activation_inputs(self.example_inputs)
        self.region = None      # set by the partitioner; None when no backward graph was made (inference)
        self.version = 0
        self.fn = self._compile()
        self._boxed_call = getattr(self.fn, "_boxed_call", False)

    def _compile(self):
        from actc.passes.partition import ActcPartitioner

        patches = {**self.patches, "custom_partitioner_fn": ActcPartitioner(self.session, self)}
        compat.skip_repeated_dtype_rule_setup()  # the same kernels, written faster (see there)
        torch_budget = compat.inductor_recompute_budget()
        self.recompute_is_default = self.session.config.recompute_is_default(torch_budget)
        with compat.recompute_budget(self.session.config.recompute_budget(torch_budget)):
            return compat.compile_fx(self.gm, self.example_inputs, config_patches=patches)

    def __call__(self, *args):
        self.session.maybe_replan()
        if self.region is not None and self.region.version != self.version and self.static:
            self._recompile()
        return self.fn(*args)

    def _recompile(self) -> None:
        start = time.perf_counter()
        try:
            fn = self._compile()  # outside dynamo's context: a fresh fake mode, static shapes, as this graph has
        except Exception as e:  # keep training with the plan this graph already has
            self.session.warn_once(f"actc could not recompile graph {self.region.index} with a new plan, "
                                   f"keeping its current one: {type(e).__name__}: {e}")
            log.debug("actc recompile failed", exc_info=True)
            self.region.forced, self.static = None, False
            self.version = self.region.version
            return
        self.fn = fn
        self.session.recompiled(time.perf_counter() - start)


def activation_inputs(example_inputs) -> frozenset[int]:
    """Positions of the graph's inputs that are activations of an earlier graph: tensors that require grad and
    are not leaves, so autograd made them in this step (the piece before this one under DDP's bucket split, or
    the code before a graph break). The frame that passed one in usually drops it once this graph has run, and
    then the backward's saved reference is all that keeps it alive: compressing it here frees it. Leaves
    (parameters, buffers, the batch, a tensor made with requires_grad=True) are held by the caller, so saving
    them costs nothing and a compressed copy would only add bytes. A non-leaf that the caller does keep costs
    its compressed copy (1/16 of fp32 at 2 bits) and saves nothing: the price of not knowing."""
    return frozenset(i for i, t in enumerate(example_inputs)
                     if isinstance(t, torch.Tensor) and t.requires_grad and not t.is_leaf)


# One session per options dict (a torch.compile call hands the same dict to every graph it compiles), and
# one per config for the environment-variable path, where no dict exists. Both maps are weak: a session
# lives as long as the CompiledGraphs that hold it, which dynamo's cache holds; torch._dynamo.reset() or a
# dropped model frees it. The session keeps its options dict, so the dict's id cannot be reused meanwhile.
_sessions: "weakref.WeakValueDictionary[int, Session]" = weakref.WeakValueDictionary()
_env_sessions: "weakref.WeakValueDictionary[ActcConfig, Session]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def session_for(options: Mapping[str, Any] | None) -> Session:
    config = ActcConfig.from_options(options)
    with _lock:  # dynamo may compile from several threads
        if options is None:
            session = _env_sessions.get(config)
            if session is None:
                session = _env_sessions[config] = Session(config)
            return session
        session = _sessions.get(id(options))
        if session is None or session.options is not options or session.config != config:
            session = _sessions[id(options)] = Session(config, options)
        return session


def mode_patches(mode: str | None) -> dict[str, Any]:
    """The Inductor options of ``torch.compile``'s ``mode`` ("max-autotune", "reduce-overhead", ...), as
    Inductor itself applies them; an unknown mode raises at once, with the valid ones."""
    if mode is None:
        return {}
    try:
        return dict(torch._inductor.list_mode_options(mode))
    except RuntimeError as e:
        raise ActcOptionError(f"mode {mode!r}: {e}") from None


def compile_with_session(gm: torch.fx.GraphModule, example_inputs, session: Session,
                         patches: Mapping[str, Any] | None = None) -> CompiledGraph:
    return CompiledGraph(session, gm, example_inputs, patches)


def actc_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None,
                 mode: str | None = None, **_: Any):
    """The callable registered as ``backend="actc"``. torch.compile passes ``mode`` or ``options``, never
    both (it refuses that for every backend); ``actc.compile`` takes both."""
    return compile_with_session(gm, example_inputs, session_for(options), mode_patches(mode))
