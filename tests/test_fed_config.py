"""The one federation config: parsed from pyproject/run_config, errors name the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from common.federation_config import ConfigError, FederationConfig, SiteIdentity
from common.site_errors import SiteRefusal
from common.site_naming import default_site_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def app_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_parse_and_cover_every_field():
    raw = app_config()
    cfg = FederationConfig.from_run_config(raw)
    # Every config field is a pyproject key (so --run-config can override it) and back.
    assert set(cfg.to_run_config()) == set(raw)
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg
    assert cfg.base == "demo" and cfg.data == "demo" and cfg.demo_sites == 0  # one synthetic hospital per SuperNode


@pytest.mark.parametrize(
    "override,key",
    [
        ({"strategy": "fedsgd"}, "strategy"),
        ({"payload-dtype": "bf16"}, "payload-dtype"),
        ({"rounds": 0}, "rounds"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"adapter": "nope"}, "adapter"),
        ({"rounds": "three"}, "rounds"),
        ({"run-name": "../escape"}, "run-name"),
        ({"run-name": "run\n"}, "run-name"),  # `$` matched before the final newline
        ({"resume": True}, "resume"),
        ({"strategy": "fedprox", "prox-mu": 0.0}, "prox-mu"),
        ({"trim-beta": 0.5}, "trim-beta"),
        ({"local_epochs_typo": 1}, "local_epochs_typo"),
        ({"seed": -1}, "seed"),  # numpy's generators refuse it: the run used to fail at data synthesis
        ({"seed": 2**32}, "seed"),  # np.random.seed refuses it
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        FederationConfig.from_run_config({**app_config(), **override})


def test_personal_accepts_a_comma_list_and_home_is_absolute(tmp_path, monkeypatch):
    cfg = FederationConfig.from_run_config({"personal": "adapters.vision, adapters.cond", "home": str(tmp_path)})
    assert cfg.personal == ("adapters.vision", "adapters.cond")
    assert cfg.runs_dir == tmp_path.resolve() / "runs"
    monkeypatch.setenv("FEDVLSM_HOME", str(tmp_path / "envhome"))
    assert FederationConfig().home_dir == (tmp_path / "envhome").resolve()


def test_site_identity_from_deployment_and_simulation_node_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDVLSM_HOME", str(tmp_path / "site-home"))
    cfg = FederationConfig(home=str(tmp_path / "server-home"))
    data = tmp_path / "hospital-a"
    data.mkdir()
    site = SiteIdentity.from_node_config({"data-path": str(data)}, cfg)
    # Unnamed, a site sends a pseudonym of its data folder (stable), never the folder's name; its own
    # folder (it stays home) is still named after the data folder.
    assert site.name == default_site_name(data, site.site_dir) and re.fullmatch(r"site-[0-9a-f]{8}", site.name)
    assert site.site_dir == (tmp_path / "site-home" / "sites" / "hospital-a").resolve()
    assert site.data_path == data.resolve() and site.site_dir.is_absolute() and site.site_dir.name == "hospital-a"
    named = SiteIdentity.from_node_config({"data-path": str(data), "site-name": "h1", "site-dir": str(tmp_path / "s")}, cfg)
    assert (named.name, named.site_dir) == ("h1", (tmp_path / "s").resolve())
    sim = SiteIdentity.from_node_config({"partition-id": 2, "num-partitions": 3}, cfg)
    assert (sim.name, sim.partition_id, sim.num_partitions) == ("site-2", 2, 3)
    # A deployed site's folders are its own (its FEDVLSM_HOME), not the server's `home`.
    assert not str(site.site_dir).startswith(str(tmp_path / "server-home"))
    # Refusals: a short reason safe to send (no path), the path only in the local detail.
    missing = tmp_path / "missing-patient-1234"
    with pytest.raises(SiteRefusal) as err:
        SiteIdentity.from_node_config({"data-path": str(missing)}, cfg)
    assert err.value.reason == "site config: data-path is not a folder"
    assert str(missing) in err.value.detail and "patient" not in err.value.reason
    with pytest.raises(SiteRefusal, match="no data-path") as err:
        SiteIdentity.from_node_config({}, cfg)
    assert "neither 'data-path'" in err.value.detail


@pytest.mark.parametrize("typo,closest", [("adaptr", "adapter"), ("local_epoch", "local-epochs"),
                                          ("round", "rounds"), ("min-site", "min-sites")])
def test_an_unknown_key_names_the_closest_known_one(typo, closest):
    with pytest.raises(ConfigError, match=f"'{typo}': unknown key; did you mean '{closest}'"):
        FederationConfig.from_run_config({typo: 1})


CONFIGS = sorted((PYPROJECT.parent / "simulations" / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_experiment_configs_are_valid_overrides(path, tiny_base):
    from common.payload import check_personal_prefixes

    overrides = tomllib.loads(path.read_text())
    assert overrides, f"{path.name} overrides nothing"
    assert set(overrides) <= set(app_config()), f"{path.name}: keys not in [tool.flwr.app.config]"
    cfg = FederationConfig.from_run_config({**app_config(), **overrides})
    check_personal_prefixes(cfg.initial_model(tiny_base).adapter_names(), cfg.personal)
    assert "fedvlsm simulate" in path.read_text()  # each file says how to run it


def test_there_are_configs_for_adapters_strategies_and_site_counts():
    stems = {p.stem for p in CONFIGS}
    assert {"strategy-fedprox", "strategy-fedadam", "strategy-fedyogi", "strategy-fedmedian",
            "strategy-fedtrimmedavg"} <= stems
    assert len([s for s in stems if s.startswith("adapter-")]) >= 4
    assert len([s for s in stems if s.startswith("sites-")]) >= 3


def test_dataclass_defaults_are_the_pyproject_defaults():
    # The demo is "flwr run ." with pyproject's values; code that builds a
    # FederationConfig() directly (CLI, notebooks) must get the same run.
    assert FederationConfig.from_run_config(app_config()) == FederationConfig()


def test_an_unknown_adapter_is_offered_only_variants_that_can_be_federated():
    with pytest.raises(ConfigError, match="'adapter': unknown variant") as err:
        FederationConfig.from_run_config({"adapter": "dense"})
    assert "dense-vl" in str(err.value) and "none" not in str(err.value)


def test_simulate_refuses_a_negative_site_count_naming_the_option(capsys):
    from common.cli import main

    assert main(["simulate", "--num-sites", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--num-sites" in err and "min-sites" not in err


def test_a_personal_prefix_typo_is_a_config_refusal(tmp_path):
    # A ConfigError, so that `fedvlsm simulate` exits 2 (configuration refused), not 1 (run failed).
    from server.server_app import run_federation

    cfg = FederationConfig(base="arch:tiny", personal=("adapters.visoin",), home=str(tmp_path), run_name="typo")
    with pytest.raises(ConfigError, match="'personal': prefix 'adapters.visoin' matches no adapter tensor"):
        run_federation(None, cfg)  # refused before the grid is used


@pytest.mark.parametrize("given", [{}, {"data": "mydata"}])
def test_a_resume_from_another_directory_partitions_the_run_s_own_data(tmp_path, monkeypatch, given):
    """A relative `data` is saved absolute: resumed from another working directory it named (and
    partitioned) that directory's 'mydata' while config.json still said 'mydata'."""
    import json

    from simulations.simulate import resume_config

    first, other = tmp_path / "first", tmp_path / "other"
    for folder in (first, other):
        (folder / "mydata").mkdir(parents=True)
    monkeypatch.chdir(first)
    cfg = FederationConfig.from_run_config({"home": str(tmp_path / "home"), "run-name": "r", "data": "mydata"})
    (cfg.runs_dir / "r").mkdir(parents=True)
    (cfg.runs_dir / "r" / "config.json").write_text(json.dumps(cfg.to_run_config()))
    monkeypatch.chdir(other)
    overrides = {"home": str(tmp_path / "home"), "run-name": "r", "resume": True, **given}
    launch = FederationConfig.from_run_config(overrides)
    if not given:  # the documented resume: the run's own data, wherever it is launched from
        assert resume_config(launch, overrides).data_dir(3) == first / "mydata"
    else:  # the same words naming other data: refused, naming the key and both folders
        with pytest.raises(ConfigError, match=rf"'data'.*{first / 'mydata'}.*{other / 'mydata'}"):
            resume_config(launch, overrides)
