"""A real S3 API server for the tests: moto's server mode on a free local port.

`S3Server` can be stopped and started again on the same port, as a store that goes away and
comes back: moto keeps its buckets in this process, so what was stored before is there again.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from moto.server import ThreadedMotoServer

from testing.server_process import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS_* environment that points every S3 client at this server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url}

    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, **_lower(CREDENTIALS))

    def new_bucket(self) -> str:
        """A new empty bucket of the test's own."""
        bucket = f"images-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def keys(self, bucket: str) -> list[str]:
        listing = self.client().list_objects_v2(Bucket=bucket)
        return [entry["Key"] for entry in listing.get("Contents", [])]

    def backdate(self, bucket: str, key: str, seconds: float) -> None:
        """Make an object look `seconds` older to the store's listing (its `LastModified`)."""
        from moto.s3.models import s3_backends

        backend = s3_backends["123456789012"]["global"]
        stored = backend.buckets[bucket].keys[key]
        stored.last_modified = stored.last_modified.__class__.fromtimestamp(
            stored.last_modified.timestamp() - seconds, tz=stored.last_modified.tzinfo
        )


def _lower(credentials: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": credentials["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"],
        "region_name": credentials["AWS_DEFAULT_REGION"],
    }


def wait_until_up(server: S3Server, timeout_s: float = 10.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(server.endpoint_url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
