"""The image store behind `response_format: "url"`: `ImageStore`, and `LocalImageStore` in one
local folder (the default, `--image-store-dir`). Names are 192 random bits, and a name that
does not match `NAME_PATTERN` is never looked up."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{32}\.(png|jpeg|webp)$")


class ImageStoreError(Exception):
    """The store could not be reached or refused the operation; the message says why."""


@dataclass(frozen=True)
class StoredImage:
    """One stored image: a local file (`path`) or the bytes read from a remote store (`data`)."""

    media_type: str
    expires_in_s: float
    path: Path | None = None
    data: bytes | None = None


def new_image_name(output_format: str) -> str:
    """An unguessable name: 192 random bits and the format's extension."""
    name = f"{secrets.token_urlsafe(24)}.{output_format}"
    assert NAME_PATTERN.match(name) and output_format in MEDIA_TYPES
    return name


class ImageStore(abc.ABC):
    """Where `response_format: "url"` images live until they expire."""

    @abc.abstractmethod
    async def put(self, data: bytes, output_format: str) -> str:
        """Store one encoded image; returns its name. Raises `ImageStoreError`."""

    @abc.abstractmethod
    async def get(self, name: str) -> StoredImage | None:
        """The image, or `None` if there is none or it expired. Raises `ImageStoreError`."""

    async def url_of(self, name: str) -> str | None:
        """A URL the store itself answers (presigned), or `None`: the server's own answers."""
        return None

    async def check(self) -> None:  # noqa: B027 - a local folder needs no check
        """Raise `ImageStoreError` if the store cannot be used (at start-up)."""

    async def run_cleanup(self) -> None:  # noqa: B027 - stores that expire by themselves keep it
        """Remove expired images until cancelled."""


class LocalImageStore(ImageStore):
    def __init__(
        self,
        directory: Path,
        ttl_s: float = 3600.0,
        max_bytes: int = 1 << 30,
        *,
        sweep_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.sweep_interval_s = sweep_interval_s or min(60.0, max(ttl_s / 4, 0.05))
        self._clock = clock
        self._written: dict[str, int] = {}  # this server's files, oldest first: name -> bytes
        self._written_bytes = 0
        directory.mkdir(parents=True, exist_ok=True)

    async def put(self, data: bytes, output_format: str) -> str:
        name = new_image_name(output_format)
        await asyncio.to_thread(self._write, name, data)
        self._written[name] = len(data)
        self._written_bytes += len(data)
        over_cap: list[str] = []
        while self._written_bytes > self.max_bytes and len(self._written) > 1:
            oldest = next(iter(self._written))
            over_cap.append(oldest)
            self._forget([oldest])
        if over_cap:
            await asyncio.to_thread(self._unlink, over_cap)
        return name

    async def get(self, name: str) -> StoredImage | None:
        match = NAME_PATTERN.match(name)
        if match is None:
            return None
        path = self.directory / name
        try:
            status = path.lstat()  # a symlink is not followed: only files the store wrote
        except OSError:
            return None
        if not stat.S_ISREG(status.st_mode):
            return None
        written = status.st_mtime
        expires_in_s = written + self.ttl_s - self._clock()
        if expires_in_s <= 0:
            return None
        return StoredImage(MEDIA_TYPES[match.group(1)], expires_in_s, path=path)

    async def run_cleanup(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                # The folder is read and written off the event loop; the accounting stays on it.
                expired = await asyncio.to_thread(self._expired)
                await asyncio.to_thread(self._unlink, expired)
                self._forget(expired)
            except Exception:  # a failed sweep must not end the clean-up for good
                logger.exception("Image store clean-up failed in %s", self.directory)

    def sweep(self) -> list[str]:
        """Remove every expired image in the folder now; returns their names."""
        expired = self._expired()
        self._unlink(expired)
        self._forget(expired)
        return expired

    def _expired(self) -> list[str]:
        deadline = self._clock() - self.ttl_s
        return [
            entry.name
            for entry in os.scandir(self.directory)
            if NAME_PATTERN.match(entry.name)
            and entry.stat(follow_symlinks=False).st_mtime <= deadline
        ]

    def _write(self, name: str, data: bytes) -> None:
        partial = self.directory / f".{name}.partial"  # never matches NAME_PATTERN
        partial.write_bytes(data)
        now = self._clock()
        os.utime(partial, (now, now))  # the store's clock decides expiry
        partial.replace(self.directory / name)

    def _unlink(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()

    def _forget(self, names: list[str]) -> None:
        for name in names:
            self._written_bytes -= self._written.pop(name, 0)
