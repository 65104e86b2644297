"""Errors a site reports to the server: a short public reason, details kept at home.

A hospital's reply may carry tensors, counts and short reasons only: no file
path, file name, exception text or per-image value. Everything that can fail
at a site is therefore turned into a ``SiteRefusal`` whose ``reason`` is
written for the server (categories and counts, e.g. ``data check: 1
unreadable-image in train``) and whose ``detail`` (paths, messages) goes only
to the site's own log.
"""

from __future__ import annotations


class SiteRefusal(Exception):
    """The site cannot serve this message; `reason` may be sent, `detail` may not."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason


def public_reason(phase: str, err: BaseException) -> str:
    """What the server may learn about an unexpected failure: the phase and the error class only."""
    if isinstance(err, SiteRefusal):
        return err.reason
    # The class name (ValueError, RuntimeError, OutOfMemoryError...) says what
    # kind of failure it was; its message may quote file names or values.
    return f"{phase} failed: {type(err).__name__} (details in the site's log)"
