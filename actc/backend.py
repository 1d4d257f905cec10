"""The dynamo backend: ``torch.compile(model, backend="actc", options={...})``.

It is found by name through the ``torch_dynamo_backends`` entry point, so no ``import actc`` is needed.
Options (or ``ACTC_MEMORY_BUDGET``) become one frozen ``ActcConfig``; Inductor's ``compile_fx`` then runs
with actc's partitioner, which compresses what the forward saves for the backward.

A session is the state of one ``torch.compile`` call: its config, the plans of the graphs compiled so far,
and the bytes they use, so that an absolute budget holds across graph breaks.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Mapping

import torch

from actc import _torch_compat as compat
from actc.config import ActcConfig
from actc.plan import GraphPlan, table, to_json

log = logging.getLogger("actc")


class Session:
    def __init__(self, config: ActcConfig) -> None:
        self.config = config
        self.plans: list[GraphPlan] = []
        self._charged: dict[str, int] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def charge(self, key: str, nbytes: int) -> None:
        with self._lock:
            self._charged[key] = nbytes

    def charged_elsewhere(self, key: str) -> int:
        with self._lock:
            return sum(v for k, v in self._charged.items() if k != key)

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)

    def add_plan(self, plan: GraphPlan, key: str) -> None:
        self.plans.append(plan)
        log.info(plan.totals())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("actc plan for graph %d:\n%s", plan.graph, table([plan]))
        if self.config.dump_dir:
            _dump(self.config.dump_dir, plan)


def _dump(directory: str, plan: GraphPlan) -> None:
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"graph_{plan.graph:03d}")
    with open(stem + "_plan.txt", "w") as f:
        f.write(table([plan]) + "\n")
    with open(stem + "_plan.json", "w") as f:
        f.write(to_json([plan], include_code=False) + "\n")
    with open(stem + "_forward.py", "w") as f:
        f.write(plan.forward_code)
    with open(stem + "_backward.py", "w") as f:
        f.write(plan.backward_code)


# One session per options dict (a torch.compile call hands the same dict to every graph it compiles),
# and one for the environment-variable path, where no dict exists.
_sessions: dict[int, tuple[Any, Session]] = {}
_env_sessions: dict[ActcConfig, Session] = {}


def session_for(options: Mapping[str, Any] | None) -> Session:
    config = ActcConfig.from_options(options)
    if options is None:
        return _env_sessions.setdefault(config, Session(config))
    held = _sessions.get(id(options))
    if held is None or held[0] is not options or held[1].config != config:
        held = (options, Session(config))
        _sessions[id(options)] = held
    return held[1]


def compile_with_session(gm: torch.fx.GraphModule, example_inputs, session: Session):
    from actc.passes.partition import ActcPartitioner

    return compat.compile_fx(gm, example_inputs, config_patches={"custom_partitioner_fn": ActcPartitioner(session)})


def actc_backend(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None, **_: Any):
    """The callable registered as ``backend="actc"``."""
    return compile_with_session(gm, example_inputs, session_for(options))


def plans_json(session: Session) -> str:
    return json.dumps(json.loads(to_json(session.plans)), indent=2)
