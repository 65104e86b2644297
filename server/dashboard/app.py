"""The dashboard's ASGI app (Starlette): a thin, read-only layer over the run stores.

Routes (all GET; every route needs the token when one is set):

    /                               the runs list
    /runs/<name>                    a run's page
    /runs/<name>/download/<what>.zip   `final` or `round-NNNN` (a checkpoint), zipped
    /api/runs                       every run: name, status, rounds done, last Dice, start time
    /api/runs/<name>                one run: run row (config, status, ...) and rounds with per-site rows
    /api/runs/<name>?since=N&base=K only the rounds after N, when rounds 1..N are still those of the
                                    response whose `rounds_key` was K (else the whole run; `since` says which)
    /static/...                     scripts, styles, the vendored Chart.js and its licence

The pages fetch the API every 2 s and redraw when something changed; a run's
page asks only for the rounds after those it holds. Nothing
here writes to a run, except that a run folder from before the run store
gets its `run.sqlite` imported from `rounds.jsonl` on first view.

Site names, run names, reasons and config values are the sites' and configs'
own text: the pages set them as text only (never as HTML), and every response
carries a Content-Security-Policy that allows no inline or foreign script.
A run is read only from its own folder: a run folder, or a file or folder the
dashboard reads or zips, that is a symbolic link (or not a plain file) is
refused or left out, never followed out of the runs folder. Served without a
token (loopback only), the app answers only requests addressed to a loopback
name (`Host`), so a web page cannot reach it through DNS rebinding.
"""

from __future__ import annotations

import hmac
import os
import re
import stat
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from server.dashboard import is_loopback
from server.run_claim import claim_path
from server.run_store import DB_FILE, RunStoreError, ensure_store

HERE = Path(__file__).parent


def assets_dir() -> Path:
    """The folder holding templates/ and static/.

    Under `flwr run` the ServerApp imports this package from the installed FAB,
    which keeps only *.py, *.toml, *.md, *.json (flwr's include list): the
    templates and scripts are then taken from the installed project, the next
    `sys.path` entry that has them (as common.bases does for the demo weights).
    """
    if (HERE / "templates" / "run.html").is_file() and (HERE / "static" / "run.js").is_file():
        return HERE
    for entry in sys.path:
        candidate = Path(entry or ".") / "server" / "dashboard"
        if (candidate / "templates" / "run.html").is_file() and (candidate / "static" / "run.js").is_file():
            return candidate
    raise FileNotFoundError(f"the dashboard's templates and scripts are missing from {HERE} and from sys.path; "
                            "install the project (pip install -e .)")
TOKEN_COOKIE = "fedvlsm_dashboard_token"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # fullmatch: `$` would let a final newline through
ROUND_RE = re.compile(r"round-\d{4,}")
SINCE_RE = re.compile(r"-?\d{1,18}")  # within SQLite's 64-bit integers
KEY_RE = re.compile(r"[0-9a-f]{32}")
NO_STORE = {"Cache-Control": "no-store"}
# On every response. The pages load their scripts and styles from /static only and set every text
# that comes from a site or a config as text: no inline script, no eval, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# What the dashboard reads in a run folder (and zips: final/, checkpoints/): each must be itself, not a link.
RUN_FILES = (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", "config.json", "rounds.jsonl", "final/summary.json")
RUN_FOLDERS = ("final", "checkpoints")


class RunNotFound(LookupError):
    """No run of that name in the runs folder (HTTP 404)."""


class RunRefused(RunStoreError):
    """A run folder the dashboard will not read: it, or a file in it, is a symbolic link or not a plain file."""


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and any(
        (path / f).is_file() for f in (DB_FILE, "config.json", "rounds.jsonl"))


def check_plain(run_dir: Path) -> None:
    """RunRefused unless the run folder and what the dashboard reads in it are plain folders and files.

    A symbolic link would be followed out of the runs folder: to any file the
    dashboard's user may read (zipped by a download, or shown as a config), or
    to a folder where an import would write its run.sqlite. A FIFO would hang
    the reader (final/summary.json, the claim `<runs>/.<name>.lock`). The
    server itself writes none of these.
    """
    def check(path: Path, folder: bool, what: str = "") -> None:
        try:
            mode = path.lstat().st_mode  # one look per path: a -wal file removed meanwhile is no error
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            why = f"{what}is a symbolic link"
        elif not (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
            why = f"{what}is not a plain {'folder' if folder else 'file'}"
        else:
            return
        raise RunRefused(f"{path}: {why}; the dashboard reads only plain files and folders inside the runs folder")

    check(run_dir, True, "the run folder ")
    check(claim_path(run_dir.parent, run_dir.name), False, "the run's claim ")  # opened to ask if its server lives
    for rel in RUN_FILES:
        check(run_dir / rel, False)
    for rel in RUN_FOLDERS:
        check(run_dir / rel, True)


def run_dir_of(runs_dir: Path, name: str) -> Path:
    """The folder of run `name`, refusing anything that is not a plain child of the runs folder.

    RunNotFound when there is no such run, RunRefused when it is a link or holds one (check_plain).
    """
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise RunNotFound(f"no run named {name!r}")
    path = runs_dir / name
    if not is_run_dir(path):
        raise RunNotFound(f"no run named {name!r} in {runs_dir}")
    check_plain(path)
    return path


def plain_files(folder: Path) -> list[Path]:
    """The regular files under `folder`, without following a link and without hidden names, sorted."""
    out = []
    for root, dirs, files in os.walk(folder):  # followlinks=False: a linked folder is listed, never entered
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            path = Path(root) / f
            try:
                regular = stat.S_ISREG(path.lstat().st_mode)  # lstat: a link is not a file here
            except FileNotFoundError:  # removed since the listing
                continue
            if regular and not f.startswith("."):
                out.append(path)
    return sorted(out)


def unreadable(err: Exception) -> str:
    """Why a run cannot be read: a RunStoreError says it (naming the file); anything else is named by its type."""
    return str(err) if isinstance(err, RunStoreError) else f"{type(err).__name__}: {err}"


def list_runs(runs_dir: Path) -> dict[str, Any]:
    runs = []
    if runs_dir.is_dir():
        for path in sorted(runs_dir.iterdir()):
            if not is_run_dir(path) or not NAME_RE.fullmatch(path.name):
                continue
            try:
                check_plain(path)
                row = ensure_store(path).summary()
                row["name"] = path.name  # the folder is what the URL names
                runs.append(row)
            # Any failure, not only the store's own: one bad folder is one error row,
            # never a list without the others.
            except Exception as err:  # noqa: BLE001
                runs.append({"name": path.name, "status": "error", "error": unreadable(err), "rounds_done": None,
                             "last_dice": None, "started_at": None})
    runs.sort(key=lambda r: (r.get("started_at") or "", r["name"]), reverse=True)
    return {"runs_dir": str(runs_dir), "runs_dir_exists": runs_dir.is_dir(), "runs": runs}


def downloads(run_dir: Path) -> list[dict[str, str]]:
    out = []
    if (run_dir / "final" / "adapter").is_dir():
        out.append({"name": "final", "label": "final adapter (+ summary)"})
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        for p in sorted(checkpoints.iterdir()):
            if ROUND_RE.fullmatch(p.name) and not p.is_symlink() and (p / "state.json").is_file():
                out.append({"name": p.name, "label": f"checkpoint {p.name}"})
    return out


class BadQuery(ValueError):
    """A query parameter of the wrong form (HTTP 400)."""


def poll_query(params: Mapping[str, str]) -> tuple[int | None, str | None]:
    """`since` and `base` of /api/runs/<name>?since=N&base=K (both or neither): BadQuery naming what is wrong."""
    since, base = params.get("since"), params.get("base")
    if since is None and base is None:
        return None, None
    if since is None or base is None:
        raise BadQuery("'since' and 'base' go together: the last round you hold and the rounds_key it came with")
    if not SINCE_RE.fullmatch(since):
        raise BadQuery(f"'since' must be a round number, not {since[:40]!r}")
    if not KEY_RE.fullmatch(base):
        raise BadQuery(f"'base' must be a rounds_key (32 hex digits), not {base[:40]!r}")
    return int(since), base


def read_run(runs_dir: Path, name: str, since: int | None = None, base: str | None = None) -> dict[str, Any]:
    """A run for the API; with `since`/`base` only the rounds after `since`, when the rest are unchanged
    (RunStore.read)."""
    run_dir = run_dir_of(runs_dir, name)
    data = ensure_store(run_dir).read(since=since, base=base)
    return {"name": name, **data, "downloads": downloads(run_dir)}


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


class SecurityHeadersMiddleware:
    """SECURITY_HEADERS on every response (pages, API, static files, errors, 401s)."""

    def __init__(self, app) -> None:
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in self.headers if k not in names]
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def is_loopback_name(host: str) -> bool:
    """Whether a Host header's name (port and IPv6 brackets allowed) is `localhost` or a loopback address."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return is_loopback(name)


class LoopbackHostMiddleware:
    """Answer only requests addressed to a loopback name: a tokenless dashboard on 127.0.0.1 is otherwise
    readable by any web page the coordinator opens, through DNS rebinding (attacker.example resolving to
    127.0.0.1: the browser then treats the dashboard as that page's own origin)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        if is_loopback_name(host):
            return await self.app(scope, receive, send)
        reason = (f"this dashboard (no access token) answers only requests addressed to localhost or a loopback "
                  f"address, not to {host!r}; to open it from elsewhere, serve it with --token")
        response = (JSONResponse({"error": reason}, status_code=421) if scope["path"].startswith("/api/")
                    else PlainTextResponse(reason, status_code=421))
        return await response(scope, receive, send)


class TokenMiddleware(BaseHTTPMiddleware):
    """Every route needs the token: `Authorization: Bearer T`, `?token=T` (then kept in a cookie) or the cookie."""

    def __init__(self, app, token: str) -> None:
        super().__init__(app)
        self.token = token

    def _ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    async def dispatch(self, request: Request, call_next):
        auth = request.headers.get("authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        query = request.query_params.get("token")
        if self._ok(bearer) or self._ok(request.cookies.get(TOKEN_COOKIE)):
            return await call_next(request)
        if self._ok(query):
            response = await call_next(request)
            response.set_cookie(TOKEN_COOKIE, query, httponly=True, samesite="strict")
            return response
        reason = ("this dashboard needs its access token: open it with ?token=..., "
                  "or send 'Authorization: Bearer ...'")
        if _is_api(request):
            return JSONResponse({"error": reason}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return PlainTextResponse(reason, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def create_app(runs_dir: Path, token: str | None = None, loopback_only: bool = False) -> Starlette:
    """The dashboard for every run under `runs_dir`; `token`: required on every route when set.

    `loopback_only`: answer only requests whose Host is localhost or a loopback address (421 otherwise),
    as serve() and start_in_background() do when they serve on loopback without a token.
    """
    runs_dir = Path(runs_dir).expanduser().resolve()
    assets = assets_dir()
    templates = Jinja2Templates(directory=str(assets / "templates"))

    def page(request: Request, template: str, status: int = 200, **context) -> Response:
        return templates.TemplateResponse(request, template, {"runs_dir": str(runs_dir), **context},
                                          status_code=status, headers=NO_STORE)

    def error_page(request: Request, status: int, message: str) -> Response:
        return page(request, "error.html", status=status, status_code=status, message=message)

    # The routes are plain functions, not coroutines: Starlette runs them in its thread pool, so one
    # slow read (a large run, a busy disk) does not hold up every other request on the event loop.
    def runs_page(request: Request) -> Response:
        return page(request, "runs.html")

    def run_page(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            run_dir = run_dir_of(runs_dir, name)
            ensure_store(run_dir).summary()
        except RunNotFound as err:
            return error_page(request, 404, str(err))
        except Exception as err:  # noqa: BLE001 - this run's own problem, said as such (the list shows the others)
            return error_page(request, 500, f"run '{name}' cannot be shown: {unreadable(err)}")
        return page(request, "run.html", name=name)

    def api_runs(request: Request) -> Response:
        return JSONResponse(list_runs(runs_dir), headers=NO_STORE)

    def api_run(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            since, base = poll_query(request.query_params)
            return JSONResponse(read_run(runs_dir, name, since, base), headers=NO_STORE)
        except BadQuery as err:
            return JSONResponse({"error": str(err)}, status_code=400, headers=NO_STORE)
        except RunNotFound as err:
            return JSONResponse({"error": str(err)}, status_code=404, headers=NO_STORE)
        except Exception as err:  # noqa: BLE001 - this run's own problem, said as such (the list shows the others)
            return JSONResponse({"error": f"run '{name}' cannot be read: {unreadable(err)}"}, status_code=500,
                                headers=NO_STORE)

    def download(request: Request) -> Response:
        name, what = request.path_params["name"], request.path_params["what"]
        try:
            run_dir = run_dir_of(runs_dir, name)
        except RunNotFound as err:
            return PlainTextResponse(str(err), status_code=404)
        except RunRefused as err:
            return PlainTextResponse(str(err), status_code=403)
        if what == "final":
            folder = run_dir / "final"
        elif ROUND_RE.fullmatch(what):
            folder = run_dir / "checkpoints" / what
        else:
            return PlainTextResponse(f"nothing to download named {what!r}", status_code=404)
        if folder.is_symlink():
            return PlainTextResponse(f"{folder}: is a symbolic link; the dashboard zips only plain folders",
                                     status_code=403)
        if not folder.is_dir():
            return PlainTextResponse(f"run '{name}' has no {what}", status_code=404)
        fd, tmp = tempfile.mkstemp(prefix="fedvlsm-dashboard-", suffix=".zip")
        os.close(fd)
        # Stored, not deflated: safetensors hardly compress. Links are left out (plain_files).
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for f in plain_files(folder):
                zf.write(f, f"{name}-{what}/{f.relative_to(folder)}")
        return FileResponse(tmp, media_type="application/zip", filename=f"{name}-{what}.zip",
                            background=BackgroundTask(os.unlink, tmp))

    async def not_found(request: Request, exc: Exception) -> Response:
        if _is_api(request):
            return JSONResponse({"error": f"no such route: {request.url.path}"}, status_code=404)
        return error_page(request, 404, f"nothing here: {request.url.path}")

    async def server_error(request: Request, exc: Exception) -> Response:
        # A clear reason, never a stack trace.
        message = f"the dashboard failed on this request: {type(exc).__name__}: {exc}"
        # Answered outside the middleware (Starlette's outermost layer): the headers are given here.
        if _is_api(request):
            return JSONResponse({"error": message}, status_code=500, headers=SECURITY_HEADERS)
        return PlainTextResponse(message, status_code=500, headers=SECURITY_HEADERS)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        message = f"the dashboard is read-only (GET only): {request.method} {request.url.path} is not allowed"
        headers = getattr(exc, "headers", None)  # Starlette's `Allow`
        if _is_api(request):
            return JSONResponse({"error": message}, status_code=405, headers=headers)
        return PlainTextResponse(message, status_code=405, headers=headers)

    # Outermost first: the headers go on every response, a wrong Host is refused before the token is asked.
    middleware = [Middleware(SecurityHeadersMiddleware)]
    if loopback_only:
        middleware.append(Middleware(LoopbackHostMiddleware))
    if token:
        middleware.append(Middleware(TokenMiddleware, token=token))
    return Starlette(
        routes=[
            Route("/", runs_page),
            Route("/runs/{name}", run_page),
            Route("/runs/{name}/download/{what}.zip", download),
            Route("/api/runs", api_runs),
            Route("/api/runs/{name}", api_run),
            Mount("/static", StaticFiles(directory=str(assets / "static")), name="static"),
        ],
        middleware=middleware,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error, Exception: server_error},
    )
