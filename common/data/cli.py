"""``fedvlsm data`` subcommands: make synthetic data, check a dataset.

Only argparse wiring lives here; the work is done by ``synth.synthesize``
and ``check.check_dataset``, so the CLI and the Python API behave the same.
The lead's ``common/cli.py`` calls ``add_data_commands(subparsers)``; every
subcommand sets ``func`` to a handler ``(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Sequence

from .check import check_dataset
from .synth import synthesize


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data synth`` and ``data check`` under a ``data`` command; return the ``data`` parser."""
    data = subparsers.add_parser("data", help="synthesize or check datasets")
    data.set_defaults(func=_usage(data))
    commands = data.add_subparsers(dest="data_command", metavar="{synth,check}")

    synth = commands.add_parser("synth", help="write a synthetic multi-site dataset (medvlsm format)")
    synth.add_argument("out", help="output folder; one site-<k>/ subfolder per site")
    synth.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    synth.add_argument("--per-site", type=int, default=60, help="images per site (default 60)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--image-size", type=int, default=128, help="base native image side in pixels (default 128)")
    synth.add_argument("--overwrite", action="store_true", help="replace an earlier synthetic dataset in OUT")
    synth.set_defaults(func=run_synth)

    check = commands.add_parser("check", help="report every problem of a dataset; non-zero exit if any")
    check.add_argument("path", help="dataset folder (folder format or medvlsm anns/ format)")
    check.add_argument("--splits", nargs="+", default=None, help="splits to check (default: train val test and any declared)")
    check.set_defaults(func=run_check)
    return data


def _usage(parser: argparse.ArgumentParser):
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


def run_synth(args: argparse.Namespace) -> int:
    try:
        paths = synthesize(args.out, sites=args.sites, per_site=args.per_site, seed=args.seed,
                           image_size=args.image_size, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    print(f"wrote {len(paths)} site(s) x {args.per_site} images to {args.out}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    problems = check_dataset(args.path, splits=args.splits)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{args.path}: OK, no problems found")
        return 0
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(p.kind for p in problems).items()))
    print(f"{args.path}: {len(problems)} problem(s): {kinds}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m common.data.cli data check PATH``."""
    parser = argparse.ArgumentParser(prog="fedvlsm")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
