"""Errors raised by data sources.

A source raises :class:`BadImageError` when the bytes of one example cannot be decoded (a truncated JPEG, a
zero-byte PNG). It is the only per-example failure a loader may skip (``data.on_bad_image: skip``); a missing
file or an I/O error is a different exception and always stops the run.
"""

from __future__ import annotations


class BadImageError(ValueError):
    """One example's bytes could not be decoded as an image.

    Args:
        where: The file path or shard key of the example, shown to the user.
        reason: What went wrong, e.g. the decoder's message.
    """

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: cannot decode image ({reason})")
        self.where = where
        self.reason = reason

    def __reduce__(self):
        # Exceptions pickle as cls(*self.args) by default; keep both fields across DataLoader workers.
        return (type(self), (self.where, self.reason))
