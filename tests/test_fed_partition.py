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


@pytest.mark.parametrize("scheme", ["iid", "quantity-skew", "dirichlet"])
def test_the_seed_decides_the_partition(data, scheme):
    """Another seed, other sites (a researcher repeating a run over seeds must get other draws)."""
    parts = [partition(data, scheme, 3, seed=s, alpha=0.3) for s in range(4)]
    deals = {tuple(tuple(ids(p[split])) for p in part for split in ("train", "val", "test")) for part in parts}
    assert len(deals) == 4
    if scheme != "iid":  # the skew itself is drawn from the seed: sizes, and each site's mix of styles
        mixes = {tuple(tuple(sum(f"site-{s}/" in x for x in ids(p["train"])) for s in range(3)) for p in part)
                 for part in parts}
        assert len(mixes) == 4


def test_shares_are_rounded_by_largest_remainder():
    import numpy as np

    from simulations.partition import _shares_to_counts

    assert _shares_to_counts(10, np.array([0.46, 0.54])).tolist() == [5, 5]  # remainders .6 and .4
    assert _shares_to_counts(7, np.array([0.1, 0.2, 0.7])).tolist() == [1, 1, 5]  # .7, .4, .9 -> two extra
