"""`fedvlsm site start`: one command per hospital, starting (and stopping) its site worker and SuperNode.

    fedvlsm site start --superlink HOST:PORT --data PATH [--site-name N] [--site-dir DIR] [--device cuda]
                       --root-certificates ca.crt --auth-key site.key      # TLS + site authentication
    fedvlsm site start --superlink 127.0.0.1:9092 --data PATH --insecure   # local trials only

It runs two children:

1. the site worker (`python -m client.worker`), listening on
   `<site-dir>/worker.sock` (0600); it keeps the frozen base, caches and site
   state warm across rounds and runs;
2. the SuperNode: `flower-supernode` run as `python -m client.supernode`
   (Flower 1.42's message loop fixed, see client/supernode.py), with node
   config `data-path`, `site-name`, `site-dir` and
   `worker="unix:<site-dir>/worker.sock"`, so every ClientApp process it
   starts forwards its message to the worker.

SIGTERM/SIGINT are forwarded to both; the command then exits 0. If the
SuperNode exits, the worker is stopped and the command exits 1 with the
SuperNode's exit code and log; likewise if the SuperNode's SuperExec (it
starts the ClientApp process of every message, and Flower never restarts
it) exits while the SuperNode runs on. If the worker dies, it is
**restarted** (up to `--worker-restarts` times, default 3; messages that arrive meanwhile get
an error reply "worker: the site worker is not running", which the server
records while the round goes on); once the restarts are used up, the
SuperNode is stopped and the command exits 1. Children get SIGKILL if this
process itself is killed (Linux PR_SET_PDEATHSIG), so nothing outlives it.

Only argparse at module level (the CLI must build without heavy imports).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli import device_arg, path_arg, port_arg  # argparse types shared with the other commands (light)
from common.config import COMPILE_MODES
from common.site_naming import default_site_dir, default_site_name
from common.site_policy import (
    DEFAULT_MIN_FIGURE_IMAGES,
    NODE_DP_REQUIRE,
    NODE_DP_SITE_BUDGET,
    NODE_DP_SITE_DELTA,
    NODE_MIN_FIGURE_IMAGES,
    SitePolicy,
    SitePolicyError,
    ledgers_elsewhere,
    small_splits,
)

if TYPE_CHECKING:  # imported where used: this module stays light for the CLI
    import psutil

WORKER_START_TIMEOUT_S = 300.0
# Flower 1.42's SuperLink activates a node only if it is registered or offline, and keeps a node whose
# process died "online" until 2 x 30 s heartbeat interval after its last heartbeat (flwr/common/constant.py:
# HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE; neither is a CLI option). A site restarted sooner is
# refused ("Failed to activate SuperNode."), exactly like an unregistered key: retry for this long.
DEFAULT_SITE_DELTA = 1e-5  # --dp-site-delta where --dp-site-budget is given without it
REJOIN_WAIT_S = 90.0
REJOIN_RETRY_S = 5.0
ACTIVATION_REFUSED = "Failed to activate SuperNode"
SUPEREXEC_CHECK_S = 2.0  # how often watch() looks for the SuperNode's SuperExec
SUPEREXEC_GRACE_S = 5.0  # how long it may be missing while the SuperNode runs before the site gives up
SUPEREXEC_START_S = 60.0  # how long a new SuperNode may take to start it


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" where the help does not say it: it printed "(default: the data folder's
    name) (default: )", and "(default: )" for every empty one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.required:
            return text
        if action.default is False:  # a flag
            return text + " (default: off)"
        if action.default is None or action.default == "":
            return text + " (default: none)"
        return super()._get_help_string(action)


def add_site_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site", help="run a hospital site (site worker + Flower SuperNode)",
                       description="Run a hospital site: a warm site worker and its Flower SuperNode.")
    ssub = p.add_subparsers(dest="site_command", required=True, metavar="SITE_COMMAND")
    s = ssub.add_parser("start", help="start this site's worker and SuperNode; stop both on exit",
                        description=__doc__.split("\n\n")[0] if __doc__ else None,
                        formatter_class=_DefaultsHelp)
    s.add_argument("--superlink", required=True, help="the consortium's SuperLink Fleet API, HOST:PORT")
    s.add_argument("--data", required=True, type=path_arg, help="this site's dataset folder (never leaves the site)")
    s.add_argument("--site-name", default="", help="name in the server's records (default: site-<8 hex digits>, a pseudonym of the data folder: its name never leaves the site)")
    s.add_argument("--site-dir", default="", help="site-local state and caches (default: $FEDVLSM_HOME/sites/<--site-name, else the data folder's name>)")
    s.add_argument("--device", default="", type=_worker_device, help="torch device of the worker, e.g. cuda, cuda:1, cpu (default: auto)")
    s.add_argument("--compile", default="", choices=("",) + COMPILE_MODES,
                   help="local training's TrainConfig.compile: cuda-graph runs each step as one CUDA graph "
                        "(CUDA, bf16; a shape whose capture fails trains eagerly, with a warning in the worker log) "
                        "(default: the worker's, off)")
    s.add_argument("--root-certificates", default="", help="CA certificate (PEM) to verify the SuperLink (TLS)")
    s.add_argument("--auth-key", default="", help="this site's EC private key (PEM) for SuperNode authentication")
    s.add_argument("--insecure", action="store_true", help="no TLS: for local trials on one machine only")
    s.add_argument("--port", type=port_arg, default=0,
                   help="the SuperNode's local runtime API port on 127.0.0.1 (0: pick a free one)")
    s.add_argument("--socket", default="", help="worker socket path (default: SITE_DIR/worker.sock)")
    s.add_argument("--preload-base", default="", help="base spec the worker loads before serving its first message")
    s.add_argument("--worker-restarts", type=int, default=3, help="restart a dead worker this many times, then exit 1")
    s.add_argument("--rejoin-wait", type=float, default=REJOIN_WAIT_S,
                   help="seconds to keep retrying when the SuperLink refuses to activate this site's SuperNode "
                        "(a crashed instance of the same site stays 'online' for up to 60 s), then exit 1")
    s.add_argument("--dp-require", action="store_true",
                   help="train only for runs with sample-level DP (dp = 'sample'); refuse every other train message")
    s.add_argument("--dp-site-budget", type=float, default=0.0,
                   help="this site's own epsilon limit over ALL runs on its data together (DP-SGD steps of every "
                        "run composed); implies --dp-require; 0: none (each run's dp-epsilon-budget only)")
    s.add_argument("--dp-site-delta", type=float, default=None,
                   help=f"the delta of --dp-site-budget (default: {DEFAULT_SITE_DELTA:g})")
    s.add_argument("--min-figure-images", type=int, default=DEFAULT_MIN_FIGURE_IMAGES,
                   help="serve no split (train, val, test) with fewer images: replies carry each split's mean "
                        "loss or Dice, which over one image is that image's value (at least 2)")
    s.set_defaults(func=cmd_site_start)


def _worker_device(value: str) -> str:
    return value if value == "" else device_arg(value)  # "": the worker's own choice (auto)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the launcher dies (Linux), so no child outlives it."""
    with contextlib.suppress(OSError):  # no such libc (not Linux): the child just outlives a killed parent
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _is_superexec(proc: psutil.Process) -> bool:
    """Whether a psutil process is a live `flower-superexec` (a zombie is not)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE and any("flower-superexec" in a for a in proc.cmdline()[:3])
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


def _say(text: str) -> None:
    print(f"[fedvlsm site] {text}", flush=True)


def _node_config(values: dict[str, str]) -> str:
    # Flower parses --node-config values as TOML: JSON string quoting is valid TOML for basic strings.
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def worker_command(args: argparse.Namespace, socket: Path, ready: Path) -> list[str]:
    """The site worker's command line: `fedvlsm site start`'s worker options passed on."""
    cmd = [sys.executable, "-m", "client.worker", "--socket", str(socket), "--ready-file", str(ready)]
    for option in ("device", "compile", "preload_base"):
        if getattr(args, option):
            cmd += ["--" + option.replace("_", "-"), getattr(args, option)]
    return cmd


def supernode_command(args: argparse.Namespace, node_config: dict[str, str], port: int) -> list[str]:
    # flower-supernode itself, its message loop fixed by client/supernode.py (a stale reply after a
    # SuperLink restart hung the site).
    cmd = [sys.executable, "-m", "client.supernode", "--superlink", args.superlink,
           "--node-config", _node_config(node_config), "--port", str(port), "--host", "127.0.0.1"]
    if args.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(args.root_certificates).expanduser().resolve())]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", str(Path(args.auth_key).expanduser().resolve())]
    return cmd


def _policy_node_config(args: argparse.Namespace) -> dict[str, str]:
    """The site's privacy terms as node-config entries (only those set: the defaults are the handler's)."""
    out = {}
    if args.dp_require:
        out[NODE_DP_REQUIRE] = "true"
    if args.dp_site_budget:
        out[NODE_DP_SITE_BUDGET] = repr(float(args.dp_site_budget))
        delta = DEFAULT_SITE_DELTA if args.dp_site_delta is None else args.dp_site_delta
        out[NODE_DP_SITE_DELTA] = repr(float(delta))
    if args.min_figure_images != DEFAULT_MIN_FIGURE_IMAGES:
        out[NODE_MIN_FIGURE_IMAGES] = str(args.min_figure_images)
    return out


def _check_args(args: argparse.Namespace) -> str | None:
    if args.insecure and (args.root_certificates or args.auth_key):
        return "--insecure turns TLS off, and site authentication needs TLS: drop --insecure"
    if not args.insecure and not args.root_certificates:
        return ("give --root-certificates ca.crt (TLS; with --auth-key site.key for site authentication), "
                "or --insecure for a local trial")
    for flag, value in (("--root-certificates", args.root_certificates), ("--auth-key", args.auth_key)):
        if value and not Path(value).expanduser().is_file():
            return f"{flag}: {value} is not a file"
    if not Path(args.data).expanduser().is_dir():
        return f"--data: {args.data} is not a folder"
    host, _, port = args.superlink.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--superlink: expected HOST:PORT with a port in 1..65535, got {args.superlink!r}"
    # The name becomes a folder under $FEDVLSM_HOME/sites/ ('a/b' made nested folders) and a record key.
    if args.site_name and (args.site_name in (".", "..") or not args.site_name.isprintable()
                           or any(c in args.site_name for c in "/\\")):
        return f"--site-name: {args.site_name!r} must be one folder name (no '/', '\\', '.' or '..')"
    if args.site_dir and Path(args.site_dir).expanduser().exists() and not Path(args.site_dir).expanduser().is_dir():
        return f"--site-dir: {args.site_dir} exists and is not a folder"
    if args.worker_restarts < 0:
        return f"--worker-restarts: must be >= 0, got {args.worker_restarts}"
    if not (math.isfinite(args.rejoin_wait) and args.rejoin_wait >= 0):
        return f"--rejoin-wait: must be a number of seconds >= 0, got {args.rejoin_wait}"
    if args.dp_site_delta is not None and not args.dp_site_budget:  # it was dropped without a word
        return "--dp-site-delta: it is the delta of --dp-site-budget, which is not given"
    try:
        SitePolicy.from_node_config(_policy_node_config(args))
    except SitePolicyError as err:
        return re.sub(r"node config '([a-z-]+)'", r"--\1", str(err))  # the option, as the user typed it
    if args.dp_site_budget:
        data = Path(args.data).expanduser().resolve()
        site_dir = _site_dir(args, data)
        others = ledgers_elsewhere(data, site_dir)
        if others:
            return (f"--dp-site-budget: {others[0]} already holds the privacy ledger of DP-SGD runs on {data}; "
                    f"a new one in {site_dir} would restart the budget from epsilon 0. Start with "
                    f"--site-dir {others[0]} (and the --site-name it had)")
    small = small_splits(Path(args.data).expanduser(), args.min_figure_images)
    if small:
        return (f"--data: {', '.join(small)} below --min-figure-images {args.min_figure_images}: this site's "
                "replies carry each split's mean loss or Dice, and it sends none over so few images")
    if args.compile not in ("", "off"):  # said here, before anything starts (the worker checks it too)
        from client.worker import compile_problem

        problem = compile_problem(args.device)
        if problem:
            return f"--compile {args.compile}: {problem}"
    return None


def _site_dir(args: argparse.Namespace, data: Path) -> Path:
    """--site-dir, else `$FEDVLSM_HOME/sites/<--site-name, else the data folder's name>`."""
    return Path(args.site_dir).expanduser().resolve() if args.site_dir else default_site_dir(data, args.site_name)


class SiteStartError(Exception):
    """The site cannot start: said in one line, exit 2."""


class Site:
    """The two children and what to do when one of them stops."""

    def __init__(self, args: argparse.Namespace) -> None:
        data = Path(args.data).expanduser().resolve()
        # The name goes into every reply, so never the data folder's own (it can say whose data it
        # is); the site's own folder may be named after it (it stays here).
        self.site_dir = _site_dir(args, data)
        try:
            self.name = args.site_name or default_site_name(data, self.site_dir)
        except (OSError, ValueError) as err:
            raise SiteStartError(f"site folder {self.site_dir}: cannot read or make the site's pseudonym key "
                                 f"(give --site-name, or fix the folder): {err}") from err
        self.socket = Path(args.socket).expanduser().resolve() if args.socket else self.site_dir / "worker.sock"
        self.logs = self.site_dir / "logs"
        self.args = args
        self.port = args.port or _free_port()
        self.node_config = {"data-path": str(data), "site-name": self.name, "site-dir": str(self.site_dir),
                            "worker": f"unix:{self.socket}", **_policy_node_config(args)}
        self.worker: subprocess.Popen | None = None
        self.supernode: subprocess.Popen | None = None
        self.restarts = 0
        self.stopping = False
        self._log_offset = 0  # where the current SuperNode's output starts in supernode.log
        self._refused_since: float | None = None
        self._superexec_seen = False  # the current SuperNode's SuperExec has been running
        self._superexec_missing_since: float | None = None
        self._next_superexec_check = 0.0

    def start_worker(self) -> None:
        from client.worker_protocol import socket_address

        socket_address(self.socket)  # refuses a path too long for a Unix socket
        self.site_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.site_dir, 0o700)
        self.logs.mkdir(exist_ok=True)
        ready = self.site_dir / "worker.ready"
        ready.unlink(missing_ok=True)
        cmd = worker_command(self.args, self.socket, ready)
        log = open(self.logs / "worker.log", "a")  # noqa: SIM115 - the child owns it
        self.worker = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not ready.exists():
            if self.worker.poll() is not None:
                raise RuntimeError(f"the site worker exited with code {self.worker.returncode} while starting; "
                                   f"see {self.logs / 'worker.log'}")
            if time.monotonic() > deadline or self.stopping:
                raise RuntimeError("the site worker did not start in time" if not self.stopping else "stopped")
            time.sleep(0.2)
        _say(f"worker pid {self.worker.pid} serving on unix:{self.socket} (log: {self.logs / 'worker.log'})")

    def start_supernode(self) -> None:
        cmd = supernode_command(self.args, self.node_config, self.port)
        log = open(self.logs / "supernode.log", "a")  # noqa: SIM115
        self._log_offset = log.tell()
        self.supernode = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self._superexec_seen, self._superexec_missing_since = False, None
        mode = "INSECURE (local trial)" if self.args.insecure else (
            "TLS" + (" + site authentication" if self.args.auth_key else ", no site authentication key"))
        _say(f"SuperNode pid {self.supernode.pid} -> {self.args.superlink} [{mode}] as site '{self.name}' "
             f"(log: {self.logs / 'supernode.log'})")

    def stop_all(self) -> None:
        """Stop the SuperNode, everything under it (its SuperExec and any ClientApp still running:
        Flower does not stop those), and the worker."""
        import psutil

        from client.processes import stop_all

        self.stopping = True
        tree: list[psutil.Process] = []
        for proc in (self.supernode, self.worker):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    tree += psutil.Process(proc.pid).children(recursive=True)
                proc.terminate()
        for proc in (self.supernode, self.worker):
            if proc is None:
                continue
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        stop_all(tree, timeout=10)

    def _log_since_start_has(self, text: str) -> bool:
        """Whether the current SuperNode's output (supernode.log since it started) contains `text`."""
        try:
            with open(self.logs / "supernode.log", errors="replace") as fh:
                fh.seek(self._log_offset)
                return text in fh.read()
        except OSError:
            return False

    def _activation_refused(self) -> bool:
        return self._log_since_start_has(ACTIVATION_REFUSED)

    def _retry_refused_activation(self) -> bool:
        """The SuperNode exited because the SuperLink refused to activate it: start it again (True),
        for up to --rejoin-wait seconds from the first refusal in a row; False once that is over."""
        if not self._activation_refused():
            return False
        now = time.monotonic()
        self._refused_since = self._refused_since or now
        waited = now - self._refused_since
        if waited >= self.args.rejoin_wait:
            _say(f"ERROR: the SuperLink refused to activate this site for {waited:.0f}s (--rejoin-wait): "
                 "is this site's public key registered (flwr supernode register)?")
            self._refused_since = None
            return False
        _say(f"the SuperLink refused to activate this site's SuperNode (a crashed instance of this site stays "
             f"'online' there for up to 60 s after its last heartbeat; or the key is not registered); "
             f"retrying in {REJOIN_RETRY_S:g}s ({waited:.0f}/{self.args.rejoin_wait:g}s)")
        deadline = time.monotonic() + REJOIN_RETRY_S
        while time.monotonic() < deadline and not self.stopping:
            time.sleep(0.2)
        if self.stopping:
            return True
        self.start_supernode()
        return True

    def _superexec_lost(self) -> bool:
        """Whether the SuperNode's SuperExec is gone while the SuperNode runs on (for SUPEREXEC_GRACE_S after
        it was seen running, or SUPEREXEC_START_S if it never was). The SuperExec starts the ClientApp
        process of every message; Flower starts it once and never looks at it again, so without it the
        SuperNode stays connected and 'online' but serves nothing (every round waits out its round-timeout
        for this site)."""
        import psutil

        now = time.monotonic()
        if now < self._next_superexec_check or self.supernode is None:
            return False
        self._next_superexec_check = now + SUPEREXEC_CHECK_S
        try:
            children = psutil.Process(self.supernode.pid).children()
        except psutil.NoSuchProcess:
            return False  # the SuperNode's own exit is handled by watch()
        if any(_is_superexec(c) for c in children):
            self._superexec_seen, self._superexec_missing_since = True, None
            return False
        # Missing: not started yet, or gone. The SuperNode starts it within seconds of its own start (before
        # connecting), so one never seen counts as gone after SUPEREXEC_START_S (it may have died between two
        # looks); one seen running is reported only if the SuperNode outlives it by SUPEREXEC_GRACE_S (a
        # SuperNode shutting down takes it along).
        self._superexec_missing_since = self._superexec_missing_since or now
        missing = now - self._superexec_missing_since
        return missing >= (SUPEREXEC_GRACE_S if self._superexec_seen else SUPEREXEC_START_S)

    def _tail(self, name: str) -> str:
        try:
            return "".join((self.logs / name).read_text(errors="replace").splitlines(True)[-15:])
        except OSError:
            return ""

    def watch(self, poll: float = 0.5) -> int:
        """Until a signal (0) or a child failing for good (1)."""
        while not self.stopping:
            time.sleep(poll)
            if self.stopping:
                break
            if self._refused_since is not None and self._log_since_start_has("SuperNode ID:"):
                _say("the SuperLink activated this site's SuperNode")
                self._refused_since = None  # activated: a later refusal gets the whole --rejoin-wait again
            if self.supernode is not None and self.supernode.poll() is not None:
                code = self.supernode.returncode
                if self._retry_refused_activation():
                    continue
                _say(f"ERROR: the SuperNode exited with code {code}; stopping the worker. "
                     f"Last lines of {self.logs / 'supernode.log'}:\n{self._tail('supernode.log')}")
                self.stop_all()
                return 1
            if self._superexec_lost():
                _say("ERROR: the SuperNode's SuperExec (it starts the ClientApp process of every message) has "
                     "exited while the SuperNode runs on, so this site can serve no message; stopping the "
                     "SuperNode and the worker (start this site again). Last lines of "
                     f"{self.logs / 'supernode.log'}:\n{self._tail('supernode.log')}")
                self.stop_all()
                return 1
            if self.worker is not None and self.worker.poll() is not None:
                code = self.worker.returncode
                if self.restarts >= self.args.worker_restarts:
                    _say(f"ERROR: the site worker exited with code {code} and has been restarted "
                         f"{self.restarts} time(s) already (--worker-restarts); stopping the SuperNode")
                    self.stop_all()
                    return 1
                self.restarts += 1
                _say(f"WARNING: the site worker exited with code {code}; restarting it "
                     f"({self.restarts}/{self.args.worker_restarts})")
                try:
                    self.start_worker()
                except RuntimeError as err:
                    if self.stopping:  # SIGTERM/SIGINT while the restarted worker started: a clean stop
                        return 0
                    _say(f"ERROR: {err}; stopping the SuperNode")
                    self.stop_all()
                    return 1
        return 0


def cmd_site_start(args: argparse.Namespace) -> int:
    problem = _check_args(args)
    if problem:
        print(f"fedvlsm site start: {problem}", file=sys.stderr)
        return 2
    try:
        site = Site(args)
    except SiteStartError as err:
        print(f"fedvlsm site start: {err}", file=sys.stderr)
        return 2

    def on_signal(signum, frame):  # noqa: ARG001
        if not site.stopping:
            _say(f"signal {signal.Signals(signum).name}: stopping the SuperNode and the worker")
        site.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        site.start_worker()
        if site.stopping:
            return 0
        site.start_supernode()
        code = site.watch()
    except (RuntimeError, ValueError) as err:
        if not site.stopping:
            print(f"fedvlsm site start: {err}", file=sys.stderr)
        code = 0 if site.stopping else 1
    finally:
        site.stop_all()
    _say("stopped" if code == 0 else "exiting with an error")
    return code
