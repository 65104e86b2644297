"""The demo's synthetic hospitals, made once per settings and shared by every process.

Simulation only: a simulated site (and the pooled bound of `fedvlsm simulate`)
calls this for the folder it partitions. Made aside and renamed into place,
so concurrent sites of one simulation or an interrupted run never see half
a dataset (the first finisher's identical copy is kept).
"""

from __future__ import annotations

from pathlib import Path

from common.atomic import atomic_dir
from common.data import synthesize
from common.federation_config import ConfigError, FederationConfig


def prepare_data(cfg: FederationConfig, num_nodes: int) -> Path:
    """The folder a simulation of `num_nodes` SuperNodes partitions; synthesised if it is the demo."""
    if cfg.data != "demo":
        folder = cfg.data_dir(num_nodes)
        if not folder.is_dir():
            raise ConfigError(f"run config 'data': {folder} is not a folder")
        return folder
    out = cfg.demo_data_dir(num_nodes)
    if (out / "sites.json").is_file():
        return out
    with atomic_dir(out, replace=False) as tmp:
        synthesize(tmp, sites=cfg.demo_site_count(num_nodes), per_site=cfg.demo_images, seed=cfg.seed,
                   image_size=cfg.demo_image_size)
    return out
