"""The run folder as a resource: refuse to train over an existing run (unless told to replace it), and hold
an exclusive lock on it while training.

The lock is ``fcntl.flock`` on ``RUN/.lock``: the kernel releases it when the holding process exits, however
it dies, so a ``.lock`` file left by a killed run never blocks the next one. The file records who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

# What makes a folder a run: any of these means `--out` would overwrite someone's work.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")
# Everything `ul-fast train` writes into a run folder (replaced by --overwrite); text-cache/ is a content-keyed
# cache of caption embeddings and stays.
RUN_OUTPUTS = RUN_MARKERS + ("grids", "tensorboard", "reconstructions.png", "samples.png", "curves.png")
LOCK_FILE = ".lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (an existing run, or one in use by another training)."""


def existing_run(run_dir: str | Path) -> list[str]:
    """The run files already in ``run_dir`` (empty for a new or empty folder)."""
    return [name for name in RUN_MARKERS if (Path(run_dir) / name).exists()]


def check_new_run(run_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse to start a new run in a folder that holds one, unless ``overwrite``, or at a path that is a file."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise RunFolderError(f"{run_dir} is a file, not a folder: give --out a new or empty folder for the run")
    found = existing_run(run_dir)
    if found and not overwrite:
        raise RunFolderError(f"{run_dir} already holds a run ({', '.join(found)}); continue it with --resume "
                             f"{run_dir}, or pass --overwrite to replace it")


def clear_run(run_dir: str | Path) -> None:
    """Remove every output of a previous run (checkpoints, metrics, grids, TensorBoard, config)."""
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class RunLock:
    """Exclusive, non-blocking lock on ``FOLDER/.lock`` for as long as the context is open: a run folder while it
    trains, a latent cache while it is encoded (``what`` names the job in the message).

    Raises RunFolderError naming the holder (pid and host) when another process holds it."""

    def __init__(self, run_dir: str | Path, what: str = "training"):
        self.path = Path(run_dir) / LOCK_FILE
        self.what = what
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            try:
                who = "pid {pid} on {host}".format(**json.loads(holder))
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise RunFolderError(f"{self.path.parent} is in use by another {self.what} ({who}); wait for it to end "
                                 "or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
