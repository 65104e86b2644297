"""The server dashboard: watch runs live in a browser (`fedvlsm dashboard`, or `dashboard-port`).

    create_app(runs_dir, token=None)                  the ASGI app (server/dashboard/app.py)
    serve(runs_dir, host, port, token)                 blocking (the CLI)
    start_in_background(runs_dir, host, port, token)   a daemon thread; returns the URL

Safe defaults: binds to 127.0.0.1; read-only (GET only); every script, style
and the chart library (Chart.js, MIT, vendored in static/) are served by the
dashboard itself, so it works without internet. With a token (argument, or
$FEDVLSM_DASHBOARD_TOKEN when the argument is None) every route needs it; a
token is required to bind to anything other than loopback. Without a token
it answers only requests addressed to localhost or a loopback address (a
web page cannot reach it through DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from pathlib import Path

TOKEN_ENV = "FEDVLSM_DASHBOARD_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050


class DashboardError(RuntimeError):
    """The dashboard cannot start as asked (port taken, no token for a public address, ...)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(token: str | None) -> str | None:
    """The token to require: the argument, else $FEDVLSM_DASHBOARD_TOKEN; None (or empty): no token."""
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    return token or None


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise DashboardError(
            f"refusing to serve the dashboard on {host} without an access token: "
            f"set --token or ${TOKEN_ENV} (or bind to 127.0.0.1)")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port is a clear error here, not in a thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise DashboardError(f"cannot serve the dashboard on {host}:{port}: {err.strerror or err} "
                             "(pick another port)") from err
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _server(runs_dir: Path, host: str, port: int, token: str | None):
    import uvicorn

    from server.dashboard.app import create_app

    token = resolve_token(token)
    check_bind(host, token)
    sock = _bind(host, port)
    # Without a token (loopback only, check_bind): answer only requests addressed to a loopback name,
    # or any web page could read the runs through DNS rebinding.
    app = create_app(Path(runs_dir), token=token, loopback_only=not token)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config), sock


def serve(runs_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
          announce=print) -> None:
    """Serve until interrupted (Ctrl-C). Raises DashboardError when it cannot start."""
    server, sock = _server(runs_dir, host, port, token)
    announce(f"fedvlsm dashboard: {url_of(host, sock.getsockname()[1])} (runs in {Path(runs_dir).resolve()}"
             f"{'; access token required' if resolve_token(token) else ''}); Ctrl-C stops it")
    server.run(sockets=[sock])


def start_in_background(runs_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                        token: str | None = None) -> str:
    """Serve the dashboard from a daemon thread (it ends with the process); returns its URL.

    `port` 0 picks a free port (the URL says which). Raises DashboardError,
    with the reason, when the port is taken, when a non-loopback `host` has
    no token, or when the server has not started within 15 s; the caller
    decides whether a run goes on without its dashboard.
    """
    server, sock = _server(runs_dir, host, port, token)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fedvlsm-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise DashboardError(f"the dashboard on {host}:{port} did not start")
        time.sleep(0.02)
    return url_of(host, sock.getsockname()[1])


def __getattr__(name: str):
    if name == "create_app":  # lazy: starlette only when the dashboard is used
        from server.dashboard.app import create_app

        return create_app
    raise AttributeError(name)
