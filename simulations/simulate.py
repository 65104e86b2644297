"""`fedvlsm simulate`: a hermetic local federation (Flower's in-process simulation).

The same ServerApp round loop (server/server_app.py, with the demo's hooks)
and the same ClientApp (client/client_app.py) as `flwr run .` and a real
deployment, but run inside this process by Flower's simulation runtime:
no SuperLink is started (none is left behind, and another user's local
SuperLink on the machine cannot capture the run), nothing is installed or
downloaded, and the exit code says how the run ended:

    0  the run finished (its run directory holds final/)
    1  the run failed (the reason is printed and kept in status.json)
    2  the configuration was refused (one line naming the key; no traceback)

`--run-config` takes `key=value ...` strings and/or TOML files (such as the
presets in simulations/configs/), any number of each, applied in order on
top of the defaults (those of pyproject.toml's [tool.flwr.app.config]); so a preset
and a resume can be combined: `--run-config x.toml --run-config "resume=true"`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_DEMO_SITES = 3


def add_simulate_command(sub: argparse._SubParsersAction) -> None:
    from common.cli import HELP_FORMAT

    p = sub.add_parser(
        "simulate",
        help="run a local federated simulation (the demo by default): hermetic, offline, exit code = outcome",
        description="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
        formatter_class=HELP_FORMAT,
    )
    p.add_argument("--run-config", action="append", default=[], metavar="CFG",
                   help="'key=value ...' or a .toml file; repeatable, applied in order (keys: docs/federation.md)")
    p.add_argument("--num-sites", type=int, default=0,
                   help="simulated SuperNodes; 0: one per site folder (natural partition), demo-sites, "
                        f"or {DEFAULT_DEMO_SITES} for the demo")
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="CPU cores Ray reserves per ClientApp")
    p.add_argument("--gpus-per-site", type=float, default=0.0, help="GPU share Ray reserves per ClientApp")
    p.set_defaults(func=cmd_simulate)


def parse_run_config(args: list[str]) -> dict[str, Any]:
    """Merge 'key=value ...' strings and TOML files, in order (Flower's own value syntax)."""
    from flwr.common.config import flatten_dict, parse_config_args

    merged: dict[str, Any] = {}
    for arg in args:
        if arg.strip().endswith(".toml"):
            path = Path(arg.strip()).expanduser()
            if not path.is_file():
                raise ValueError(f"--run-config: {path} does not exist")
            try:
                merged.update(flatten_dict(tomllib.loads(path.read_text())))
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"--run-config: {path} is not valid TOML: {err}") from None
        else:
            try:
                merged.update(parse_config_args([arg]))
            except Exception as err:  # click's exception for a malformed string
                raise ValueError(f"--run-config {arg!r}: {getattr(err, 'message', err)}") from None
    return merged


def resolve_num_sites(cfg: Any, requested: int) -> int:
    from common.federation_config import ConfigError
    from simulations.partition import site_folders

    if requested:
        return requested
    if cfg.data == "demo":
        return cfg.demo_sites or DEFAULT_DEMO_SITES
    root = cfg.data_dir(0)
    if cfg.partition == "natural":
        if not root.is_dir():
            raise ConfigError(f"run config 'data': {root} is not a folder")
        count = len(site_folders(root))
        if not count:
            raise ConfigError(f"run config 'data': {root} holds no site folders (partition 'natural')")
        return count
    raise ConfigError(f"partition '{cfg.partition}' splits the data over any number of sites: pass --num-sites N")


def resume_config(launch: Any, overrides: dict[str, Any]) -> Any:
    """A resumed run's config: its saved config.json, plus only the keys given on this command line.

    Keys that shape results cannot change in a resumed run; giving one with
    another value is refused (naming it), and pyproject defaults never
    creep in: `rounds` stays as saved unless given (then the run is extended).
    """
    from common.federation_config import ConfigError, FederationConfig
    from server.server_app import RESUME_OVERRIDABLE

    path = launch.runs_dir / launch.run_name / "config.json"
    if not path.is_file():
        raise ConfigError(f"run config 'resume': no run '{launch.run_name}' to resume ({path} does not exist)")
    saved = FederationConfig.from_run_config(json.loads(path.read_text()))
    given = FederationConfig.from_run_config({**saved.to_run_config(), **overrides}).to_run_config()
    for key, value in given.items():
        if key.replace("-", "_") in RESUME_OVERRIDABLE + ("resume",):
            continue
        if saved.to_run_config()[key] != value:
            raise ConfigError(f"run config '{key}': a resumed run keeps its saved value "
                              f"({saved.to_run_config()[key]!r}, not {value!r}); start a new run to change it")
    return FederationConfig.from_run_config(given)


def quiet_logs() -> None:
    """Trim noise that hides the run's own lines, without hiding real errors."""
    # Ray's FutureWarning about overriding accelerator env vars on zero GPUs.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from flwr.common.logger import FLOWER_LOGGER, update_console_handler

    if not sys.stderr.isatty():
        update_console_handler(colored=False)  # no ANSI colour codes in files and pipes

    class _Drop(logging.Filter):
        NOISE = ("Manually terminating", "The `run_simulation` function is deprecated",
                 "Please use `flwr run`", "DEPRECATED FEATURE")

        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            return not any(n in msg for n in self.NOISE)

    for handler in FLOWER_LOGGER.handlers:
        handler.addFilter(_Drop())
    # Ray's worker processes (the ClientApp actors) start after this and
    # inherit the environment: no colour codes in their forwarded lines, and
    # only their errors (each actor says "Manually terminating ClientAppActor"
    # at shutdown, a WARNING). A site's failures still reach the console: the
    # server's round line names each failed site with its reason. This
    # process's own logger was configured at import and is not affected.
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")


def cmd_simulate(args: argparse.Namespace) -> int:
    from common.federation_config import ConfigError, FederationConfig

    try:
        overrides = parse_run_config(args.run_config)
        # FederationConfig's defaults are pyproject's [tool.flwr.app.config] (a test keeps them equal).
        cfg = FederationConfig.from_run_config(overrides)
        if cfg.resume:
            cfg = resume_config(cfg, overrides)
        if not cfg.run_name:
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            cfg = cfg.replace(run_name=f"{stamp}-{cfg.strategy}-{cfg.adapter}")
        num_sites = resolve_num_sites(cfg, args.num_sites)
        if cfg.min_sites > num_sites:
            raise ConfigError(f"run config 'min-sites' = {cfg.min_sites} but the simulation has {num_sites} "
                              "site(s); lower 'min-sites' or pass --num-sites")
    except (ConfigError, ValueError) as err:
        print(f"fedvlsm simulate: {err}", file=sys.stderr)
        return 2
    return simulate(cfg, num_sites, args.cpus_per_site, args.gpus_per_site)


def simulate(cfg: Any, num_sites: int, cpus_per_site: float = 1.0, gpus_per_site: float = 0.0) -> int:
    """Run the federation in this process; the exit code of `fedvlsm simulate`."""
    quiet_logs()
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from common.federation_config import ConfigError
    from server.run_records import RunRecords
    from server.server_app import run_federation
    from simulations.demo import DemoHooks

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        # The config is the one parsed above: the simulation never reads a
        # run_config of its own, so what was validated is what runs.
        run_federation(grid, cfg, DemoHooks())

    print(f"fedvlsm simulate: run '{cfg.run_name}', {num_sites} site(s), records in {cfg.runs_dir / cfg.run_name}",
          flush=True)
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_sites,
            backend_config={"client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site},
                            "init_args": {"logging_level": logging.ERROR, "log_to_driver": True}},
        )
    except BaseException as err:  # noqa: BLE001 - reported below, as an exit code
        error = err
    took = time.perf_counter() - start
    status = RunRecords(cfg.runs_dir / cfg.run_name).read_status()
    root = error
    while root is not None and root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, ConfigError):
        print(f"fedvlsm simulate: {root}", file=sys.stderr)
        return 2
    if error is not None or status["status"] != "finished":
        reason = status.get("reason") or (f"{type(root).__name__}: {root}" if root else "unknown")
        print(f"fedvlsm simulate: run '{cfg.run_name}' {status['status']} after {took:.1f}s: {reason}",
              file=sys.stderr)
        return 1
    print(f"fedvlsm simulate: run '{cfg.run_name}' finished in {took:.1f}s; final adapter in "
          f"{cfg.runs_dir / cfg.run_name / 'final' / 'adapter'}", flush=True)
    return 0
