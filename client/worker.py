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
next message is served; a message the worker cannot even decode gets a gRPC
error, which the forwarder turns into an error reply. The protocol is in
client/worker_protocol.py.

Listens only on a Unix socket (mode 0600, created under umask 077): no
network interface, only the site's own user can connect.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from client.worker_protocol import CHANNEL_OPTIONS, HANDLE, INFO, decode, encode, socket_address, stamp


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

    def handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            msg, ctx = decode(request)
        except Exception as err:  # noqa: BLE001 - a garbled request must not take the worker down
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode the message ({type(err).__name__})")
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
        return encode(reply, ctx)

    def info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        from client import site

        return json.dumps({
            "pid": os.getpid(), "started": self.started, "messages": self.served, "failed": self.failed,
            "import_seconds": self.import_seconds, "bases": sorted(site._BASES), **site.process_stats(),
        }).encode()


class _Service(grpc.GenericRpcHandler):
    def __init__(self, worker: SiteWorker) -> None:
        self._methods = {HANDLE: worker.handle, INFO: worker.info}

    def service(self, handler_call_details):
        fn = self._methods.get(handler_call_details.method)
        # No serializers: bytes in, bytes out (no .proto codegen needed).
        return grpc.unary_unary_rpc_method_handler(fn) if fn else None


def worker_alive(address: str, timeout: float = 1.0) -> dict | None:
    """The worker's info if one answers at `address`, else None."""
    try:
        # wait_for_ready + deadline rather than grpc.channel_ready_future, whose
        # connectivity watch makes the channel's close block ~0.2 s.
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            data = channel.unary_unary(INFO, request_serializer=None, response_deserializer=None)(
                b"", wait_for_ready=True, timeout=timeout)
            return json.loads(data)
    except (grpc.RpcError, ValueError):
        return None


def serve(socket_path: Path, preload_base: str = "", ready_file: Path | None = None) -> int:
    socket_path = socket_path.expanduser().resolve()
    address = socket_address(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        if worker_alive(address):
            print(f"fedvlsm worker: another worker already serves {socket_path}", file=sys.stderr)
            return 2
        socket_path.unlink()  # stale socket of a worker that died
    worker = SiteWorker()
    if preload_base:
        from client import site

        site.base(preload_base)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((_Service(worker),))
    old = os.umask(0o077)  # the socket is created 0600 (owner only)
    try:
        if server.add_insecure_port(address) == 0:
            print(f"fedvlsm worker: cannot listen on {address}", file=sys.stderr)
            return 2
        server.start()
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
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
    server.stop(grace=5).wait()
    socket_path.unlink(missing_ok=True)
    print(f"fedvlsm worker: stopped after {worker.served} message(s)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True, help="Unix socket path to listen on (created 0600)")
    p.add_argument("--device", default="", help="torch device for training/evaluation (default: auto)")
    p.add_argument("--preload-base", default="", help="load this base spec before serving (optional)")
    p.add_argument("--ready-file", default=None, help="write pid and address here once serving")
    args = p.parse_args(argv)
    if args.device:
        os.environ["FEDVLSM_DEVICE"] = args.device
        if args.device == "cpu":
            os.environ["FEDVLSM_FORCE_CPU"] = "1"
    return serve(Path(args.socket), args.preload_base, Path(args.ready_file) if args.ready_file else None)


if __name__ == "__main__":
    sys.exit(main())
