"""The `actc` command.

    actc dump PATH_OR_MODULE:FACTORY [--budget B] [--format text|json] [--option KEY=VALUE ...]
              [--graphs] [--all] [--plot plan.png]
        FACTORY() returns (model, example_inputs). Prints the per-tensor plan (module, name, shape, dtype,
        producer, bits, bytes before/after, reason) with totals; --graphs adds the rewritten forward and
        backward graphs, --all the primals, --plot draws bytes per module (needs matplotlib).
    actc --version
    actc demo [--steps N] [--budgets 2bit]
        Trains a small transformer LM on generated data with backend="inductor" and with backend="actc",
        and prints saved MiB, x less, step-time ratio and final loss.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys

from actc.config import ActcOptionError
from actc.plan import table


def load_factory(spec: str):
    """'path/to/file.py:make' or 'package.module:make' -> the callable."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise SystemExit(f"actc dump: {spec!r} is not PATH_OR_MODULE:FACTORY (e.g. models.py:make or mypkg.models:make)")
    if target.endswith(".py") or os.path.sep in target:
        if not os.path.exists(target):
            raise SystemExit(f"actc dump: file {target!r} does not exist")
        module_spec = importlib.util.spec_from_file_location("_actc_dump_target", target)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, name):
        raise SystemExit(f"actc dump: {target!r} has no attribute {name!r}")
    return getattr(module, name)


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"actc: --option {text!r} is not KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def dump(args) -> int:
    import actc

    made = load_factory(args.target)()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise SystemExit("actc dump: FACTORY must return (model, example_inputs)")
    model, inputs = made
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    options = dict(_option(o) for o in args.option)
    if args.budget is not None:
        options["memory_budget"] = _budget_arg(args.budget)
    explanation = actc.explain(model, *inputs, **options)
    if args.plot:
        from actc.plot import plot_plan

        plot_plan(explanation.plans, args.plot)
    if args.format == "json":
        print(explanation.to_json(include_code=args.graphs))
        return 0
    print(table(explanation.plans, primals=args.all))
    if args.graphs:
        for plan in explanation.plans:
            print(f"\n===== graph {plan.graph}: forward =====\n{plan.forward_code.strip()}")
            print(f"\n===== graph {plan.graph}: backward =====\n{plan.backward_code.strip()}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _budget_arg(text: str):
    try:
        number = ast.literal_eval(text)
        return number if isinstance(number, (int, float)) else text
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    from actc import __version__

    parser = argparse.ArgumentParser(prog="actc", description="Activation-compressed training for torch.compile")
    parser.add_argument("--version", action="version", version=f"actc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dump", help="print the per-tensor plan of a model (and, on request, its rewritten graphs)")
    p.add_argument("target", help="PATH_OR_MODULE:FACTORY; FACTORY() returns (model, example_inputs)")
    p.add_argument("--budget", help="memory budget: '2bit', 0.1 or '512MB' (default: 2bit)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="any other actc option")
    p.add_argument("--graphs", action="store_true", help="also print the rewritten forward and backward graphs")
    p.add_argument("--all", action="store_true", help="also list primals and parameter-derived tensors")
    p.add_argument("--plot", metavar="PNG", help="draw bytes before/after per module and the bits chosen")
    d = sub.add_parser("demo", help="train a small transformer LM with inductor and actc, side by side")
    d.add_argument("--steps", type=int, default=120)
    d.add_argument("--budgets", default="2bit", help="comma-separated, e.g. 8bit,2bit (each adds a compile)")
    args = parser.parse_args(argv)
    try:
        if args.command == "dump":
            return dump(args)
        from actc.demo import run_demo

        return run_demo(steps=args.steps, budgets=[_budget_arg(b) for b in args.budgets.split(",")])
    except ActcOptionError as e:
        print(f"actc: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
