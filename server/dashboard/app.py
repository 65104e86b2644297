"""The dashboard's ASGI app (Starlette): a thin, read-only layer over the run stores.

Routes (all GET; every route needs the token when one is set):

    /                               the runs list
    /runs/<name>                    a run's page
    /runs/<name>/download/<what>.zip   `final` or `round-NNNN` (a checkpoint), zipped
    /api/runs                       every run: name, status, rounds done, last Dice, start time
    /api/runs/<name>                one run: run row (config, status, ...) and rounds with per-site rows
    /static/...                     scripts, styles, the vendored Chart.js and its licence

The pages fetch the API every 2 s and redraw when something changed. Nothing
here writes to a run, except that a run folder from before the run store
gets its `run.sqlite` imported from `rounds.jsonl` on first view.
"""

from __future__ import annotations

import hmac
import os
import re
import sys
import tempfile
import zipfile
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
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
ROUND_RE = re.compile(r"^round-\d{4,}$")
NO_STORE = {"Cache-Control": "no-store"}


class RunNotFound(LookupError):
    """No run of that name in the runs folder (HTTP 404)."""


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and any(
        (path / f).is_file() for f in (DB_FILE, "config.json", "rounds.jsonl"))


def run_dir_of(runs_dir: Path, name: str) -> Path:
    """The folder of run `name`, refusing anything that is not a plain child of the runs folder."""
    if not NAME_RE.match(name) or name in (".", ".."):
        raise RunNotFound(f"no run named {name!r}")
    path = runs_dir / name
    if not is_run_dir(path):
        raise RunNotFound(f"no run named {name!r} in {runs_dir}")
    return path


def unreadable(err: Exception) -> str:
    """Why a run cannot be read: a RunStoreError says it (naming the file); anything else is named by its type."""
    return str(err) if isinstance(err, RunStoreError) else f"{type(err).__name__}: {err}"


def list_runs(runs_dir: Path) -> dict[str, Any]:
    runs = []
    if runs_dir.is_dir():
        for path in sorted(runs_dir.iterdir()):
            if not is_run_dir(path) or not NAME_RE.match(path.name):
                continue
            try:
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
            if ROUND_RE.match(p.name) and (p / "state.json").is_file():
                out.append({"name": p.name, "label": f"checkpoint {p.name}"})
    return out


def read_run(runs_dir: Path, name: str) -> dict[str, Any]:
    run_dir = run_dir_of(runs_dir, name)
    data = ensure_store(run_dir).read()
    return {"name": name, **data, "downloads": downloads(run_dir)}


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


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


def create_app(runs_dir: Path, token: str | None = None) -> Starlette:
    """The dashboard for every run under `runs_dir`; `token`: required on every route when set."""
    runs_dir = Path(runs_dir).expanduser().resolve()
    assets = assets_dir()
    templates = Jinja2Templates(directory=str(assets / "templates"))

    def page(request: Request, template: str, status: int = 200, **context) -> Response:
        return templates.TemplateResponse(request, template, {"runs_dir": str(runs_dir), **context},
                                          status_code=status, headers=NO_STORE)

    def error_page(request: Request, status: int, message: str) -> Response:
        return page(request, "error.html", status=status, status_code=status, message=message)

    async def runs_page(request: Request) -> Response:
        return page(request, "runs.html")

    async def run_page(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            run_dir = run_dir_of(runs_dir, name)
            ensure_store(run_dir).summary()
        except RunNotFound as err:
            return error_page(request, 404, str(err))
        except Exception as err:  # noqa: BLE001 - this run's own problem, said as such (the list shows the others)
            return error_page(request, 500, f"run '{name}' cannot be shown: {unreadable(err)}")
        return page(request, "run.html", name=name)

    async def api_runs(request: Request) -> Response:
        return JSONResponse(list_runs(runs_dir), headers=NO_STORE)

    async def api_run(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            return JSONResponse(read_run(runs_dir, name), headers=NO_STORE)
        except RunNotFound as err:
            return JSONResponse({"error": str(err)}, status_code=404, headers=NO_STORE)
        except Exception as err:  # noqa: BLE001 - this run's own problem, said as such (the list shows the others)
            return JSONResponse({"error": f"run '{name}' cannot be read: {unreadable(err)}"}, status_code=500,
                                headers=NO_STORE)

    async def download(request: Request) -> Response:
        name, what = request.path_params["name"], request.path_params["what"]
        try:
            run_dir = run_dir_of(runs_dir, name)
        except RunNotFound as err:
            return PlainTextResponse(str(err), status_code=404)
        if what == "final":
            folder = run_dir / "final"
        elif ROUND_RE.match(what):
            folder = run_dir / "checkpoints" / what
        else:
            return PlainTextResponse(f"nothing to download named {what!r}", status_code=404)
        if not folder.is_dir():
            return PlainTextResponse(f"run '{name}' has no {what}", status_code=404)
        fd, tmp = tempfile.mkstemp(prefix="fedvlsm-dashboard-", suffix=".zip")
        os.close(fd)
        # Stored, not deflated: safetensors hardly compress.
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for f in sorted(folder.rglob("*")):
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts):
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
        if _is_api(request):
            return JSONResponse({"error": message}, status_code=500)
        return PlainTextResponse(message, status_code=500)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        message = f"the dashboard is read-only (GET only): {request.method} {request.url.path} is not allowed"
        headers = getattr(exc, "headers", None)  # Starlette's `Allow`
        if _is_api(request):
            return JSONResponse({"error": message}, status_code=405, headers=headers)
        return PlainTextResponse(message, status_code=405, headers=headers)

    middleware = [Middleware(TokenMiddleware, token=token)] if token else []
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
