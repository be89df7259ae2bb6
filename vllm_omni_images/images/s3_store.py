"""`S3ImageStore`: the `file_store.ImageStore` contract in an S3-compatible bucket that every
replica shares (`--image-store-url`); configured by boto3's own AWS_* chain (docs/deployment.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from vllm_omni_images.images.file_store import (
    MEDIA_TYPES,
    NAME_PATTERN,
    ImageStore,
    ImageStoreError,
    StoredImage,
    new_image_name,
)

logger = logging.getLogger(__name__)

MAX_PRESIGNED_TTL_S = 7 * 24 * 3600
"""The longest a SigV4 presigned URL can be valid."""
_EXPIRES_AT = "expires-at"  # user metadata: sent and read back as x-amz-meta-expires-at
_DELETE_BATCH = 1000  # S3's limit per DeleteObjects call


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    """Empty, or ending with "/"."""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """`s3://bucket` or `s3://bucket/some/prefix`; raises `ValueError` for anything else."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{url!r} is not an S3 URL: give s3://bucket or s3://bucket/prefix")
        prefix = parts.path.strip("/")
        return cls(parts.netloc, f"{prefix}/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def s3_client(max_attempts: int = 3, timeout_s: float = 10.0) -> Any:
    """A boto3 S3 client from the environment, with bounded retries and timeouts (an outage is
    a prompt 503, not a hang)."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=32,
        signature_version="s3v4",
    )
    return boto3.session.Session().client("s3", config=config)


class S3ImageStore(ImageStore):
    def __init__(
        self,
        location: S3Location,
        ttl_s: float = 3600.0,
        *,
        presigned_urls: bool = False,
        client: Any = None,
        sweep_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if presigned_urls and ttl_s > MAX_PRESIGNED_TTL_S:
            raise ImageStoreError(
                f"--image-url-ttl {ttl_s:g} is longer than a presigned URL can be valid "
                f"({MAX_PRESIGNED_TTL_S} s, 7 days)"
            )
        self.location = location
        self.ttl_s = ttl_s
        self.presigned_urls = presigned_urls
        self.sweep_interval_s = sweep_interval_s or min(60.0, max(ttl_s / 4, 0.05))
        self._client = client if client is not None else s3_client()
        self._clock = clock

    def _key(self, name: str) -> str:
        return self.location.prefix + name

    async def check(self) -> None:
        await self._call("reach the bucket", self._client.head_bucket, Bucket=self.location.bucket)

    async def put(self, data: bytes, output_format: str) -> str:
        name = new_image_name(output_format)
        await self._call(
            "store an image",
            self._client.put_object,
            Bucket=self.location.bucket,
            Key=self._key(name),
            Body=data,
            ContentType=MEDIA_TYPES[output_format],
            Metadata={_EXPIRES_AT: f"{self._clock() + self.ttl_s:.3f}"},
        )
        return name

    async def get(self, name: str) -> StoredImage | None:
        match = NAME_PATTERN.match(name)
        if match is None:
            return None
        try:
            found = await self._call(
                "read an image",
                self._client.get_object,
                Bucket=self.location.bucket,
                Key=self._key(name),
            )
        except _NoSuchKeyError:
            return None
        with contextlib.closing(found["Body"]) as body:
            expires_at = _expiry(found.get("Metadata", {}), found["LastModified"], self.ttl_s)
            expires_in_s = expires_at - self._clock()
            if expires_in_s <= 0:
                return None
            data = await self._call("read an image", body.read)
        return StoredImage(MEDIA_TYPES[match.group(1)], expires_in_s, data=data)

    async def url_of(self, name: str) -> str | None:
        if not self.presigned_urls:
            return None
        return str(
            await self._call(
                "sign an image URL",
                self._client.generate_presigned_url,
                "get_object",
                Params={"Bucket": self.location.bucket, "Key": self._key(name)},
                ExpiresIn=math.ceil(self.ttl_s),
            )
        )

    async def run_cleanup(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except ImageStoreError as error:  # the next sweep tries again
                logger.warning("Image store clean-up in %s failed: %s", self.location, error)

    async def sweep(self) -> list[str]:
        """Delete every object under the prefix older than the TTL now; returns their names."""
        expired = await self._call("list expired images", self._expired)
        for start in range(0, len(expired), _DELETE_BATCH):
            batch = expired[start : start + _DELETE_BATCH]
            await self._call(
                "delete expired images",
                self._client.delete_objects,
                Bucket=self.location.bucket,
                Delete={"Objects": [{"Key": self._key(n)} for n in batch], "Quiet": True},
            )
        return expired

    def _expired(self) -> list[str]:
        deadline = self._clock() - self.ttl_s
        return [
            name
            for name, modified in self._listing()
            if NAME_PATTERN.match(name) and modified.timestamp() <= deadline
        ]

    def _listing(self) -> Iterator[tuple[str, Any]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=self.location.prefix
        )
        for page in pages:
            for entry in page.get("Contents", []):
                name = entry["Key"][len(self.location.prefix) :]
                if "/" not in name:  # not in a folder below the prefix
                    yield name, entry["LastModified"]

    async def _call(
        self, doing: str, function: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """`function` off the event loop; botocore's errors as `ImageStoreError` naming the
        cause (a missing key as `_NoSuchKeyError`)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code == "NoSuchKey":  # only GetObject says so (a HEAD's 404 has no code)
                raise _NoSuchKeyError() from None
            message = error.response.get("Error", {}).get("Message") or code
            raise ImageStoreError(
                f"the image store ({self.location}) could not {doing}: {code}: {message}"
            ) from None
        except BotoCoreError as error:
            raise ImageStoreError(
                f"the image store ({self.location}) could not {doing}: {error}"
            ) from None


class _NoSuchKeyError(Exception):
    pass


def _expiry(metadata: dict[str, str], last_modified: Any, ttl_s: float) -> float:
    """When an object expires: as its writer said, or (an object without the metadata) its
    `LastModified` plus this server's TTL."""
    with contextlib.suppress(KeyError, ValueError):
        return float(metadata[_EXPIRES_AT])
    return float(last_modified.timestamp()) + ttl_s
