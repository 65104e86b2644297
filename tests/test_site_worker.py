"""The warm site worker (client/worker.py) behind the thin ClientApp (client/client_app.py).

A real worker process on a Unix socket; the ServerApp's round loop talks to
it through the real ClientApp object (forwarding branch) via
fed_harness.InProcessGrid, which round-trips every message through Flower's
protobuf serde. The worker process is stopped by pid whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from common.data import synthesize
from common.federation_config import FederationConfig
from fed_harness import InProcessGrid
from server.server_app import run_federation
from helpers import DEPLOYED_SITE_DATA

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def test_the_client_app_module_imports_nothing_heavy():
    code = ("import sys, client.client_app, client.forwarder, client.worker_protocol; "
            "print(sorted(m for m in ('torch', 'transformers', 'monai', 'client.handlers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_light_modules_use_the_same_names_as_the_heavy_ones():
    from client import worker_protocol as wp
    from common.federation_config import NODE_SITE_NAME
    from common.payload import Action, Rec

    assert (wp.REC_STATUS, wp.REC_SITE) == (Rec.STATUS, Rec.SITE)
    assert NODE_SITE_NAME == "site-name"
    from client.handlers import HANDLERS

    assert set(HANDLERS) == {"train", "evaluate", f"evaluate.{Action.FINAL}", f"train.{Action.LOCAL_ONLY}"}
    from client.client_app import app

    assert set(app._registered_funcs) == {"train.default", "evaluate.default", f"evaluate.{Action.FINAL}",
                                          f"train.{Action.LOCAL_ONLY}"}


def start_worker(socket: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    ready = socket.with_suffix(".ready")
    proc = subprocess.Popen([sys.executable, "-m", "client.worker", "--socket", str(socket), "--ready-file",
                             str(ready)], cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker did not start: " + log.read_text()[-2000:])
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("w")
    socket = tmp / "worker.sock"
    proc = start_worker(socket, tmp / "worker.log")
    try:
        yield f"unix:{socket}", proc, tmp
    finally:
        stop(proc)
    assert not socket.exists()  # removed on a clean stop


def rounds_of(home: Path, run: str) -> list[dict]:
    return [json.loads(x) for x in (home / "runs" / run / "rounds.jsonl").read_text().splitlines()]


def test_the_worker_serves_rounds_and_runs_warm(worker, tmp_path):
    address, proc, _ = worker
    assert oct(os.stat(address.removeprefix("unix:")).st_mode & 0o777) == "0o600"
    data = tmp_path / "data"
    synthesize(data, sites=2, seed=0, image_size=64, **DEPLOYED_SITE_DATA)
    node_configs = [{"data-path": str(data / f"site-{k}"), "site-name": f"h{k}", "site-dir": str(tmp_path / f"s{k}"),
                     "worker": address} for k in range(2)]
    home = tmp_path / "server"
    cfg = FederationConfig(base="arch:tiny", adapter="shallow-vlc", home=str(home), rounds=2, compare=False,
                           lr=0.01, run_name="warm")
    run_federation(InProcessGrid(cfg, 2, node_configs=node_configs), cfg)
    rounds = rounds_of(home, "warm")
    assert [r["status"] for r in rounds] == ["ok", "ok"]
    last = rounds[-1]["sites"]
    # Both sites are served by one warm process: one base load in all, messages keep counting.
    assert {s["base_loads"] for s in last.values()} == {1}
    # round 1: 2 train + 2 evaluate; round 2: the two train messages are the 5th and 6th
    assert sorted(s["process_messages"] for s in last.values()) == [5, 6]
    # A new run with another adapter: no base reload.
    cfg2 = cfg.replace(adapter="dense-vl", run_name="warm-2", rounds=1)
    run_federation(InProcessGrid(cfg2, 2, node_configs=node_configs), cfg2)
    assert {s["base_loads"] for s in rounds_of(home, "warm-2")[0]["sites"].values()} == {1}
    assert proc.poll() is None


def _message(run_config: str | None, message_type: str = "train") -> Message:
    conf = ConfigRecord({"server-round": 1, "run-name": "x"})
    if run_config is not None:
        conf["fedvlsm-run-config"] = run_config
    msg = Message(RecordDict({"config": conf}), dst_node_id=7, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def test_the_worker_survives_bad_messages_and_says_why(worker, tmp_path):
    address, proc, _ = worker
    from client.client_app import app

    data = tmp_path / "data"
    synthesize(data, sites=1, seed=0, image_size=64, **DEPLOYED_SITE_DATA)
    node = {"data-path": str(data / "site-0"), "site-name": "h0", "site-dir": str(tmp_path / "s0"), "worker": address}
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})

    from client.forwarder import forward

    def reason(msg: Message) -> str:
        reply = forward(address, msg, ctx)  # what the ClientApp does (the worker also gets types it lacks)
        return str(reply.content.config_records["status"]["error"])

    good = FederationConfig(base="arch:tiny", rounds=1, home=str(tmp_path / "h")).to_json()
    assert reason(_message(None)).startswith("protocol: the message carries no run config")
    cfg = json.loads(good)
    assert reason(_message(json.dumps({**cfg, "adapter": "hyper-adapter"}))).startswith(
        "run config: this site cannot serve it (run config 'adapter': unknown variant 'hyper-adapter'")
    assert reason(_message(json.dumps({**cfg, "base": str(tmp_path / "no-such-base")}))) == (
        "base: cannot load the run's base here (BaseLoadError)")
    assert reason(_message(good, "query")).startswith("protocol: unknown message type")
    # ...and after all that, a good message is served by the same process.
    reply = app(_message(good), ctx)
    assert "status" not in reply.content.config_records, reply.content.config_records
    metrics = reply.content.metric_records["metrics"]
    assert metrics["served-by-worker"] == 1.0 and metrics["num-examples"] > 0
    assert proc.poll() is None
    # The per-run state the handler changed came back to the SuperNode's context.
    assert ctx.state.config_records["site-history"]["rounds-trained"] == 1


def test_a_missing_worker_gives_an_error_reply_not_an_exception(tmp_path, monkeypatch):
    from client import forwarder
    from client.client_app import app

    monkeypatch.setattr(forwarder, "CONNECT_TIMEOUT_S", 0.5)
    node = {"data-path": str(tmp_path), "site-name": "h9", "worker": f"unix:{tmp_path}/nobody.sock"}
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    reply = app(_message("{}"), ctx)
    assert reply.content.config_records["status"]["error"] == (
        "worker: the site worker is not running (no answer on its socket)")
    assert reply.content.config_records["site"]["name"] == "h9"


def test_the_worker_refuses_what_is_not_its_protocol_and_keeps_serving(worker):
    import socket as so

    from client import worker_protocol as wp
    from client.worker import worker_alive

    address, proc, _ = worker
    before = worker_alive(address)
    path = wp.socket_path(address)
    # Bytes that are not a frame at all: the worker drops the connection without an answer.
    with so.socket(so.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 32)
        s.settimeout(10)
        try:
            answer = s.recv(1)
        except ConnectionResetError:  # closed with our unread bytes still queued: a reset, not an answer
            answer = b""
        assert answer == b""
    # A frame of an unknown kind, and a HANDLE whose payload is no message: refused with a short reason.
    assert wp.call(address, b"Z", b"", connect_timeout=5, timeout=10) == (wp.REFUSED, bytearray(b"unknown request kind"))
    status, reason = wp.call(address, wp.HANDLE, b"\x00" * 3, connect_timeout=5, timeout=10)
    assert status == wp.REFUSED and bytes(reason).startswith(b"cannot decode the message ("), reason
    # A peer that stops mid-frame (announces 1 MB, sends 3 bytes): the worker is not stuck on it.
    with so.socket(so.AF_UNIX) as s:
        s.connect(path)
        s.sendall(wp._HEADER.pack(wp.MAGIC, wp.HANDLE, 1 << 20) + b"abc")
    after = worker_alive(address)
    assert after is not None and after["pid"] == before["pid"] == proc.pid
    assert after["messages"] == before["messages"]  # none of that reached a handler
    assert proc.poll() is None


def test_a_stalled_worker_keeps_its_socket_against_a_second_worker(tmp_path):
    # A worker that did not answer within 1 s (stopped, swapping) lost its socket to a second one on the
    # same path, and deleted the second one's socket when it stopped: a running worker nobody could reach.
    import signal

    from client.worker import worker_alive

    socket = tmp_path / "worker.sock"
    first = start_worker(socket, tmp_path / "first.log")
    try:
        first.send_signal(signal.SIGSTOP)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        second = subprocess.run([sys.executable, "-m", "client.worker", "--socket", str(socket)], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=120)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another worker already serves {socket}" in second.stderr
        assert worker_alive(f"unix:{socket}", timeout=10)["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGCONT)
        stop(first)
    assert not socket.exists()


def test_a_file_at_the_socket_path_is_never_deleted(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "client.worker", "--socket", str(notes)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{notes} exists and is not a socket; not deleting it" in proc.stderr
    assert notes.read_text() == "precious"
