"""A hospital's long-lived site worker: the warm half of the ClientApp.

    python -m client.worker --socket <site-dir>/worker.sock [--device cuda] [--preload-base SPEC]

(normally started by `fedvlsm site start`, which also starts the SuperNode).
It imports torch, transformers and MONAI once, and keeps across rounds and
runs what a per-message ClientApp process would rebuild every time: the
frozen base (client.site's per-process cache, keyed by base spec, so a new
run with another base loads that base once and one with the same base loads
nothing), the site's preprocessed-image cache in memory and on disk, and the
per-process counters every reply reports (`base-loads`,
`process-messages`, `served-by-worker` = 1).

Each message runs the same handler code as the in-process path
(`client.handlers.handle`), one at a time. A failing handler becomes an
error reply with a short public reason (details in the site's log) and the
next message is served; a message the worker cannot even decode is refused
with a short reason, which the forwarder turns into an error reply. The
protocol is in client/worker_protocol.py.

Listens only on a Unix socket (mode 0600, created under umask 077): no
network interface, only the site's own user can connect.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socketserver
import stat
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from client.worker_protocol import (HANDLE, INFO, OK, REFUSED, ProtocolError, call, decode, encode, receive, send,
                                    socket_address, stamp)
from common.config import COMPILE_MODES


class SiteWorker:
    def __init__(self) -> None:
        os.environ["FEDVLSM_IN_WORKER"] = "1"
        start = time.perf_counter()
        from client import handlers  # the heavy imports, once for the worker's life

        self.handlers = handlers
        self.import_seconds = time.perf_counter() - start
        self.started = time.time()
        self.served = 0
        self.failed = 0
        self._lock = threading.Lock()  # one message at a time (a SuperNode sends one at a time anyway)

    def handle(self, request: bytes | bytearray) -> tuple[bytes, bytes]:
        """(status, reply frame) for one forwarded message; (REFUSED, reason) if it cannot be decoded."""
        try:
            msg, ctx = decode(request)
        except Exception as err:  # noqa: BLE001 - a garbled request must not take the worker down
            return REFUSED, f"cannot decode the message ({type(err).__name__})".encode()
        with self._lock:
            self.served += 1
            t_start = time.time()
            try:
                reply = self.handlers.handle(msg, ctx)
            except Exception as err:  # noqa: BLE001 - handlers are wrapped already; this is the last net
                from common.site_errors import public_reason

                reply = self.handlers.error_reply(msg, ctx, public_reason("worker", err))
            if reply.has_content() and self.handlers.Rec.STATUS in reply.content.config_records:
                self.failed += 1
            stamp(reply, t_handler_start=t_start, t_handler_end=time.time())
        return OK, encode(reply, ctx)

    def info(self) -> bytes:
        from client import site

        return json.dumps({
            "pid": os.getpid(), "started": self.started, "messages": self.served, "failed": self.failed,
            "busy": self._lock.locked(),  # a handler is running
            "import_seconds": self.import_seconds, "bases": sorted(site._BASES), **site.process_stats(),
        }).encode()


class _Server(socketserver.ThreadingUnixStreamServer):
    """One thread per connection (an `INFO` is answered while a message trains); one request per connection."""

    daemon_threads = True  # a stop does not wait for a long handler (see serve)

    def __init__(self, path: str, worker: SiteWorker) -> None:
        self.worker = worker
        super().__init__(path, _Request)


class _Request(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        worker: SiteWorker = self.server.worker  # type: ignore[attr-defined]
        try:
            kind, payload = receive(self.request)
        except (ProtocolError, OSError):
            return  # not our protocol, or the peer went away: nothing to answer
        if kind == HANDLE:
            status, out = worker.handle(payload)
        elif kind == INFO:
            status, out = OK, worker.info()
        else:
            status, out = REFUSED, b"unknown request kind"
        try:
            send(self.request, status, out)
        except OSError:
            pass  # the ClientApp process was stopped (e.g. its run ended) before the reply: nobody to tell


def worker_alive(address: str, timeout: float = 1.0) -> dict | None:
    """The worker's info if one answers at `address` within `timeout` s, else None."""
    try:
        status, data = call(address, INFO, b"", connect_timeout=timeout, timeout=timeout)
        return json.loads(bytes(data)) if status == OK else None
    except (OSError, ValueError):  # includes WorkerNotRunning and ProtocolError
        return None


def _own_socket_lock(socket_path: Path) -> TextIO | None:
    """An exclusive lock on `<socket>.lock`, kept open (held) until the process ends; None if taken."""
    fh = open(socket_path.with_name(socket_path.name + ".lock"), "a+")  # noqa: SIM115 - held for life
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def serve(socket_path: Path, preload_base: str = "", ready_file: Path | None = None) -> int:
    socket_path = socket_path.expanduser().resolve()
    address = socket_address(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    # The lock, held for the worker's life, says who owns the socket path: a worker that is alive
    # but slow to answer (stopped, swapping) keeps it, where a 1 s "does it answer?" probe took its
    # socket away (and that worker, stopping later, deleted the new one's).
    lock = _own_socket_lock(socket_path)
    if lock is None:
        print(f"fedvlsm worker: another worker already serves {socket_path}", file=sys.stderr)
        return 2
    if os.path.lexists(socket_path):
        if not stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            print(f"fedvlsm worker: {socket_path} exists and is not a socket; not deleting it "
                  "(give another --socket)", file=sys.stderr)
            return 2
        socket_path.unlink()  # stale socket of a worker that died (no worker holds the lock)
    worker = SiteWorker()
    if preload_base:
        from client import site

        site.base(preload_base)
    old = os.umask(0o077)  # the socket is created 0600 (owner only)
    try:
        server = _Server(str(socket_path), worker)
    except OSError as err:
        print(f"fedvlsm worker: cannot listen on {address} ({err.strerror})", file=sys.stderr)
        return 2
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    threading.Thread(target=server.serve_forever, name="worker-accept", daemon=True).start()
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"fedvlsm worker: pid {os.getpid()} serving on {address} (imports took {worker.import_seconds:.1f}s)",
          flush=True)
    if ready_file is not None:
        ready_file.write_text(json.dumps({"pid": os.getpid(), "address": address}))
    stop.wait()
    server.shutdown()  # no new connections
    # Give a message in progress up to 5 s to finish and reply (its handler holds the lock).
    if worker._lock.acquire(timeout=5):
        worker._lock.release()
    server.server_close()
    socket_path.unlink(missing_ok=True)
    print(f"fedvlsm worker: stopped after {worker.served} message(s)", flush=True)
    return 0


def compile_problem(device: str) -> str:
    """Why local training could not honour a compile mode on `device` ('' if it can): every mode
    acts on the fast path, which runs on CUDA. Checked at start, so a site does not fail every round."""
    from common.config import resolve_device

    try:
        resolved = resolve_device(device or "auto")
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    if resolved.type == "cuda":
        return ""
    return f"needs a CUDA device (the fast path), but the worker's device is {resolved}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True, help="Unix socket path to listen on (created 0600)")
    p.add_argument("--device", default="", help="torch device for training/evaluation (default: auto)")
    p.add_argument("--compile", default="", choices=("",) + COMPILE_MODES,
                   help="TrainConfig.compile of local training, e.g. cuda-graph on a CUDA device (default: off)")
    p.add_argument("--preload-base", default="", help="load this base spec before serving (optional)")
    p.add_argument("--ready-file", default=None, help="write pid and address here once serving")
    args = p.parse_args(argv)
    if args.compile not in ("", "off"):
        problem = compile_problem(args.device)
        if problem:
            p.error(f"--compile {args.compile}: {problem}")
    if args.compile:
        os.environ["FEDVLSM_COMPILE"] = args.compile
    if args.device:
        os.environ["FEDVLSM_DEVICE"] = args.device
        if args.device == "cpu":
            os.environ["FEDVLSM_FORCE_CPU"] = "1"
    return serve(Path(args.socket), args.preload_base, Path(args.ready_file) if args.ready_file else None)


if __name__ == "__main__":
    sys.exit(main())
