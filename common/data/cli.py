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
from pathlib import Path
from typing import Sequence

from common.site_policy import (
    DEFAULT_MIN_FIGURE_IMAGES,
    MIN_FIGURE_IMAGES_FLOOR,
    NODE_MIN_FIGURE_IMAGES,
    SitePolicy,
    SitePolicyError,
    small_splits,
)

from .check import check_dataset, errors, find_sites
from .synth import IMAGE_SIZE_RANGE, MIN_PER_SITE, synthesize

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its --help; descriptions keep their own line breaks."""


HELP_FORMAT = HelpFormatter


def path_arg(value: str) -> str:
    """argparse type of every file or folder argument: an empty one ("" from a script's unset variable)
    meant the current folder, so `data synth ""` wrote its sites there and `predict --out ""` its masks."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty: give a file or folder")
    return value


def _figure_minimum(value: str) -> int:
    """argparse type of --min-figure-images: what `fedvlsm site start` accepts, said the same way."""
    try:
        return SitePolicy.from_node_config({NODE_MIN_FIGURE_IMAGES: value}).min_figure_images
    except SitePolicyError as err:
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data synth`` and ``data check`` under a ``data`` command; return the ``data`` parser."""
    data = subparsers.add_parser("data", help="synthesize or check datasets",
                                 description="Synthesize or check datasets (see `fedvlsm data CMD --help`).",
                                 formatter_class=HELP_FORMAT)
    data.set_defaults(func=_usage(data))
    commands = data.add_subparsers(dest="data_command", metavar="{synth,check}")

    synth = commands.add_parser("synth", help="write a synthetic multi-site dataset (medvlsm format)",
                                description="Write a synthetic multi-site dataset (medvlsm format).",
                                formatter_class=HELP_FORMAT)
    synth.add_argument("out", type=path_arg, help="output folder; one site-<k>/ subfolder per site")
    synth.add_argument("--sites", type=int, default=3, help="number of sites")
    synth.add_argument("--per-site", type=int, default=60, help="images per site")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.add_argument("--image-size", type=int, default=128, help="base native image side in pixels")
    synth.add_argument("--overwrite", action="store_true", help="replace an earlier synthetic dataset in OUT")
    synth.set_defaults(func=run_synth)

    check = commands.add_parser("check", help="report every problem of a dataset; non-zero exit if any",
                                description=CHECK_DESCRIPTION, formatter_class=HELP_FORMAT)
    check.add_argument("path", type=path_arg, help="dataset folder (folder format or medvlsm anns/ format), or a multi-site root")
    check.add_argument("--splits", nargs="+", default=None, help="splits to check; None = train val test and any the dataset declares")
    check.add_argument("--min-figure-images", type=_figure_minimum, default=DEFAULT_MIN_FIGURE_IMAGES,
                       metavar="N", help="note the splits a deployed site (`fedvlsm site start`, same option) "
                                         "would refuse: fewer than N images")
    check.set_defaults(func=run_check)
    return data


def _usage(parser: argparse.ArgumentParser):
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


# Far above any demo or test; beyond them a typo (--sites 100000000000) wrote until the disk was full.
SYNTH_MAX_SITES = 10_000
SYNTH_MAX_PER_SITE = 1_000_000


def synth_option_problem(args: argparse.Namespace) -> str | None:
    """Why `data synth`'s options cannot be used, naming the option (None: they can)."""
    low, high = IMAGE_SIZE_RANGE
    checks = (("--sites", args.sites, 1, SYNTH_MAX_SITES), ("--per-site", args.per_site, MIN_PER_SITE,
              SYNTH_MAX_PER_SITE), ("--seed", args.seed, 0, 2**32 - 1), ("--image-size", args.image_size, low, high))
    for option, value, lo, hi in checks:
        if not lo <= value <= hi:
            return f"{option}: must be in [{lo}, {hi}], got {value}"
    return None


def run_synth(args: argparse.Namespace) -> int:
    problem = synth_option_problem(args)
    if problem:
        print(f"fedvlsm data synth: {problem}", file=sys.stderr)
        return 2
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


CHECK_DESCRIPTION = """Report every problem of a dataset at once; exit 1 if any (warnings alone exit 0).

PATH is one site's dataset, or a multi-site root (`fedvlsm data synth` output
with sites.json, or any folder of dataset folders): then each site is checked
and reported in turn, and the exit is 1 if any site has a problem.
Warnings (unused-images: files in images/ that no split uses) are printed but
do not fail the check, and training goes on with them. A note names each split
(train, val, test) with fewer than --min-figure-images images (default 5): a
deployed site (`fedvlsm site start`) refuses to serve it, since its replies
carry each split's mean loss or Dice; local training and simulations use it."""


def run_check(args: argparse.Namespace) -> int:
    sites = find_sites(args.path)
    if not sites:
        return _report(str(args.path), check_dataset(args.path, splits=args.splits), args.min_figure_images)
    failed = []
    for site in sites:
        print(f"== site {site.name} ({site})")
        if _report(str(site), check_dataset(site, splits=args.splits), args.min_figure_images):
            failed.append(site.name)
    if failed:
        print(f"{args.path}: {len(failed)} of {len(sites)} site(s) have problems: {', '.join(failed)}")
        return 1
    print(f"{args.path}: all {len(sites)} site(s) OK")
    return 0


def _note_small_splits(where: str, min_figure_images: int) -> None:
    """A note, not a problem (the exit status is unchanged): what `fedvlsm site start` would refuse."""
    small = small_splits(Path(where), min_figure_images)
    if small:
        print(f"{where}: note: {', '.join(small)} below --min-figure-images {min_figure_images}: a deployed "
              "site (`fedvlsm site start`) refuses to serve these splits, since its replies carry each split's mean "
              f"loss or Dice; add images, or start the site with --min-figure-images N (at least "
              f"{MIN_FIGURE_IMAGES_FLOOR}). Local training and simulations use them as they are")


def _report(where: str, problems: list, min_figure_images: int) -> int:
    """Print one line per problem, the small-splits note if any, and a summary line; 1 if any is an error."""
    for problem in problems:
        print(problem)
    _note_small_splits(where, min_figure_images)
    if not problems:
        print(f"{where}: OK, no problems found")
        return 0
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(p.kind for p in problems).items()))
    if not errors(problems):
        print(f"{where}: OK, {len(problems)} warning(s): {kinds}")
        return 0
    print(f"{where}: {len(problems)} problem(s): {kinds}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m common.data.cli data check PATH``."""
    parser = argparse.ArgumentParser(prog="fedvlsm")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
