"""An unnamed deployed site's pseudonym: keyed by its own folder, so nobody can confirm a guessed path.

Before, `site-<8 hex>` was the plain SHA-256 of the data folder's path: a server that guessed
`/data/st-marys-oncology` could hash it and confirm whose data a site held.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest

from common.federation_config import FederationConfig, SiteIdentity
from common.site_errors import SiteRefusal
from common.site_naming import PSEUDONYM_KEY_FILE, default_site_name

FEDVLSM = os.path.join(os.path.dirname(sys.executable), "fedvlsm")


def test_the_pseudonym_is_not_a_hash_anyone_can_compute_from_the_path(tmp_path):
    data = tmp_path / "st-marys-oncology"
    data.mkdir()
    name = default_site_name(data, tmp_path / "site-a")
    assert re.fullmatch(r"site-[0-9a-f]{8}", name)
    guessable = "site-" + hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:8]
    assert name != guessable
    # Stable while the site folder lives; another site folder (another key) gives another name.
    assert default_site_name(data, tmp_path / "site-a") == name
    assert default_site_name(data, tmp_path / "site-b") != name
    key = tmp_path / "site-a" / PSEUDONYM_KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", key.read_text().strip())
    assert sorted(p.name for p in (tmp_path / "site-a").iterdir()) == [PSEUDONYM_KEY_FILE]  # no temp left


def test_processes_making_the_key_at_once_agree_on_one_name(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    code = ("import sys; from common.site_naming import default_site_name; "
            "print(default_site_name(sys.argv[1], sys.argv[2]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(data), str(tmp_path / "site")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    names = {out.strip() for out, _ in outs}
    assert len(names) == 1 and names == {default_site_name(data, tmp_path / "site")}


def test_a_damaged_key_is_refused_naming_the_file_never_replaced_silently(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / PSEUDONYM_KEY_FILE).write_text("not a key\n")
    with pytest.raises(ValueError, match=re.escape(f"{site_dir / PSEUDONYM_KEY_FILE}: not a pseudonym key")):
        default_site_name(data, site_dir)
    # In a ClientApp: a refusal whose public reason holds no path (the detail stays in the site's log).
    with pytest.raises(SiteRefusal) as err:
        SiteIdentity.from_node_config({"data-path": str(data), "site-dir": str(site_dir)}, FederationConfig())
    assert err.value.reason == "site config: the site's pseudonym key cannot be read or made"
    assert str(site_dir) in err.value.detail
    # At `fedvlsm site start`: one line, exit 2, before anything starts.
    monkeypatch.setenv("FEDVLSM_HOME", str(tmp_path / "home"))
    done = subprocess.run([FEDVLSM, "site", "start", "--superlink", "127.0.0.1:9", "--data", str(data),
                           "--site-dir", str(site_dir), "--insecure", "--min-figure-images", "2"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith(f"fedvlsm site start: site folder {site_dir}: cannot read or make the site's "
                                  "pseudonym key")
    assert (site_dir / PSEUDONYM_KEY_FILE).read_text() == "not a key\n"
    assert not (site_dir / "logs").exists()
