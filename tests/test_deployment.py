"""A real deployment on loopback: SuperLink + 3 hospitals (`fedvlsm site start`), TLS and site authentication.

Real processes on free ports, a temporary FLWR_HOME and FEDVLSM_HOME:
- 2 rounds of `flwr run` on `arch:tiny`: run directory, final adapter, and
  every train message served by the site's warm worker (one base load);
- a SuperNode with an unregistered key is refused; one without the CA
  certificate cannot connect;
- the ServerApp killed (SIGKILL) after round 1; a resume continues from
  round 2, keeps round 1's record byte for byte, and ends with the final
  adapter of the uninterrupted run (same seed);
- a site's worker killed: `fedvlsm site start` restarts it and the site
  serves again.
Everything started here is stopped by process id in the fixture's teardown,
which then checks that none of it (nor any descendant) is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLWR = shutil.which("flwr") or str(BIN / "flwr")
SUPERLINK = shutil.which("flower-superlink") or str(BIN / "flower-superlink")
SUPERNODE = shutil.which("flower-supernode") or str(BIN / "flower-supernode")
K = 3
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.certs = tmp / "certs"
        self.home = tmp / "fedvlsm"
        self.env = {**os.environ, "FLWR_HOME": str(tmp / "flwr"), "FEDVLSM_HOME": str(self.home),
                    "PYTHONPATH": str(REPO), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.procs: list[psutil.Process] = []  # everything started, and (later) its descendants
        self.popens: dict[str, subprocess.Popen] = {}
        (tmp / "logs").mkdir()
        (tmp / "flwr").mkdir()

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.tmp / "logs" / f"{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        self.popens[name] = proc
        self.procs.append(psutil.Process(proc.pid))
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / "logs" / f"{name}.log").read_text(errors="replace")

    def remember_descendants(self) -> None:
        for p in list(self.procs):
            with contextlib.suppress(psutil.NoSuchProcess):  # gone already: nothing to remember
                self.procs += [c for c in p.children(recursive=True) if c not in self.procs]

    def start(self) -> None:
        from common.data import synthesize
        from helpers import DEPLOYED_SITE_DATA
        from server.certs import write_certs

        synthesize(self.tmp / "data", sites=K, seed=0, image_size=64, **DEPLOYED_SITE_DATA)
        write_certs(self.certs, ["127.0.0.1"], [f"hospital-{i}" for i in range(K)] + ["rogue"])
        self.spawn("superlink", [SUPERLINK, "--ssl-ca-certfile", str(self.certs / "ca.crt"),
                                 "--ssl-certfile", str(self.certs / "server.pem"),
                                 "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth",
                                 "--host", "127.0.0.1", "--port", str(self.port),
                                 "--database", str(self.tmp / "superlink.db"),
                                 "--disable-runtime-dependency-installation"])
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", timeout=1, context=ctx)
                break
            except OSError:
                assert time.monotonic() < deadline, self.log("superlink")[-3000:]
                time.sleep(0.5)
        (self.tmp / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')
        for i in range(K):  # the coordinator registers the hospitals' public keys (not the rogue's)
            out = subprocess.run([FLWR, "supernode", "register", str(self.certs / "sites" / f"hospital-{i}.pub"),
                                  "loopback"], env=self.env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
        for i in range(K):
            self.start_site(i)

    def start_site(self, i: int, name: str = "") -> subprocess.Popen:
        return self.spawn(name or f"site-{i}", [
            sys.executable, "-m", "common.cli", "site", "start", "--superlink", f"127.0.0.1:{self.port}",
            "--data", str(self.tmp / "data" / f"site-{i}"), "--site-name", f"hospital-{i}",
            "--site-dir", str(self.tmp / "sites" / f"h{i}"),
            "--root-certificates", str(self.certs / "ca.crt"),
            "--auth-key", str(self.certs / "sites" / f"hospital-{i}.key")])

    def run(self, run_config: str, wait: bool = True, name: str = "flwr-run"):
        cmd = [FLWR, "run", str(REPO), "loopback", "--stream", "--run-config",
               f"base='arch:tiny' compare=false torch-threads=1 min-sites={K} local-epochs=1 lr=0.01 "
               f"site-wait-timeout=240 {run_config}"]
        if not wait:
            return self.spawn(name, cmd)
        out = subprocess.run(cmd, env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=400)
        return out

    def stop(self) -> list[str]:
        """Stop everything (sites first, then the SuperLink); return what was still alive afterwards."""
        self.remember_descendants()
        order = [self.popens[n] for n in self.popens if n.startswith("site-")] + [
            p for n, p in self.popens.items() if not n.startswith("site-")]
        for proc in order:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in order:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.remember_descendants()
        _, alive = psutil.wait_procs([p for p in self.procs if p.is_running()], timeout=15)
        left = []
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):  # stopped already: not left over
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(p.cmdline())[:200])
                p.kill()
        return left


def started_deployment(tmp_path_factory):
    """A Deployment, started; stopped afterwards, checking that nothing it started is left."""
    dep = Deployment(tmp_path_factory.mktemp("deploy"))
    try:
        dep.start()
        yield dep
    finally:
        left = dep.stop()
        # Nothing we started survives: not the SuperLink, its SuperExec or ServerApp,
        # the sites' SuperNodes, their ClientApps, workers, nor any other descendant.
        strays = [" ".join(p.info["cmdline"] or [])[:200] for p in psutil.process_iter(["cmdline"])
                  if str(dep.tmp) in " ".join(p.info["cmdline"] or []) or f":{dep.port}" in " ".join(
                      p.info["cmdline"] or [])]
        assert not left and not strays, (left, strays)


# The `deployment` fixture (conftest.py, session scope) wraps started_deployment: this file and
# tests/test_deployment_faults.py share one deployment (its start and stop cost about 20 s).


def rounds_of(dep: Deployment, run: str) -> list[dict]:
    path = dep.home / "runs" / run / "rounds.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def adapter(dep: Deployment, run: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(dep.home / "runs" / run / "final" / "adapter" / "adapter_model.safetensors"))


def test_two_rounds_with_tls_and_site_authentication(deployment):
    dep = deployment
    out = dep.run(f"rounds=2 run-name='e2e' home='{dep.home}'")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    run_dir = dep.home / "runs" / "e2e"
    rounds = rounds_of(dep, "e2e")
    assert [r["round"] for r in rounds] == [1, 2] and all(r["status"] == "ok" for r in rounds)
    for r in rounds:
        assert sorted(r["sites"]) == [f"hospital-{i}" for i in range(K)]
        assert r["failures"] == [] and r["excluded"] == []
    # pipeline-rounds (default): round 2's train messages went out with round 1's evaluate messages,
    # before round 1's evaluate replies were in (t-sent / t-received: the server's clock).
    r1, r2 = rounds
    eval_sent = {s["val_timeline"]["t-sent"] for s in r1["sites"].values()}
    train2_sent = {s["timeline"]["t-sent"] for s in r2["sites"].values()}
    assert len(eval_sent) == len(train2_sent) == 1, (eval_sent, train2_sent)
    assert min(eval_sent) <= min(train2_sent) < min(s["val_timeline"]["t-received"] for s in r1["sites"].values())
    last = rounds[-1]["sites"].values()
    # Served by each site's warm worker: one base load, messages counted across rounds.
    assert all(s["served_by_worker"] and s["base_loads"] == 1 for s in last)
    assert all(s["process_messages"] >= 3 for s in last)
    for name in ("config.json", "status.json", "checkpoints/round-0002/adapter", "final/summary.json",
                 "final/adapter/adapter_model.safetensors", "final/adapter/adapter_config.json"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert len(adapter(dep, "e2e")) == rounds[0]["sites"]["hospital-0"]["tensors"]


def test_an_unregistered_key_and_a_client_without_the_ca_are_refused(deployment):
    dep = deployment
    common = ["--superlink", f"127.0.0.1:{dep.port}", "--max-retries", "2", "--max-wait-time", "20",
              "--node-config", f'data-path="{dep.tmp / "data" / "site-0"}"']
    rogue = dep.spawn("rogue", [SUPERNODE, *common, "--port", str(free_port()),
                                "--root-certificates", str(dep.certs / "ca.crt"),
                                "--auth-supernode-private-key", str(dep.certs / "sites" / "rogue.key")])
    no_ca = dep.spawn("no-ca", [SUPERNODE, *common, "--port", str(free_port())])
    for proc in (rogue, no_ca):
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("a SuperNode that must be refused kept running")
    assert rogue.returncode != 0 and no_ca.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in dep.log("no-ca") or "certificate verify failed" in dep.log("no-ca")
    # TLS worked for the rogue (it has the CA); the SuperLink refused to activate an unregistered key.
    rogue_log = dep.log("rogue")
    assert "Failed to activate SuperNode" in rogue_log and "certificate verify failed" not in rogue_log.lower(), (
        rogue_log[-2000:])


def _flwr_serverapp(dep: Deployment) -> psutil.Process | None:
    superlink = psutil.Process(dep.popens["superlink"].pid)
    for p in superlink.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # exited while we looked
            if any("flwr-serverapp" in c for c in p.cmdline()):
                return p
    return None


def test_a_server_app_killed_mid_run_resumes_to_the_uninterrupted_result(deployment):
    dep = deployment
    if not (dep.home / "runs" / "e2e" / "final").exists():
        pytest.skip("needs the uninterrupted run of test_two_rounds_with_tls_and_site_authentication")
    dep.run(f"rounds=2 run-name='crash' home='{dep.home}'", wait=False, name="crash-run")
    deadline = time.monotonic() + 240
    while len(rounds_of(dep, "crash")) < 1:
        assert time.monotonic() < deadline, dep.log("crash-run")[-3000:]
        time.sleep(0.3)
    app = _flwr_serverapp(dep)
    assert app is not None, "no flwr-serverapp process found"
    app.kill()  # mid-run: round 2 is under way or about to be
    first = (dep.home / "runs" / "crash" / "rounds.jsonl").read_bytes()
    dep.popens["crash-run"].terminate()
    time.sleep(2)
    assert not (dep.home / "runs" / "crash" / "final").exists()
    # README's resume command (`home` aside): no `rounds`, which stays as saved (Flower fills every key the
    # launch does not give with pyproject's default, and the resume took rounds = 10 from it)
    out = dep.run(f"run-name='crash' resume=true home='{dep.home}'")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rounds = rounds_of(dep, "crash")
    assert [r["round"] for r in rounds] == [1, 2]
    assert (dep.home / "runs" / "crash" / "rounds.jsonl").read_bytes().startswith(first)
    a, b = adapter(dep, "e2e"), adapter(dep, "crash")
    assert a.keys() == b.keys()
    diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    print(f"resumed vs uninterrupted final adapter: max abs difference {diff:g}")
    assert diff <= 1e-6


def test_a_killed_worker_is_restarted_by_site_start(deployment):
    dep = deployment
    launcher = psutil.Process(dep.popens["site-2"].pid)
    workers = [c for c in launcher.children() if "client.worker" in " ".join(c.cmdline())]
    assert len(workers) == 1
    old = workers[0]
    dep.procs.append(old)
    old.kill()
    deadline = time.monotonic() + 120
    while "restarting it (1/3)" not in dep.log("site-2") or "worker pid" not in dep.log("site-2").split(
            "restarting it (1/3)")[-1]:
        assert time.monotonic() < deadline, dep.log("site-2")[-2000:]
        time.sleep(0.5)
    new = [c for c in launcher.children() if "client.worker" in " ".join(c.cmdline())]
    assert len(new) == 1 and new[0].pid != old.pid
    dep.procs.append(new[0])
    assert dep.popens["site-2"].poll() is None
