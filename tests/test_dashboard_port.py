"""`dashboard-port`: the URL the server prints opens the run's page."""

from __future__ import annotations

import re
import socket

import httpx

from common.federation_config import FederationConfig
from server import server_app
from server.run_records import RunRecords


def test_the_printed_dashboard_url_opens_the_runs_page(tmp_path, monkeypatch):
    # It printed http://127.0.0.1:PORT//runs/NAME (the base URL ends with '/'), which is a 404.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = FederationConfig.from_run_config({"home": str(tmp_path), "run-name": "watched", "dashboard-port": port})
    RunRecords.create(cfg.runs_dir, "watched", cfg.to_run_config())
    said: list[str] = []
    monkeypatch.setattr(server_app, "say", said.append)
    server_app.start_dashboard(cfg)
    (url,) = [m.group(1) for line in said if (m := re.match(r"dashboard: (\S+)$", line))]
    assert url == f"http://127.0.0.1:{port}/runs/watched"
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200 and "watched" in response.text
