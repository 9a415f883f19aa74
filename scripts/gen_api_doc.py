"""Prints the registered ``torch.ops.layerpress.*`` ops for docs/api.md, or checks that file.

    python scripts/gen_api_doc.py              # markdown: one schema block per op + a kernel table
    python scripts/gen_api_doc.py --check docs/api.md

``--check`` fails (exit 1, the missing items listed) when an op registered by the built extension
has no ``#### `layerpress::<op>` `` section in the file, or its schema (as the registry prints it)
does not appear there verbatim, or a ``layerpress`` CLI subcommand has no ``### `layerpress <cmd>` ``
section, or a row of the module map (the modules of ``layerpress.ops``, ``layerpress.nn`` and
``layerpress.cli`` with their public names) is not there verbatim. The prose is written by hand;
this keeps its schemas and module map true to the code.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch

import layerpress  # noqa: F401  (registers the ops)

DISPATCH_KEYS = ("CPU", "CUDA", "Meta", "Autograd", "CompositeExplicitAutograd")


def registered_ops() -> list[str]:
    """Names (without namespace and overload) of every op in the ``layerpress`` namespace."""
    names = {n.split("::", 1)[1].split(".", 1)[0]
             for n in torch._C._dispatch_get_all_op_names() if n.startswith("layerpress::")}
    return sorted(names)


def schema(op: str) -> str:
    return str(getattr(torch.ops.layerpress, op).default._schema)


def kernels(op: str) -> list[str]:
    """Dispatch keys with a kernel registered for the op (CUDA only in a CUDA build)."""
    qual = f"layerpress::{op}"
    return [k for k in DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(qual, k)]


def cli_commands() -> list[str]:
    from layerpress import cli
    for action in cli.build_parser()._actions:  # the subparsers action holds the command names
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    return []


MAPPED_PACKAGES = ("layerpress.ops", "layerpress.nn", "layerpress.cli")


def public_names(module) -> list[str]:
    """``__all__``, or else the public functions and classes the module defines itself."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                  and getattr(v, "__module__", None) == module.__name__)


def module_map() -> list[str]:
    """One markdown row per module of the op faces, the modules and the CLI: its public names."""
    rows = []
    for pkg_name in MAPPED_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name.startswith("__"):
                continue
            mod = importlib.import_module(f"{pkg_name}.{info.name}")
            rows.append(f"| `{mod.__name__}` | {', '.join(f'`{n}`' for n in public_names(mod))} |")
    return rows


def markdown() -> str:
    lines = ["| module | public names |", "|---|---|", *module_map(), ""]
    lines += ["| op | kernels registered in this build |", "|---|---|"]
    lines += [f"| `{op}` | {', '.join(kernels(op))} |" for op in registered_ops()]
    lines.append("")
    for op in registered_ops():
        lines += [f"#### `layerpress::{op}`", "", "```", schema(op), "```", ""]
    return "\n".join(lines)


def check(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    problems = []
    for op in registered_ops():
        if f"#### `layerpress::{op}`" not in text:
            problems.append(f"op {op}: no '#### `layerpress::{op}`' section")
        if schema(op) not in text:
            problems.append(f"op {op}: schema not found verbatim: {schema(op)}")
    for cmd in cli_commands():
        if f"### `layerpress {cmd}`" not in text:
            problems.append(f"CLI command {cmd}: no '### `layerpress {cmd}`' section")
    for row in module_map():
        if row not in text:
            problems.append(f"module map: row not found verbatim: {row}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", metavar="FILE", help="check FILE instead of printing")
    args = ap.parse_args(argv)
    if args.check is None:
        print(markdown())
        return 0
    problems = check(Path(args.check))
    for p in problems:
        print(f"{args.check}: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
