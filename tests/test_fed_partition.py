"""Simulated sites: natural, IID, quantity skew and Dirichlet style mix."""

from __future__ import annotations

import pytest

from common.data import synthesize
from simulations.partition import PartitionError, partition, site_items


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    synthesize(root, sites=3, per_site=30, seed=0, image_size=32)
    return root


def ids(items):
    return [str(i.image) for i in items]


def test_natural_sites_are_the_folders_and_the_count_must_match(data):
    parts = partition(data, "natural", 3)
    for k, part in enumerate(parts):
        assert all(f"site-{k}/" in str(i.image) for split in part.values() for i in split)
    with pytest.raises(PartitionError, match="num-supernodes=3"):
        partition(data, "natural", 2)


@pytest.mark.parametrize("scheme", ["iid", "quantity-skew", "dirichlet"])
@pytest.mark.parametrize("k", [2, 5])
def test_split_schemes_cover_every_item_once_and_never_leave_a_site_empty(data, scheme, k):
    parts = partition(data, scheme, k, seed=1, alpha=0.3)
    natural = partition(data, "natural", 3)
    for split in ("train", "val", "test"):
        everything = sorted(x for part in natural for x in ids(part[split]))
        dealt = [x for part in parts for x in ids(part[split])]
        assert sorted(dealt) == everything  # a partition: no loss, no duplicate
        assert all(part[split] for part in parts)
    assert partition(data, scheme, k, seed=1, alpha=0.3) == parts  # same seed, same sites
    assert site_items(data, scheme, k - 1, k, seed=1, alpha=0.3) == parts[k - 1]


def test_iid_is_balanced_and_mixes_styles(data):
    parts = partition(data, "iid", 3, seed=0)
    sizes = [len(p["train"]) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(len({i.image.parent.parent.name for i in p["train"]}) == 3 for p in parts)


def test_small_alpha_dirichlet_is_skewed_large_alpha_is_mixed(data):
    def dominant_share(alpha):
        shares = []
        for p in partition(data, "dirichlet", 3, seed=0, alpha=alpha):
            styles = [i.image.parent.parent.name for i in p["train"]]
            shares.append(max(styles.count(s) for s in set(styles)) / len(styles))
        return sum(shares) / len(shares)

    assert dominant_share(0.05) > 0.8
    assert dominant_share(100.0) < 0.6


def test_quantity_skew_gives_unequal_sizes(data):
    sizes = [len(p["train"]) for p in partition(data, "quantity-skew", 3, seed=0, alpha=0.2)]
    assert max(sizes) >= 2 * min(sizes)
