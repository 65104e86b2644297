"""`fedvlsm simulate`: a hermetic local federation (Flower's in-process simulation).

The same ServerApp round loop (server/server_app.py, with the demo's hooks)
and the same ClientApp (client/client_app.py) as `flwr run .` and a real
deployment, but run inside this process by Flower's simulation runtime:
no SuperLink is started (none is left behind, and another user's local
SuperLink on the machine cannot capture the run), nothing is installed or
downloaded, and the exit code says how the run ended:

    0  the run finished (its run directory holds final/)
    1  the run failed, or was stopped by Ctrl-C or SIGTERM (the reason is
       printed and kept in status.json: failed, or stopped)
    2  the configuration was refused (one line naming the key; no traceback),
       or the run exists already (resume it, or pick another run-name)

`--run-config` takes `key=value ...` strings and/or TOML files (such as the
presets in simulations/configs/), any number of each, applied in order on
top of the defaults (those of pyproject.toml's [tool.flwr.app.config]); so a preset
and a resume can be combined: `--run-config x.toml --run-config "resume=true"`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `fedvlsm --help` loads this module, and it stays light
    from flwr.serverapp import Grid

    from server.run_records import RunRecords

DEFAULT_DEMO_SITES = 3
# After the simulation runtime stops: how long the ServerApp thread gets to end (it notices at its
# next grid call, within 20 ms while it waits for replies) before the run's status is settled.
SERVER_STOP_GRACE_S = 10.0


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


def check_site_resources(cpus: float, gpus: float) -> None:
    """--cpus-per-site / --gpus-per-site that Ray can give at least one site (else Flower's actor pool
    is empty and the simulation crashed with tracebacks, or hung for a negative CPU count)."""
    import math

    cores = os.cpu_count() or 1
    if not (math.isfinite(cpus) and 0 < cpus <= cores):
        raise ValueError(f"--cpus-per-site: must be > 0 and at most this machine's {cores} core(s), got {cpus}")
    if not (math.isfinite(gpus) and gpus >= 0):
        raise ValueError(f"--gpus-per-site: must be a number >= 0, got {gpus}")
    if gpus > 0:
        import torch

        count = torch.cuda.device_count()
        if gpus > count:
            raise ValueError(f"--gpus-per-site: {gpus:g} GPU(s) per site, but this machine has {count}")


def resolve_num_sites(cfg: Any, requested: int) -> int:
    """How many sites to simulate; a count the data cannot be split into is refused here, before Ray starts
    (each site found out only in round 1, and a count like 1e21 never reached a site: Flower kept
    registering nodes)."""
    from common.federation_config import MAX_SIMULATED_SITES, ConfigError
    from simulations.partition import PartitionError, partition, site_folders

    if requested > MAX_SIMULATED_SITES:
        raise ConfigError(f"--num-sites: at most {MAX_SIMULATED_SITES} simulated sites, got {requested}")
    if requested:
        data = cfg.data_dir(requested) if cfg.data != "demo" else None
        if data is not None and data.is_dir():
            if cfg.partition == "natural" and len(site_folders(data)) != requested:
                raise ConfigError(f"--num-sites {requested}: partition 'natural' of {data} has "
                                  f"{len(site_folders(data))} site folder(s), one site each; leave --num-sites out, "
                                  "or choose partition = 'iid' / 'quantity-skew' / 'dirichlet'")
            try:  # what each site computes for its own share (simulations/partition.py)
                partition(data, cfg.partition, requested, cfg.seed, cfg.partition_alpha)
            except PartitionError as err:
                raise ConfigError(f"--num-sites {requested}: {err}") from None
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


def saved_num_sites(cfg: Any) -> int:
    """How many sites the run to resume was simulated with (0 if it did not say): its partition
    depends on it, so the documented resume, which gives no --num-sites, keeps it."""
    from server.run_store import RunStore, RunStoreError
    from server.server_app import SIMULATED_SITES

    store = RunStore.in_run_dir(cfg.runs_dir / cfg.run_name)
    try:
        meta = store.read()["run"]["meta"] if store.exists() else {}
    except RunStoreError:
        return 0
    return int((meta or {}).get(SIMULATED_SITES) or 0)


def resume_config(launch: Any, overrides: dict[str, Any]) -> Any:
    """A resumed run's config: its saved config.json, plus only the keys given on this command line.

    Keys that shape results cannot change in a resumed run; giving one with
    another value is refused (naming it), and pyproject defaults never
    creep in: `rounds` stays as saved unless given (then the run is extended).
    """
    from common.federation_config import RESUME_OVERRIDABLE, ConfigError, FederationConfig

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
        if args.num_sites < 0:
            raise ValueError(f"--num-sites: must be >= 0 (0: the default count), got {args.num_sites}")
        check_site_resources(args.cpus_per_site, args.gpus_per_site)
        overrides = parse_run_config(args.run_config)
        # FederationConfig's defaults are pyproject's [tool.flwr.app.config] (a test keeps them equal).
        cfg = FederationConfig.from_run_config(overrides)
        if cfg.resume:
            cfg = resume_config(cfg, overrides)
        cfg = cfg.named()
        num_sites = resolve_num_sites(cfg, args.num_sites or (saved_num_sites(cfg) if cfg.resume else 0))
        if cfg.min_sites > num_sites:
            raise ConfigError(f"run config 'min-sites' = {cfg.min_sites} but the simulation has {num_sites} "
                              "site(s); lower 'min-sites' or pass --num-sites")
    except (ConfigError, ValueError) as err:
        print(f"fedvlsm simulate: {err}", file=sys.stderr)
        return 2
    return simulate(cfg, num_sites, args.cpus_per_site, args.gpus_per_site, exit_on_interrupt=True)


class SimulationStopped(SystemExit):
    """Raised in the ServerApp thread by its grid once the simulation runtime has stopped.

    A SystemExit, so that run_federation records the run as stopped, not failed.
    """


def stop_with_runtime(grid: Grid, stopped: threading.Event) -> None:
    """Make every call of `grid` raise SimulationStopped once `stopped` is set.

    Ctrl-C and SIGTERM reach the main thread, where Flower's simulation
    runtime runs; when the runtime stops, nothing tells the ServerApp thread,
    which would wait for replies that never come (up to `round-timeout`, an
    hour by default), keep the process alive and leave the run `running`. The
    grid is what that thread calls all along (every 20 ms while it waits for
    replies). Patched on the instance, not wrapped: the server and
    server/messaging.py recognise the simulation's grid by its class.
    """
    for name in ("get_node_ids", "push_messages", "pull_messages", "send_and_receive"):
        call = getattr(grid, name)

        def guarded(*args: Any, _call: Any = call, **kwargs: Any) -> Any:
            if stopped.is_set():
                raise SimulationStopped("the simulation runtime has stopped")
            return _call(*args, **kwargs)

        setattr(grid, name, guarded)


def interruption(error: BaseException | None) -> str:
    """'interrupted (SIGINT)' or 'interrupted (SIGTERM)' when `error` is a signal's doing, else ''.

    Ctrl-C raises KeyboardInterrupt; SIGTERM raises SystemExit(15), from the
    handler Ray installs in the main thread when it starts, or from ours
    (`_on_sigterm`) before that.
    """
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    if isinstance(error, SystemExit) and error.code == signal.SIGTERM:
        return "interrupted (SIGTERM)"
    return ""


def _on_sigterm(signum: int, frame: Any) -> None:
    # As Ray's own handler does, so that a SIGTERM before Ray has started ends the run the same way
    # (the default action would kill the process on the spot, leaving the run `running`).
    raise SystemExit(signum)


def status_stamp(run_dir: Path) -> tuple[int, int] | None:
    """The run's status.json as of now (mtime, size), or None: tells whether this process has written it since."""
    from server.run_records import STATUS_FILE

    try:
        st = (run_dir / STATUS_FILE).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def record_end(records: RunRecords, error: BaseException | None, root: BaseException | None) -> None:
    """A run this simulation left `running` is `stopped`, with why: nothing runs it any more.

    Called once the ServerApp thread has ended (or had its chance to), and
    only for a run this process opened: a run it stopped on an interrupt gets
    the signal as its reason.
    """
    why = interruption(error)
    status = records.read_status()["status"]
    if status == "running" or (why and status == "stopped"):
        records.set_status("stopped", why or "the simulation ended before the run did"
                           + (f" ({type(root).__name__}: {root})" if root else ""))


def leave_now(code: int) -> None:
    """End the process with `code` at once: no interpreter shutdown.

    After Ctrl-C or SIGTERM, Flower's simulation runtime (1.42) and Ray are
    left half torn down: a worker thread can stay blocked for ever in
    `ray.get` on an actor Ray's shutdown killed (the interpreter joins it at
    exit: the command never ended), and the interpreter's final garbage
    collection can crash in Ray's objects (exit 134). The run's status is
    recorded by then; nothing is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def simulate(cfg: Any, num_sites: int, cpus_per_site: float = 1.0, gpus_per_site: float = 0.0, *,
             exit_on_interrupt: bool = False) -> int:
    """Run the federation in this process; the exit code of `fedvlsm simulate`.

    `exit_on_interrupt` (the command line): a run stopped by Ctrl-C or SIGTERM
    ends the process once its status is recorded (`leave_now`).
    """
    quiet_logs()
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from common.federation_config import ConfigError
    from server import ray_reaper
    from server.run_records import RunRecords, RunRecordsError
    from server.server_app import run_federation
    from simulations.demo import DemoHooks

    server_app = ServerApp()
    stopped = threading.Event()
    server_threads: list[threading.Thread] = []

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_threads.append(threading.current_thread())
        stop_with_runtime(grid, stopped)
        # The config is the one parsed above: the simulation never reads a
        # run_config of its own, so what was validated is what runs.
        # Recorded as stopped by run_federation; the thread ends without a traceback.
        with contextlib.suppress(SimulationStopped):
            run_federation(grid, cfg, DemoHooks())

    print(f"fedvlsm simulate: run '{cfg.run_name}', {num_sites} site(s), records in {cfg.runs_dir / cfg.run_name}",
          flush=True)
    start = time.perf_counter()
    error: BaseException | None = None
    run_dir = cfg.runs_dir / cfg.run_name
    # Only a status this process wrote is its to correct: another process may be running a run of
    # this name (this one then stops at once, refused), and its `running` must stay.
    before = status_stamp(run_dir)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    # Ray starts in this process; a few of its processes outlived it by a minute when it ended without
    # `ray.shutdown()` (SIGKILL, the OOM killer, a crash): the watcher ends them with it.
    ray_reaper.ensure_started()
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
    finally:
        stopped.set()
        if in_main:  # None: a handler from outside Python, which signal.signal cannot put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    for thread in server_threads:
        thread.join(SERVER_STOP_GRACE_S)
    took = time.perf_counter() - start
    root = error
    while root is not None and root.__cause__ is not None:
        root = root.__cause__
    records = RunRecords(run_dir)
    written = status_stamp(run_dir) != before  # this process ran (or tried) the run, not only found it
    if written:
        record_end(records, error, root)
    status = records.read_status()
    if isinstance(root, (ConfigError, RunRecordsError)):  # refused as asked (e.g. a run that already exists)
        print(f"fedvlsm simulate: {root}", file=sys.stderr)
        return 2
    if error is not None and not written:  # the status on file is another run's doing: not this one's
        print(f"fedvlsm simulate: run '{cfg.run_name}' not started after {took:.1f}s: {type(root).__name__}: {root}",
              file=sys.stderr)
        return 1
    if error is not None or status["status"] != "finished":
        reason = status.get("reason") or (f"{type(root).__name__}: {root}" if root else "unknown")
        print(f"fedvlsm simulate: run '{cfg.run_name}' {status['status']} after {took:.1f}s: {reason}",
              file=sys.stderr)
        if exit_on_interrupt and interruption(error):
            leave_now(1)
        return 1
    print(f"fedvlsm simulate: run '{cfg.run_name}' finished in {took:.1f}s; final adapter in "
          f"{cfg.runs_dir / cfg.run_name / 'final' / 'adapter'}", flush=True)
    return 0
