"""Start an HTTP server as a subprocess and wait until `/health` answers 200.

Shared by the end-to-end tests and the benchmarks, which both drive real `vllm serve` processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

VLLM = str(Path(sys.executable).parent / "vllm")
STARTUP_TIMEOUT_S = 300.0


class ServerFailedError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def vllm_serve_command(model: str, port: int, *flags: str) -> list[str]:
    return [VLLM, "serve", model, "--task", "image", "--host", "127.0.0.1", "--port", str(port),
            *flags]  # fmt: skip


@contextmanager
def running_server(
    command: Sequence[str],
    port: int,
    log_path: Path,
    env: dict[str, str] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    cwd: Path | None = None,
    health_path: str = "/health",
) -> Iterator[str]:
    """Run `command` (which must listen on `port`), yield its base URL once `health_path`
    answers 200, and stop it with SIGINT on exit, sent to its whole process group as Ctrl-C in
    a terminal would (so `make serve` stops its `vllm serve` too)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise ServerFailedError(
                    f"{command[0]} exited with {process.returncode}:\n{log_path.read_text()}"
                )
            try:
                if httpx.get(f"{base_url}{health_path}", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailedError(f"no healthy server:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield base_url
    finally:
        _signal_group(process, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(process.pid, signum)
