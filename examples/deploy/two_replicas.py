"""Two `vllm serve <model> --task image` replicas sharing one S3-compatible bucket, and a client
that round-robins over them (`round_robin_client.py`): the smallest form of a deployment behind
a load balancer (`docs/deployment.md`).

The bucket comes from the standard AWS_* environment, as every S3 tool's does:

    # MinIO, Ceph, R2, GCS interop or AWS itself: point the environment at it
    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_ENDPOINT_URL=http://minio:9000
    python examples/deploy/two_replicas.py --bucket images --create-bucket

    # or a throw-away local S3 server (moto, a dev dependency of this project)
    python examples/deploy/two_replicas.py --local-s3

It starts both replicas with `--image-store-url s3://BUCKET/demo`, waits for each `/health`,
runs the client, then stops both with SIGTERM (each drains for up to `--shutdown-timeout`
seconds, as in a rolling update), and exits with the client's status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
VLLM = str(Path(sys.executable).with_name("vllm"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:  # refused, or an HTTP error status (urllib's HTTPError is an OSError)
        return False


def wait_for(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{url} did not come up; its log ({log}):\n{log.read_text()}")
        time.sleep(0.5)


@contextlib.contextmanager
def local_s3(logs: Path) -> Iterator[str]:
    """moto's S3 server on a free port, with throw-away credentials in this environment."""
    port = free_port()
    log = logs / "s3.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the local S3 server did not start; its log:\n{log.read_text()}")
            time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait()


def create_bucket(bucket: str) -> None:
    import boto3

    client = boto3.client("s3")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)


@contextlib.contextmanager
def replicas(args: argparse.Namespace, logs: Path) -> Iterator[list[str]]:
    ports = [free_port() for _ in range(args.replicas)]
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for port in ports:
            log = logs / f"replica-{port}.log"
            command = [
                VLLM, "serve", args.model, "--task", "image", "--host", "127.0.0.1",
                "--port", str(port), "--image-store-url", f"s3://{args.bucket}/demo",
                "--shutdown-timeout", "30", *args.serve_args,
            ]  # fmt: skip
            print("starting:", " ".join(command), flush=True)
            with open(log, "wb") as out:
                processes.append(
                    (subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT), log)
                )
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, (process, log) in zip(urls, processes, strict=True):
            wait_for(f"{url}/health", process, log, args.startup_timeout)
        print("replicas ready:", ", ".join(urls), flush=True)
        yield urls
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # drain, as Kubernetes stops a pod
        for process, log in processes:
            code = process.wait(timeout=60)
            print(f"replica stopped with status {code} (log: {log})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-qwen-image")
    parser.add_argument("--bucket", default="vllm-images-demo")
    parser.add_argument("--create-bucket", action="store_true", help="create it if missing")
    parser.add_argument(
        "--local-s3", action="store_true", help="run a local S3 server (moto) for the demo"
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--serve-args", nargs=argparse.REMAINDER, default=[], help="more `vllm serve` flags"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vllm-images-deploy-") as folder:
        logs = Path(folder)
        with contextlib.ExitStack() as stack:
            if args.local_s3:
                print("local S3 server:", stack.enter_context(local_s3(logs)), flush=True)
            if args.create_bucket or args.local_s3:
                create_bucket(args.bucket)
            urls = stack.enter_context(replicas(args, logs))
            client = [sys.executable, str(HERE / "round_robin_client.py"),
                      "--requests", str(args.requests)]  # fmt: skip
            for url in urls:
                client += ["--replica", url]
            return subprocess.run(client, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
