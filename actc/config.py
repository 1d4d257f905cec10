"""ActcConfig: the one frozen record that every option goes through, and budget parsing.

    torch.compile(m, backend="actc", options={"memory_budget": "2bit"})   # average bits per element
    torch.compile(m, backend="actc", options={"memory_budget": 0.1})      # fraction of the saved bytes
    torch.compile(m, backend="actc", options={"memory_budget": "512MB"})  # absolute bytes, all graphs together
    ACTC_MEMORY_BUDGET=2bit python train.py                                # for tools that pass only a name

The option wins over the environment variable. Every bad key or value raises ``ActcOptionError``, which
names the key, the value and what is valid, and suggests the closest key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

ENV_BUDGET = "ACTC_MEMORY_BUDGET"
BITS = (1, 2, 4, 8)
ALLOCATIONS = ("adaptive", "static")
SENSITIVITIES = ("relative", "absolute")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
RECOMPUTE_ON = 0.3  # what recompute=True means: Inductor's activation_memory_budget of the benches
# without the option (and with torch's own budget left at 1.0): on both convergence benches it beat
# recompute=1.0 on quality at the same or less memory. 0.1 saved less again on all three (half on the LMs),
# was closer to fp32 on two (not on the larger LM) and faster on the CPU, but re-runs more matmuls:
# 1.23-1.36x Inductor's estimated H100 step against 0.3's 1.08-1.20x (bench/bench_roofline.py), and GPU
# users are whom the default serves (docs/results.md)
RECOMPUTE_DEFAULT = RECOMPUTE_ON
RECOMPUTE_LEAST = RECOMPUTE_ON / 64  # the least recompute budget actc compiles under (recompute_budget)
MIN_BUDGET_BYTES = 1024  # an absolute budget below 1 KiB is almost surely a slip for '1bit' or 1.0
BUDGET_FORMS = "average bits like '2bit' (1 to 8), a fraction of the saved bytes like 0.1 (0 < f <= 1), " \
               "or absolute bytes like '512MB', '1.5GiB' or an int"


class ActcOptionError(ValueError):
    """A bad actc option: the message names the key, the value and what is valid."""


@dataclass(frozen=True)
class AverageBits:
    bits: float

    def __str__(self) -> str:
        return f"{self.bits:g}bit"


@dataclass(frozen=True)
class Fraction:
    fraction: float

    def __str__(self) -> str:
        return f"{self.fraction:g} of saved bytes"


@dataclass(frozen=True)
class Bytes:
    nbytes: int

    def __str__(self) -> str:  # "0.0 MiB" said nothing about a budget of a few KB
        return f"{self.nbytes / 2**20:.1f} MiB" if self.nbytes >= 2**20 else f"{self.nbytes / 2**10:.1f} KiB"


Budget = Union[AverageBits, Fraction, Bytes]


def parse_budget(value: Any, key: str = "memory_budget") -> Budget:
    """'2bit' -> AverageBits, 0.1 -> Fraction, '512MB' / 1.5GiB / int -> Bytes."""
    if isinstance(value, (AverageBits, Fraction, Bytes)):
        return value
    if isinstance(value, bool):
        raise ActcOptionError(f"option {key!r}: {value!r} is not a budget; valid: {BUDGET_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ActcOptionError(f"option {key!r}: {value!r} bytes is negative; valid: {BUDGET_FORMS}")
        return _bytes(value, value, key)
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ActcOptionError(f"option {key!r}: fraction {value!r} is outside (0, 1]; valid: {BUDGET_FORMS}")
        return Fraction(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)(bits?|b)", text)
        if m and m.group(2) != "b":
            bits = float(m.group(1))
            if not 1.0 <= bits <= 8.0:
                raise ActcOptionError(f"option {key!r}: {value!r} is outside 1 to 8 bits; valid: {BUDGET_FORMS}")
            return AverageBits(bits)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", text)
        if m and m.group(2) in _UNITS:
            number = float(m.group(1))
            if m.group(2) == "" and "." in m.group(1):
                return parse_budget(number, key)
            return _bytes(int(number * _UNITS[m.group(2)]), value, key)
    raise ActcOptionError(f"option {key!r}: cannot read {value!r} as a budget; valid: {BUDGET_FORMS}")


def _bytes(nbytes: int, value: Any, key: str) -> Bytes:
    if nbytes < MIN_BUDGET_BYTES:
        raise ActcOptionError(f"option {key!r}: {value!r} reads as a budget of {nbytes} bytes for all saved "
                              f"activations, which is almost surely a mistake (at least {MIN_BUDGET_BYTES} bytes). "
                              f"1 bit per element is '1bit'; a fraction of the saved bytes is a float like 1.0 or 0.1. "
                              f"Valid: {BUDGET_FORMS}")
    return Bytes(nbytes)


@dataclass(frozen=True)
class ActcConfig:
    """Every actc option. Build it with ``ActcConfig.from_options``; it is hashable and frozen."""

    memory_budget: Budget = AverageBits(2.0)
    group_size: int = 128          # elements per (min, scale) pair; a power of two from 8 to 1024
    bits: tuple[int, ...] = BITS   # widths the allocator may choose from
    min_bytes: int = 16384         # payoff threshold: smaller saved tensors stay as they are
    keep_uncompressed: bool = True  # the allocator may leave a tensor uncompressed when the budget allows
    compress_masks: bool = True    # bool masks (ReLU, dropout) packed to exact 1-bit
    dump_dir: str | None = None    # write every graph's plan and rewritten graphs here
    recompute: float | None = None  # Inductor's recompute budget for actc's graphs (activation_memory_budget,
    #                                0 < f <= 1; 1.0 recomputes only what Inductor always does). None: the
    #                                value set in torch._functorch.config if it is not 1.0, else
    #                                RECOMPUTE_DEFAULT, lowered for a memory budget that compression cannot meet
    #                                (passes/recompute_budget.py). What the partitioner recomputes is not
    #                                saved
    recompute_credit: bool = False  # an average-bits budget counts only the tensors that are saved, so what
    #                                Inductor recomputes lowers memory. True: it counts them too and gives their
    #                                share to the saved tensors (finer widths, 2x the memory on the benches;
    #                                docs/results.md compares the two)
    allocation: str = "static"     # "adaptive" (opt-in): re-plan bits from sensitivities measured in the backward.
    #                                Static by default: on every bench model and budget adaptive kept the static
    #                                plan (docs/results.md), while its statistics add backward kernels, its
    #                                cache salt stops warm starts, and each re-plan recompiles
    warmup_steps: int = 20         # adaptive: backward passes measured before the first re-plan
    replan_every: int = 100        # adaptive: backward passes between later re-plans (0: only the first)
    sensitivity: str = "relative"  # adaptive: "relative" (per-layer variance / |grad|², for Adam-family
    #                                optimizers) or "absolute" (summed variance, for SGD); passes/sensitivity.py

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> "ActcConfig":
        env = os.environ if env is None else env
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ActcOptionError(f"unknown actc option {key!r} (value {options[key]!r}){hint} Valid options: {', '.join(valid)}")
        if "memory_budget" not in options and env.get(ENV_BUDGET):
            try:
                options["memory_budget"] = parse_budget(env[ENV_BUDGET], ENV_BUDGET)
            except ActcOptionError as e:
                raise ActcOptionError(f"environment variable {e}") from None
        kwargs = {k: _check(k, v) for k, v in options.items()}
        return cls(**kwargs)

    def recompute_budget(self, torch_value: float) -> float:
        """The recompute budget actc's graphs compile under, given torch's own ``activation_memory_budget``.
        A torch setting of 0 becomes RECOMPUTE_LEAST: at exactly 0, torch 2.13's partitioner saves only the
        graph's inputs without reading the MUST_SAVE tags, and would redraw dropout in the backward
        (``_torch_compat.keep_saved``)."""
        if self.recompute_is_default(torch_value):
            return RECOMPUTE_DEFAULT
        if self.recompute is not None:
            return self.recompute
        return torch_value or RECOMPUTE_LEAST

    def recompute_is_default(self, torch_value: float) -> bool:
        """Neither the ``recompute`` option nor torch's ``activation_memory_budget`` chose the recompute budget:
        actc's own default is in force, and actc may lower it for a memory budget that compression alone
        cannot meet (passes/recompute_budget.recompute_more). A budget the user chose is kept."""
        return self.recompute is None and torch_value == 1.0

    def summary(self) -> str:
        return (f"budget={self.memory_budget} group={self.group_size} bits={list(self.bits)} "
                f"min_bytes={self.min_bytes} allocation={self.allocation}"
                + (f" recompute={self.recompute:g}" if self.recompute is not None else "")
                + (" recompute_credit=True" if self.recompute_credit else "")
                + (f" sensitivity={self.sensitivity}" if self.allocation == "adaptive" else ""))


def _check(key: str, value: Any) -> Any:
    def bad(valid: str) -> ActcOptionError:
        return ActcOptionError(f"option {key!r}: invalid value {value!r}; valid: {valid}")

    if key == "memory_budget":
        return parse_budget(value, key)
    if key == "group_size":
        if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value > 1024 or value & (value - 1):
            raise bad("a power of two from 8 to 1024")
        return value
    if key == "bits":
        items = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else None
        if not items or any(isinstance(b, bool) or b not in BITS for b in items):
            raise bad(f"a non-empty list drawn from {list(BITS)}")
        return tuple(sorted(set(items)))
    if key == "min_bytes":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("an int >= 0 (bytes)")
        return value
    if key in ("keep_uncompressed", "compress_masks", "recompute_credit"):
        if not isinstance(value, bool):
            raise bad("True or False")
        return value
    if key == "allocation":
        if value not in ALLOCATIONS:
            raise bad(" or ".join(repr(a) for a in ALLOCATIONS))
        return value
    if key == "sensitivity":
        if value not in SENSITIVITIES:
            raise bad(" or ".join(repr(a) for a in SENSITIVITIES))
        return value
    if key in ("warmup_steps", "replan_every"):
        if isinstance(value, bool) or not isinstance(value, int) or value < (key == "warmup_steps"):
            raise bad("an int >= 1 (backward passes)" if key == "warmup_steps" else "an int >= 0 (0: never again)")
        return value
    if key == "recompute":
        if value is None or isinstance(value, bool):
            return None if value is None else RECOMPUTE_ON if value else 1.0
        if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise bad(f"a fraction 0 < f <= 1 of what Inductor would save (Inductor's activation_memory_budget; "
                      f"1.0: off), True ({RECOMPUTE_ON}), False (1.0) or None (torch's setting, "
                      f"else {RECOMPUTE_DEFAULT})")
        return float(value)
    if key == "dump_dir":
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise bad("a directory path or None")
        return None if value is None else os.fspath(value)
    raise AssertionError(key)
