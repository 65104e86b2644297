"""Where a deployed site keeps its state, and the name it sends when it is given none.

Light on purpose (no torch): `fedvlsm site start` computes both before it
starts anything, and the ClientApp computes them again from the node config
(a SuperNode started by hand may give a data-path and nothing else). One
function each, so the two can never disagree.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

# In the site's own folder: the key of its pseudonym. Kept with the rest of the site's state (its
# privacy ledger, personal parts); a new site folder is a new site to the server.
PSEUDONYM_KEY_FILE = "pseudonym.key"


def fedvlsm_home(configured: str = "") -> Path:
    """Where runs, demo data and site folders live by default (absolute).

    `home` key if set, else $FEDVLSM_HOME, else ~/.fedvlsm. Flower runs the
    apps with the working directory of whoever started the SuperLink, so
    nothing here may be relative to the current directory.
    """
    raw = configured or os.environ.get("FEDVLSM_HOME", "") or "~/.fedvlsm"
    return Path(raw).expanduser().resolve()


def default_site_dir(data_path: Path, site_name: str = "") -> Path:
    """`$FEDVLSM_HOME/sites/<site-name, else the data folder's name>`: that name stays at the site."""
    return fedvlsm_home() / "sites" / (site_name or Path(data_path).expanduser().resolve().name)


def default_site_name(data_path: str | Path, site_dir: str | Path) -> str:
    """The name a site without a `site-name` sends: `site-<8 hex>`, a keyed pseudonym of its data folder.

    A folder's name can say whose data it is (`/data/st-marys-oncology`), and every reply carries
    the site's name into the server's records. A plain hash of the path could be confirmed by anyone
    who guesses it; the key (made once, random, in the site's own folder) makes it a pseudonym only
    the site can compute. Stable while the site folder lives, so a site's rows line up across rounds,
    restarts and runs.
    """
    resolved = str(Path(data_path).expanduser().resolve()).encode()
    digest = hmac.new(_pseudonym_key(Path(site_dir).expanduser().resolve()), resolved, hashlib.sha256).hexdigest()
    return f"site-{digest[:8]}"


def _pseudonym_key(site_dir: Path) -> bytes:
    """The site's pseudonym key, made on first use. Two processes making it at once agree: each writes
    its own temporary file and links it into place, and a link that finds one there reads that one."""
    path = site_dir / PSEUDONYM_KEY_FILE
    if not path.exists():
        site_dir.mkdir(parents=True, exist_ok=True)
        tmp = site_dir / f".{PSEUDONYM_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            with contextlib.suppress(FileExistsError):  # another process linked its key first: theirs is it
                os.link(tmp, path)
        finally:
            tmp.unlink()
    key = path.read_text(encoding="ascii").strip()
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"{path}: not a pseudonym key (64 hex digits); remove it to make a new one, and the "
                         "site a new name")
    return bytes.fromhex(key)
