"""Every user-facing option and run-config value is checked up front: one line naming the option or
key (exit 2 for the CLI), never a traceback from torch, numpy, Ray or Flower, never nonsense accepted.

Each case here was seen failing before its check: the command, and what it did, in the comment."""

from __future__ import annotations

import math

import pytest

from common.cli import build_parser, main
from common.config import TrainConfig, TrainConfigError, resolve_device
from common.federation_config import ConfigError, FederationConfig


def _must_not_start(*args, **kwargs):
    raise AssertionError("started what the check should have refused")


# ---- TrainConfig: the one check of local training's values (CLI train/eval and every site) ----

@pytest.mark.parametrize("field, value, why", [
    # `fedvlsm train ... --lr 1e38`: a traceback inside AdamW (step size overflows float32);
    # --lr 10 trained "successfully" to nothing.
    ("lr", 1e38, "at most 1"), ("lr", 10.0, "at most 1"),
    # --lr 1e-320: AdamW's step was lost in float32 rounding; "trained" without changing a weight.
    ("lr", 1e-320, "at least 1e-10"), ("lr", 1e-11, "at least 1e-10"),
    # --batch-size 1e20: "Stop argument for islice() must be ..." (no option named).
    ("batch_size", 10**20, "at most"),
    # --seed -1 / 1e20: numpy's "Seed must be between 0 and 2**32 - 1" / "Overflow when unpacking long long".
    ("seed", -1, r"in \[0, 4294967295\]"), ("seed", 2**32, r"in \[0, 4294967295\]"),
    # --eval-prompt-index -1: "prompt_index must be >= 0 or None" from the dataset, no option named.
    ("eval_prompt_index", -1, ">= 0"),
    # --device foo / '' / meta: RuntimeError tracebacks from torch.device or autocast.
    ("device", "foo", "auto, cpu, cuda, cuda:N or mps"), ("device", "", "auto, cpu"), ("device", "meta", "auto, cpu"),
    # grad_clip 0: clip_grad_norm_ scaled every gradient to zero; the adapter never trained, without a word.
    ("grad_clip", 0.0, "must be > 0"),
])
def test_train_config_refuses(field, value, why):
    with pytest.raises(TrainConfigError, match=why) as err:
        TrainConfig(**{field: value})
    assert err.value.field == field and str(err.value).startswith(f"TrainConfig.{field} ")


def test_train_config_accepts_the_edges():
    cfg = TrainConfig(lr=1.0, seed=2**32 - 1, eval_prompt_index=0, device="cuda:3")  # cuda:3: checked where it runs
    assert (cfg.lr, cfg.seed, cfg.eval_prompt_index, cfg.device) == (1.0, 2**32 - 1, 0, "cuda:3")
    assert TrainConfig(lr=1e-10).lr == 1e-10


def test_a_device_this_machine_lacks_is_a_value_error_not_a_torch_traceback():
    import torch

    with pytest.raises(ValueError, match="must be auto, cpu"):
        resolve_device("foo")
    if not torch.backends.mps.is_available():  # `--device mps` here: "PyTorch is not linked with support for mps"
        with pytest.raises(ValueError, match="'mps' asked for, but Apple's MPS is not available"):
            resolve_device("mps")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:99' asked for, but this machine has"):
            resolve_device("cuda:99")


# ---- the CLI: exit 2 and the option's name ----

@pytest.mark.parametrize("argv, said", [
    (["train", "nodata", "--out", "o", "--lr", "1e38"], "fedvlsm train: error: --lr: must be > 0 and at most 1"),
    (["train", "nodata", "--out", "o", "--lr", "1e-320"], "fedvlsm train: error: --lr: must be at least 1e-10"),
    (["train", "nodata", "--out", "o", "--seed", "-1"], "fedvlsm train: error: --seed: must be in"),
    (["train", "nodata", "--out", "o", "--patience", "0"], "fedvlsm train: error: --patience: must be >= 1"),
    (["eval", "nodata", "--adapter-dir", "a", "--eval-prompt-index", "-2"], "fedvlsm eval: error: --eval-prompt-index"),
    (["eval", "nodata", "--adapter-dir", "a", "--batch-size", str(10**20)], "fedvlsm eval: error: --batch-size"),
])
def test_cli_names_the_option_and_exits_2(argv, said, capsys):
    assert main(argv) == 2
    assert said in capsys.readouterr().err


def test_cli_refuses_a_cache_dir_that_is_a_file(tmp_path, capsys):
    # `--cache-dir afile`: "[Errno 17] File exists: 'afile'", after loading the base and the data.
    (tmp_path / "f").write_text("x")
    assert main(["train", str(tmp_path / "nodata"), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "f")]) == 2
    assert "--cache-dir" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "d", "--out", "o", "--device", "foo"], ["eval", "d", "--adapter-dir", "a", "--device", ""],
    ["predict", "--adapter-dir", "a", "--image", "i.png", "--prompt", "p", "--out", "o", "--device", "meta"],
    # `fedvlsm dashboard --port -1` / `70000`: OverflowError traceback from socket.bind (exit 1).
    ["dashboard", "--port", "-1"], ["dashboard", "--port", "70000"],
    ["site", "start", "--superlink", "h:1", "--data", "d", "--insecure", "--port", "70000"],
    ["site", "start", "--superlink", "h:1", "--data", "d", "--insecure", "--device", "foo"],
])
def test_argparse_refuses_devices_and_ports(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert f"argument {'--port' if '--port' in argv else '--device'}:" in capsys.readouterr().err


def test_dashboard_refuses_a_runs_path_that_is_a_file(tmp_path, capsys, monkeypatch):
    # `fedvlsm dashboard --runs afile` served an empty dashboard of a file.
    import server.dashboard

    monkeypatch.setattr(server.dashboard, "serve", _must_not_start)
    (tmp_path / "f").write_text("x")
    assert main(["dashboard", "--runs", str(tmp_path / "f"), "--port", "0"]) == 2
    assert "--runs" in capsys.readouterr().err


# ---- site start: said before the worker and the SuperNode start ----

@pytest.mark.parametrize("extra, said", [
    # each of these started the worker and a SuperNode: exit 1 from flower-supernode, or accepted.
    (["--superlink", "host:notaport"], "--superlink: expected HOST:PORT"),
    (["--superlink", ":"], "--superlink: expected HOST:PORT"),
    (["--site-name", "a b/c"], "--site-name"),  # made nested folders a b/c under sites/
    (["--worker-restarts", "-1"], "--worker-restarts: must be >= 0"),
    (["--rejoin-wait", "nan"], "--rejoin-wait"), (["--rejoin-wait", "-1"], "--rejoin-wait"),
])
def test_site_start_refuses(tmp_path, extra, said):
    from client.launcher import _check_args

    argv = ["site", "start", "--data", str(tmp_path), "--insecure"]
    argv += extra if "--superlink" in extra else ["--superlink", "127.0.0.1:9092", *extra]
    assert said in (_check_args(build_parser().parse_args(argv)) or "")


def test_site_start_refuses_a_site_dir_that_is_a_file(tmp_path):
    from client.launcher import _check_args

    (tmp_path / "f").write_text("x")
    args = build_parser().parse_args(["site", "start", "--superlink", "127.0.0.1:9092", "--data", str(tmp_path),
                                      "--insecure", "--site-dir", str(tmp_path / "f")])
    assert "--site-dir" in (_check_args(args) or "")


# ---- simulate's own options ----

@pytest.mark.parametrize("option, value", [
    # each crashed Flower's simulation runtime ("ActorPool is empty", tracebacks, exit 1), -1 hung.
    ("--cpus-per-site", "0"), ("--cpus-per-site", "-1"), ("--cpus-per-site", "nan"), ("--cpus-per-site", "1e9"),
    ("--gpus-per-site", "-1"), ("--gpus-per-site", "nan"), ("--gpus-per-site", "1e38"),
])
def test_simulate_refuses_site_resources_ray_cannot_give(option, value, capsys, monkeypatch, tmp_path):
    import simulations.simulate

    monkeypatch.setenv("FEDVLSM_HOME", str(tmp_path))
    monkeypatch.setattr(simulations.simulate, "simulate", _must_not_start)
    assert main(["simulate", option, value]) == 2
    assert f"fedvlsm simulate: {option}:" in capsys.readouterr().err



@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    from common.data import synthesize

    root = tmp_path_factory.mktemp("two-sites")
    synthesize(root, sites=2, per_site=6, seed=0, image_size=32)
    return root


@pytest.mark.parametrize("argv, said", [
    # Flower registered nodes for ever (14,173 after 60 s) before any site could say anything.
    (["--num-sites", "100000"], "--num-sites: at most 10000 simulated sites"),
    (["--run-config", "demo-sites=20000"], "'demo-sites': must be at most 10000"),
    # Ray started, then every site failed round 1 with the partition's error.
    (["--num-sites", "5", "--run-config", "data='{data}' partition='iid'"], "--num-sites 5: split 'val' has too few"),
    (["--num-sites", "3", "--run-config", "data='{data}' partition='natural'"], "has 2 site folder(s), one site each; leave --num-sites out"),
])
def test_simulate_refuses_a_site_count_before_ray_starts(argv, said, two_sites, capsys, monkeypatch, tmp_path):
    import simulations.simulate

    monkeypatch.setenv("FEDVLSM_HOME", str(tmp_path))
    monkeypatch.setattr(simulations.simulate, "simulate", _must_not_start)
    assert main(["simulate", *(a.format(data=two_sites) for a in argv)]) == 2
    assert said in capsys.readouterr().err


# ---- the federation's run config ----

@pytest.mark.parametrize("key, value, why", [
    ("lr", 1e38, r"must be in \[0, 1\]"),  # every site failed in AdamW, round after round
    ("batch-size", 10**20, "at most"),  # every site: islice's error
    ("torch-threads", 10**8, "at most 1024"),  # libgomp could not create the threads: a segfault
    ("demo-image-size", 1, r"in \[32, 512\]"), ("demo-image-size", 10**6, r"in \[32, 512\]"),  # failed after Ray
    ("demo-images", 2, ">= 3"),  # started: "ValueError: per_site must be >= 3", no key named
    ("base", "", "must not be empty"), ("data", "  ", "must not be empty"),  # data '' partitioned the cwd
])
def test_run_config_refuses(key, value, why):
    with pytest.raises(ConfigError, match=f"run config '{key}': .*{why}"):
        FederationConfig.from_run_config({key: value})


def test_run_config_accepts_the_edges():
    for values in ({"lr": 0.0}, {"lr": 1.0}, {"torch-threads": 1024}, {"demo-image-size": 32, "demo-images": 3},
                   {"rounds": 100_000}):
        FederationConfig.from_run_config(values)
    assert math.isfinite(FederationConfig().lr)


# ---- bounds on values no run can use (common/federation_config.py says why each bound is where it is) ----

@pytest.mark.parametrize("key, bad, inside, context", [
    # each `bad` was accepted before; what it did, measured with the quick demo (arch:tiny, 3 sites):
    ("rounds", 10**12, 1_000_000, {}),  # ran "round 1/1000000000000": a run that could never end
    ("local-epochs", 10**12, 10_000, {}),  # no site could ever finish a round
    ("finetune-epochs", 10**12, 10_000, {}),
    ("demo-images", 10**12, 100_000, {}),  # written before the run starts, 32 kB each: the disk fills
    ("lr", 1e-320, 1e-10, {}),  # every site trained without changing a weight
    ("prox-mu", 1e38, 1e6, {"strategy": "fedprox"}),  # float32 loss overflow: every reply excluded, "finished"
    ("server-lr", 1e38, 10.0, {"strategy": "fedadam"}),  # round 1 failed: "overflows fp16"
    ("server-lr", 1e-320, 1e-10, {"strategy": "fedadam"}),  # the global adapter never moved
    ("server-tau", 1e-320, 1e-30, {"strategy": "fedadam"}),  # 0/0 in float32: NaN global, run failed
    ("server-tau", 1e38, 1e3, {"strategy": "fedadam"}),  # the global adapter never moved
    ("dp-delta", 1e-320, 1e-30, {"dp": "sample"}),  # PRV: NaN at every site; RDP: an epsilon for a denormal
    ("dp-delta", 1e-320, 1e-30, {"dp": "client"}),
    ("dp-delta", 1e-12, 1e-10, {"dp": "sample", "dp-accountant": "prv"}),  # "Floating point errors will dominate"
    ("dp-noise-multiplier", 1e-320, 1e-9, {"dp": "sample"}),  # ZeroDivisionError in Opacus' RDP, every site
    ("dp-noise-multiplier", 1e38, 1e4, {"dp": "client"}),  # the noised global "overflows fp16": run failed
    ("dp-max-grad-norm", 1e-320, 1e-6, {"dp": "sample"}),  # 0 in float32: nothing trained
    ("dp-max-grad-norm", 1e38, 1e4, {"dp": "sample"}),  # every site's update overflowed fp16
    ("dp-clip-norm", 1e-320, 1e-6, {"dp": "client"}),  # nothing trained, the Dice never moved
    ("dp-clip-norm", 1e38, 1e4, {"dp": "client"}),  # run failed: "overflows fp16"
    ("dp-target-epsilon", 1e15, 1e4, {"dp": "sample"}),  # Opacus' calibration of z never returned
])
def test_run_config_bounds_refuse_unusable_values_and_keep_the_edge(key, bad, inside, context):
    with pytest.raises(ConfigError, match=f"^run config '{key}'") as err:
        FederationConfig.from_run_config({**context, key: bad})
    assert f"got {bad}" in str(err.value)
    cfg = FederationConfig.from_run_config({**context, key: inside})
    assert getattr(cfg, key.replace("-", "_")) == inside


@pytest.mark.parametrize("run_config, said", [
    ("rounds=1000000000000", "fedvlsm simulate: run config 'rounds': must be at most 1000000, got 1000000000000"),
    ("strategy='fedadam' server-lr=1e38", "run config 'server-lr': must be in [1e-10, 10], got 1e+38"),
    ("dp='sample' dp-delta=1e-320", "run config 'dp-delta': must be in [1e-30, 1), got 1e-320"),
])
def test_simulate_refuses_them_before_anything_starts(run_config, said, capsys, monkeypatch, tmp_path):
    import simulations.simulate

    monkeypatch.setenv("FEDVLSM_HOME", str(tmp_path))
    monkeypatch.setattr(simulations.simulate, "simulate", _must_not_start)
    assert main(["simulate", "--run-config", run_config]) == 2
    assert said in capsys.readouterr().err


def test_a_lora_rank_above_the_projection_width_is_refused(tiny_base):
    # `fedvlsm train --adapter lora --lora-rank 100000000` hung; `params` counted 147 M trainable on arch:tiny
    # (a rank just above the width here: 10**8 took 20 GB before the check).
    from common.adapters import AdapterSpec
    from common.model import build_model

    config = tiny_base.model.config
    width = min(config.vision_config.hidden_size, config.text_config.hidden_size)
    with pytest.raises(ValueError, match=f"lora_rank must be at most {width}"):
        build_model(tiny_base, AdapterSpec("lora", lora_rank=width + 1))


# ---- empty file and folder arguments ----

@pytest.mark.parametrize("argv, named", [
    (["data", "synth", ""], "argument out"),  # wrote site-0/, site-1/, ... into the current folder
    (["data", "check", " "], "argument path"),  # checked the current folder
    (["train", "", "--out", "o"], "argument data"),
    (["train", "d", "--out", ""], "argument --out"),  # the adapter and log went into the current folder
    (["train", "d", "--out", "o", "--cache-dir", ""], "argument --cache-dir"),
    (["eval", "d", "--adapter-dir", ""], "argument --adapter-dir"),
    (["eval", "d", "--adapter-dir", "a", "--out", ""], "argument --out"),  # the report asked for, silently not written
    (["predict", "--adapter-dir", "a", "--image", "", "--prompt", "p", "--out", "o"], "argument --image"),
    (["predict", "--adapter-dir", "a", "--image", "i", "--prompt", "p", "--out", ""], "argument --out"),
    (["deploy", "certs", "", "--server-name", "h"], "argument out"),
    (["site", "start", "--superlink", "h:1", "--data", ""], "argument --data"),
])
def test_an_empty_path_is_refused_naming_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert f"{named}: empty: give a file or folder" in capsys.readouterr().err


def test_fedvlsm_data_synth_with_an_empty_folder_writes_nothing(tmp_path):
    import subprocess

    from test_fed_simulate import FEDVLSM, env_for

    done = subprocess.run([FEDVLSM, "data", "synth", "", "--sites", "2", "--per-site", "6"], cwd=tmp_path,
                          env=env_for(tmp_path / "home"), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "argument out: empty" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written where it ran (nor its home)


def test_site_start_without_a_site_name_sends_no_data_folder_name(tmp_path, monkeypatch):
    # The default name was the data folder's (`--data /data/st-marys-oncology`: the server's records
    # named the hospital); the site's own folder may still be named after it, it stays home.
    from client.launcher import Site
    from common.cli import build_parser
    from common.site_naming import default_site_name

    monkeypatch.setenv("FEDVLSM_HOME", str(tmp_path / "home"))
    data = tmp_path / "st-marys-oncology"
    data.mkdir()
    args = build_parser().parse_args(["site", "start", "--superlink", "x:9092", "--data", str(data), "--insecure"])
    site = Site(args)
    assert site.node_config["site-name"] == site.name == default_site_name(data, site.site_dir)
    assert "st-marys" not in site.name
    assert site.site_dir == (tmp_path / "home" / "sites" / "st-marys-oncology").resolve()
    named = Site(build_parser().parse_args(["site", "start", "--superlink", "x:9092", "--data", str(data),
                                            "--site-name", "hospital-a", "--insecure"]))
    assert (named.name, named.site_dir.name) == ("hospital-a", "hospital-a")
