"""S3 image store clients: boto3 (blocking, via `asyncio.to_thread`) against obstore (native
async), side by side on a moto server, for the `response_format: "url"` image store.

Measures put and get latency and throughput at concurrency 1 and 8, presign latency, and the
client's CPU time per operation, in interleaved rounds (the order of the clients alternates
from round to round). moto runs in a separate process, so `time.process_time()` of this
process is the client's CPU alone (all its threads: boto3's pool, obstore's tokio runtime).
Also records how each library reads its configuration from the environment and which
exceptions it raises for the failures the image store must handle.

Needs boto3, obstore and moto[server], which the project does not depend on:

    .tools/bin/uv venv /tmp/s3bench --python 3.11
    .tools/bin/uv pip install --python /tmp/s3bench/bin/python boto3 obstore "moto[server]"
    /tmp/s3bench/bin/python -m benchmarks.image_store_clients
        # writes docs/benchmarks/image_store_clients.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import boto3
import obstore
from botocore.config import Config
from obstore.store import S3Store

BUCKET = "images"
CONTENT_TYPE = "image/png"
RESULT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "image_store_clients.md"
DISTRIBUTIONS = ("boto3", "botocore", "s3transfer", "jmespath", "obstore", "moto")


class Client(Protocol):
    name: str

    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> int: ...

    def presign(self, key: str) -> str: ...


class Boto3Client:
    """One shared (thread-safe) boto3 client, called from the event loop's thread pool."""

    def __init__(self, name: str, checksums: str, pool: int) -> None:
        self.name = name
        config = Config(
            max_pool_connections=pool,
            request_checksum_calculation=checksums,
            response_checksum_validation=checksums,
        )
        self.s3: Any = boto3.client("s3", config=config)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(
            self.s3.put_object, Bucket=BUCKET, Key=key, Body=data, ContentType=CONTENT_TYPE
        )

    async def get(self, key: str) -> int:
        return await asyncio.to_thread(self._get, key)

    def _get(self, key: str) -> int:
        return len(self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def presign(self, key: str) -> str:
        params = {"Bucket": BUCKET, "Key": key}
        return str(self.s3.generate_presigned_url("get_object", Params=params, ExpiresIn=3600))


class ObstoreClient:
    """An `S3Store` configured from the environment; `allow_http` for moto's http endpoint."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.store = S3Store(BUCKET, client_options={"allow_http": True})

    async def put(self, key: str, data: bytes) -> None:
        await obstore.put_async(self.store, key, data, attributes={"Content-Type": CONTENT_TYPE})

    async def get(self, key: str) -> int:
        result = await obstore.get_async(self.store, key)
        return len(await result.bytes_async())

    def presign(self, key: str) -> str:
        return obstore.sign(self.store, "GET", key, timedelta(hours=1))


@dataclass
class Cell:
    """Every sample of one (operation, size, concurrency, client) over all rounds."""

    latencies: list[float] = field(default_factory=list)
    round_throughputs: list[float] = field(default_factory=list)  # ops/s, one per round
    cpu: float = 0.0
    ops: int = 0

    def add(self, latencies: list[float], wall: float, cpu: float) -> None:
        self.latencies += latencies
        self.round_throughputs.append(len(latencies) / wall)
        self.cpu += cpu
        self.ops += len(latencies)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start in 60 s")


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def timed_batch(
    op: Callable[[int], Awaitable[Any]], ops: int, concurrency: int
) -> tuple[list[float], float, float]:
    """Run `op(0..ops-1)` on `concurrency` workers: per-op latencies, wall time, CPU time."""
    indices = iter(range(ops))  # shared by the workers: each takes the next index
    latencies: list[float] = []

    async def worker() -> None:
        for index in indices:
            start = time.perf_counter()
            await op(index)
            latencies.append(time.perf_counter() - start)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - wall, time.process_time() - cpu


def timed_presigns(client: Client, count: int) -> tuple[list[float], float, float]:
    latencies = []
    cpu, wall = time.process_time(), time.perf_counter()
    for index in range(count):
        start = time.perf_counter()
        client.presign(f"seed/{index}.png")
        latencies.append(time.perf_counter() - start)
    return latencies, time.perf_counter() - wall, time.process_time() - cpu


def put_op(client: Client, key: str, data: bytes) -> Callable[[int], Awaitable[Any]]:
    """Operation `i` puts `data` at `key.format(i)`."""
    return lambda i: client.put(key.format(i), data)


def get_op(client: Client, key: str, count: int) -> Callable[[int], Awaitable[Any]]:
    """Operation `i` reads `key.format(i % count)`."""
    return lambda i: client.get(key.format(i % count))


async def measure(
    clients: list[Client], sizes: list[int], concurrencies: list[int], rounds: int, ops: int
) -> dict[tuple[str, int, int, str], Cell]:
    cells: dict[tuple[str, int, int, str], Cell] = {}
    payloads = {size: os.urandom(size) for size in sizes}  # incompressible, like PNG/JPEG/WebP
    for size, data in payloads.items():  # what every client's gets read
        await asyncio.gather(*(clients[0].put(f"seed/{size}/{i}", data) for i in range(ops)))
    for client in clients:  # warm-up: imports, connection pools, credential resolution
        await timed_batch(put_op(client, f"warm/{client.name}/{{}}", b"x" * 1000), 16, 8)
        await timed_batch(get_op(client, f"seed/{sizes[0]}/{{}}", ops), 16, 8)
        timed_presigns(client, 50)
    for round_ in range(rounds):
        order = clients if round_ % 2 == 0 else clients[::-1]
        for size, data in payloads.items():
            for concurrency in concurrencies:
                for client in order:
                    key = f"{client.name}/{size}/{{}}.png"
                    batch = await timed_batch(put_op(client, key, data), ops, concurrency)
                    cells.setdefault(("put", size, concurrency, client.name), Cell()).add(*batch)
                for client in order:
                    batch = await timed_batch(
                        get_op(client, f"seed/{size}/{{}}", ops), ops, concurrency
                    )
                    cells.setdefault(("get", size, concurrency, client.name), Cell()).add(*batch)
        for client in order:
            batch = timed_presigns(client, 20 * ops)
            cells.setdefault(("presign", 0, 1, client.name), Cell()).add(*batch)
        print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)
    return cells


def exception_name(error: BaseException) -> str:
    name = f"{type(error).__module__}.{type(error).__qualname__}".removeprefix("builtins.")
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        name += f" (Code {response['Error'].get('Code')})"
    if type(error).__name__ == "GenericError":  # obstore's catch-all: the message tells more
        text = str(error)
        hints = [hint for hint in ("BadScheme", "ConnectionRefused") if hint in text]
        name += f" ({', '.join([text.splitlines()[0].split(' - ')[-1], *hints])})"
    skip = (Exception, BaseException, object)
    bases = [b.__name__ for b in type(error).__mro__[1:] if b not in skip]
    return f"{name} <- {', '.join(bases[:3])}" if bases else name


def outcome(call: Callable[[], Any]) -> str:
    try:
        call()
    except Exception as error:
        return exception_name(error)
    return "no error"


def configuration_facts(endpoint: str) -> list[tuple[str, str]]:
    """Whether each library finds moto from the environment alone, and what `allow_http` does."""
    facts = []
    s3: Any = boto3.client("s3")
    facts.append(("boto3 reads AWS_ENDPOINT_URL", str(s3.meta.endpoint_url == endpoint)))
    store = S3Store(BUCKET, client_options={"allow_http": True})
    facts.append(
        (
            "obstore S3Store(bucket), env endpoint, put",
            outcome(lambda: obstore.put(store, "e", b"x")),
        )
    )
    from_url = S3Store.from_url(f"s3://{BUCKET}", client_options={"allow_http": True})
    facts.append(
        ("obstore from_url(s3://…), put", outcome(lambda: obstore.put(from_url, "u", b"")))
    )

    def strict_put() -> None:
        obstore.put(S3Store(BUCKET, retry_config={"max_retries": 0}), "h", b"x")

    facts.append(("obstore without allow_http, put", outcome(strict_put)))
    with environment(AWS_ENDPOINT_URL=None, AWS_ENDPOINT_URL_S3=endpoint):
        s3 = boto3.client("s3")
        facts.append(("boto3 reads AWS_ENDPOINT_URL_S3", str(s3.meta.endpoint_url == endpoint)))
        store = S3Store(
            BUCKET, client_options={"allow_http": True}, retry_config={"max_retries": 0}
        )
        put = outcome(lambda: obstore.put(store, "s", b"x"))
        facts.append(("obstore with only AWS_ENDPOINT_URL_S3, put", put))
    return facts


def error_facts(endpoint: str) -> list[tuple[str, str, str]]:
    """(failure, boto3's exception, obstore's exception): no retries, so each fails at once."""
    no_retry = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2)
    options: dict[str, Any] = {"allow_http": True, "connect_timeout": "2s"}

    def pair(url: str, bucket: str, key: str, put: bool, **creds: str) -> tuple[str, str]:
        s3: Any = boto3.client("s3", endpoint_url=url, config=no_retry, **creds)
        store_creds = {
            "access_key_id": creds.get("aws_access_key_id", "testing"),
            "secret_access_key": creds.get("aws_secret_access_key", "testing"),
        }
        store = S3Store(
            bucket,
            endpoint=url,
            client_options=options,
            retry_config={"max_retries": 0},
            **store_creds,
        )
        if put:
            return (
                outcome(lambda: s3.put_object(Bucket=bucket, Key=key, Body=b"x")),
                outcome(lambda: obstore.put(store, key, b"x")),
            )
        return (
            outcome(lambda: s3.get_object(Bucket=bucket, Key=key)["Body"].read()),
            outcome(lambda: obstore.get(store, key).bytes()),
        )

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rows = [
        ("connection refused (put)", *pair(closed, BUCKET, "k", True)),
        ("no such bucket (put)", *pair(endpoint, "missing-bucket", "k", True)),
        ("no such bucket (get)", *pair(endpoint, "missing-bucket", "k", False)),
        ("no such key (get)", *pair(endpoint, BUCKET, "missing-key", False)),
    ]
    # moto enforces IAM once its first N actions are spent: 2 to make a user without policies.
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=b"2", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(request, timeout=10).close()
    iam: Any = boto3.client("iam")
    iam.create_user(UserName="no-policies")
    key = iam.create_access_key(UserName="no-policies")["AccessKey"]
    creds = {
        "aws_access_key_id": key["AccessKeyId"],
        "aws_secret_access_key": key["SecretAccessKey"],
    }
    seed = "seed/100000/0"
    unknown = {"aws_access_key_id": "AKIAUNKNOWN", "aws_secret_access_key": "x"}
    rows += [
        ("access denied (put)", *pair(endpoint, BUCKET, "k", True, **creds)),
        ("access denied (get)", *pair(endpoint, BUCKET, seed, False, **creds)),
        ("unknown access key (get)", *pair(endpoint, BUCKET, seed, False, **unknown)),
    ]
    return rows


def distribution_facts() -> list[tuple[str, str, str, str]]:
    """(distribution, version, installed KiB from its RECORD, ships py.typed)."""
    rows = []
    for name in DISTRIBUTIONS:
        dist = metadata.distribution(name)
        files = dist.files or []
        kib = sum(f.size or 0 for f in files) / 1024
        typed = any(f.name == "py.typed" for f in files)
        rows.append((name, dist.version, f"{kib:,.0f}", str(typed)))
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}" if seconds < 0.01 else f"{seconds * 1000:.2f}"


def quantile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def results_tables(cells: dict[tuple[str, int, int, str], Cell], clients: list[str]) -> str:
    baseline, rest = clients[0], clients[1:]
    detail: list[list[str]] = []
    ratios: list[list[str]] = []
    op_order = ["put", "get", "presign"]
    groups = sorted({key[:3] for key in cells}, key=lambda k: (op_order.index(k[0]), k[1], k[2]))
    for op, size, concurrency in groups:
        label = [op, f"{size // 1000} KB" if size else "-", str(concurrency)]
        stats = {}
        for name in clients:
            cell = cells[(op, size, concurrency, name)]
            p50 = statistics.median(cell.latencies)
            ops_s = statistics.median(cell.round_throughputs)
            cpu = cell.cpu / cell.ops
            stats[name] = (p50, ops_s, cpu)
            mb_s = f"{ops_s * size / 1e6:.1f}" if size else "-"
            p90 = ms(quantile(cell.latencies, 0.9))
            detail.append([*label, name, ms(p50), p90, f"{ops_s:,.0f}", mb_s, ms(cpu)])
        for name in rest:
            (b50, bops, bcpu), (o50, oops, ocpu) = stats[baseline], stats[name]
            ratio = [f"{o50 / b50:.2f}", f"{oops / bops:.2f}", f"{ocpu / bcpu:.2f}"]
            ratios.append([*label, f"{name} / {baseline}", *ratio])
    ratio_header = ["op", "size", "conc", "clients", "p50 latency", "throughput", "CPU/op"]
    detail_header = ["op", "size", "conc", "client", "p50 ms", "p90 ms", "ops/s", "MB/s"]
    detail_header.append("CPU ms/op")
    return (
        f"### Ratios {' and '.join(rest)} / {baseline} (below 1 is better for latency and CPU, "
        f"above 1 for throughput)\n\n"
        + table(ratio_header, ratios)
        + "\n### Detail\n\n"
        + table(detail_header, detail)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=32, help="operations per cell and round")
    parser.add_argument("--sizes", default="100000,1000000", help="object sizes in bytes")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument(
        "--boto3-checksums",
        action="store_true",
        help="also measure boto3 with CRC32 checksums only when required (default: supported)",
    )
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    moto = start_moto(port)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        pool = max(concurrencies)
        clients: list[Client] = [Boto3Client("boto3", "when_supported", pool)]
        clients.append(ObstoreClient("obstore"))
        if args.boto3_checksums:
            clients.append(Boto3Client("boto3-nocrc", "when_required", pool))

        async def run() -> dict[tuple[str, int, int, str], Cell]:
            # asyncio.to_thread's default pool has min(32, cores + 4) threads: 6 on 2 cores.
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=pool))
            return await measure(clients, sizes, concurrencies, args.rounds, args.ops)

        started = time.perf_counter()
        cells = asyncio.run(run())
        elapsed = time.perf_counter() - started
        configuration = configuration_facts(endpoint)
        errors = error_facts(endpoint)
    finally:
        moto.terminate()
        moto.wait(timeout=10)

    distributions = distribution_facts()
    versions = ", ".join(f"{name} {version}" for name, version, *_ in distributions)
    command = " ".join(["python -m benchmarks.image_store_clients", *sys.argv[1:]])
    markdown = (
        "# S3 image store clients: boto3 against obstore\n\n"
        f"`{command}` on {os.cpu_count()} cores ({platform.machine()}), Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{versions}. {args.rounds} interleaved rounds (client order alternating) of {args.ops} "
        f"operations per cell, {elapsed:.0f} s. Random (incompressible) objects. The server is "
        "moto's in-memory S3 in a separate process over http on 127.0.0.1: its time per request "
        "is small but not zero and is included in latency and throughput, and on this few-core "
        "machine it competes with the client for CPU, so latency and throughput are upper "
        "bounds on the client's share. CPU ms/op is this process's CPU time (all threads) per "
        "operation: the client's alone. boto3 runs in a thread pool of `max(concurrency)` "
        "threads via `asyncio.to_thread`, with botocore's default CRC32 checksums "
        "(`when_supported`); obstore uses `put_async`/`get_async` and `sign`. Presign is "
        "local (no request). Over http both hash the payload (SHA-256) to sign it; over https "
        "boto3 skips that for S3, obstore still does it unless `unsigned_payload` is set.\n\n"
        + results_tables(cells, [c.name for c in clients])
        + "\n### Configuration from the environment\n\n"
        + table(["check", "result"], [[a, f"`{b}`"] for a, b in configuration])
        + "\n### Exceptions (`<-` its first base classes)\n\n"
        + table(["failure", "boto3", "obstore"], [[a, f"`{b}`", f"`{c}`"] for a, b, c in errors])
        + "\n### Installed size (files in each distribution's RECORD) and shipped types\n\n"
        + table(["distribution", "version", "KiB", "py.typed"], [list(r) for r in distributions])
    )
    print(markdown)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
