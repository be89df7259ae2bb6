"""Every shell command (and Python snippet) in the README and the docs runs as written.

The commands are read from the Markdown at test time, never copied here, so a doc that drifts
from the product fails this test. Each document is walked in order, as a reader would follow
it (two documents at a time, `LANES`):

- a server command (`make serve ...`, `vllm serve tiny-qwen-image ...`) is started in the
  background and must become healthy and answer one generation; the commands after it talk
  to it (documents that start the same command share its server; one that no command talks
  to is waited for only at the end, `walk`);
- any other command runs to completion with `bash` and must exit 0; a `python` block runs as a
  script.

Only two things differ from a reader's terminal, both so that tests can run beside anything
else on the machine: a server listens on a free port (the port the doc names, in the client
commands too, is swapped for it, and `OPENAI_BASE_URL` points the example client's default
URL there), and each document runs in a scratch folder of its own whose entries link to the
checkout's (so `make` and `examples/...` resolve, and the files its commands write land in its
scratch folder). The project's virtualenv is first on `PATH`, as after
`source .venv/bin/activate`.

A command that cannot run on this CPU-only, offline machine is skipped only for a reason
`reason_not_run` states (a real model from a hub, a ComfyUI checkout, the test run itself).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from testing.server_process import ServerFailedError, free_port, running_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted(
    {
        REPO / "README.md",
        *(REPO / "docs").glob("*.md"),
        *(REPO / "examples").glob("**/README.md"),
    }
)
SHELL_LANGUAGES = {"bash", "sh", "shell"}
COMMAND_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
"""How long a command past its time has to stop after Ctrl-C."""
DEFAULT_PORT = 8000
FENCE = re.compile(r"^```(\w*)\s*$")
SERVER_COMMAND = re.compile(r"^(\w+=\S+\s+)*(make serve\b|vllm serve tiny-qwen-image\b)")


@dataclass(frozen=True)
class Snippet:
    document: Path
    line: int
    language: str  # "bash" or "python"
    text: str

    def __str__(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}: {self.text}"


def snippets(document: Path) -> list[Snippet]:
    """The shell commands (continuation lines joined) and Python blocks of one document."""
    found: list[Snippet] = []
    language: str | None = None
    block: list[tuple[int, str]] = []
    for number, line in enumerate(document.read_text().splitlines(), start=1):
        fence = FENCE.match(line.strip())
        if fence and language is None:
            language, block = fence.group(1), []
            continue
        if fence and language is not None:
            found.extend(_block_snippets(document, language, block))
            language = None
            continue
        if language is not None:
            block.append((number, line))
    return found


def _block_snippets(document: Path, language: str, block: list[tuple[int, str]]) -> list[Snippet]:
    if language == "python" and block:
        return [Snippet(document, block[0][0], "python", "\n".join(line for _, line in block))]
    if language not in SHELL_LANGUAGES:
        return []
    commands: list[Snippet] = []
    pending: list[str] = []
    start = 0
    for number, line in block:
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = number
        pending.append(line.rstrip().removesuffix("\\").rstrip())
        if not line.rstrip().endswith("\\"):
            commands.append(Snippet(document, start, "bash", " ".join(p.strip() for p in pending)))
            pending = []
    return commands


NOT_RUN: tuple[tuple[str, str], ...] = (
    (
        r"\bvllm serve (?!tiny-qwen-image\b|-)\S",
        "serves a real model: its weights come from a hub (none here), often on a GPU",
    ),
    (
        r"--image-engine omni\b",
        "starts vllm-omni's engine (a minute more per server on 2 cores); "
        "tests/e2e/test_omni_serve.py serves it",
    ),
    (r"--device cuda\b", "needs a CUDA GPU (the GPU benchmark's command, docs/performance.md)"),
    (
        r"\bpip (download|install)\b",
        "sets up another machine's Python (the GPU machine), not this project's",
    ),
    (r"-m benchmarks\.", "a benchmark: minutes on two cores; its figures are in docs/"),
    (r"\bpytest\b", "a part of the test suite, which `make test` runs"),
    (
        r"^make test-clients\b",
        "installs the client apps' own environments (LlamaIndex, LiteLLM's proxy) and starts "
        "a server of its own: run by hand before a release (docs/clients.md)",
    ),
    (r"^make (test|benchmark)\b", "`make test` is this run itself; `make benchmark` takes long"),
    (
        r"\bComfyUI\b|\bmain\.py\b|:8188\b",
        "needs a ComfyUI checkout (tests/e2e/test_comfyui_real.py, with COMFYUI_DIR)",
    ),
    (r"^git clone\b", "a clone needs the network; the tests run in a clone already"),
    (r"^aws\b", "the AWS CLI on a real bucket (the tests use a local S3 server)"),
    (r"^vllm-router\b", "production-stack's router, a package of its own, in front of GPUs"),
)
"""The commands that cannot run on this CPU-only, offline machine, by pattern, and why."""


def reason_not_run(snippet: Snippet) -> str | None:
    """Why a documented command cannot run here (None: it runs)."""
    return next((why for pattern, why in NOT_RUN if re.search(pattern, snippet.text)), None)


def test_the_docs_have_commands_and_each_one_runs_or_says_why_not() -> None:
    every = [snippet for document in DOCUMENTS for snippet in snippets(document)]
    bash = [snippet for snippet in every if snippet.language == "bash"]
    runnable = [snippet for snippet in bash if reason_not_run(snippet) is None]
    assert any(SERVER_COMMAND.match(snippet.text) for snippet in runnable), "no server command"
    assert len(runnable) >= 10, [str(snippet) for snippet in runnable]
    # The README's quick start is a command that runs, not one of the skipped ones.
    readme = [snippet.text for snippet in runnable if snippet.document.name == "README.md"]
    assert "make serve" in readme
    assert any("image_generation_client.py" in text for text in readme)


@dataclass
class LiveServer:
    base_url: str
    port: int


LANES = 2
"""Documents walked at a time, each in a thread of its own. A walk mostly waits for a server's
start or a command, one core's work each, so two walks keep both cores of a 2-core machine busy
(about a third less time than one document after another)."""


class Servers:
    """The servers the docs start, one per distinct command, shared by the documents (a start
    costs ~15 s) and stopped at the end of the module. The walks call `start` from their own
    threads: the first to need a server starts it, the others wait for it."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: dict[str, Future[LiveServer]] = {}
        self.stack = ExitStack()
        self._lock = threading.Lock()
        self.background = ThreadPoolExecutor(thread_name_prefix="docs-server")

    def start(self, snippet: Snippet, scratch: Path) -> tuple[LiveServer, int]:
        """Start (or reuse) the server of `snippet`, in `scratch`; also returns the port the
        doc uses."""
        named = re.search(r"(?:\bPORT=|--port[ =])(\d+)", snippet.text)
        doc_port = int(named.group(1)) if named else DEFAULT_PORT
        key = re.sub(r"\s*(\bPORT=\d+|--port[ =]\d+)", "", snippet.text).strip()
        key = re.sub(r"\s+#.*$", "", key)
        # `make serve` runs exactly this (the Makefile's MODEL default): one server for both.
        key = re.sub(r"^make serve$", "vllm serve tiny-qwen-image --task image", key)
        with self._lock:
            starting = key not in self.running
            if starting:
                self.running[key] = Future()
            server = self.running[key]
        if starting:
            try:
                server.set_result(self._start(snippet, scratch))
            except BaseException as error:  # pytest.fail's too, for the walks waiting on it
                server.set_exception(error)
        return server.result(), doc_port

    def start_in_background(
        self, snippet: Snippet, scratch: Path
    ) -> Future[tuple[LiveServer, int]]:
        """`start`, in a thread of its own."""
        return self.background.submit(self.start, snippet, scratch)

    def _start(self, snippet: Snippet, scratch: Path) -> LiveServer:
        port = free_port()
        command = shlex.join(shlex.split(snippet.text, comments=True))  # `--port` goes last
        command = re.sub(r"\bPORT=\d+", f"PORT={port}", command)
        command = re.sub(r"--port[ =]\d+", f"--port {port}", command)
        if re.search(r"\bvllm serve\b", command) and "--port" not in command:
            command += f" --port {port}"
        process = running_server(
            ["bash", "-c", command],
            port,
            self.logs / f"server-{port}.log",
            env={**self.env, "PORT": str(port)},
            cwd=scratch,
        )
        try:
            base_url = process.__enter__()  # until healthy; other walks go on meanwhile
        except ServerFailedError as error:
            pytest.fail(f"{snippet}\ndid not start:\n{error}")
        with self._lock:
            self.stack.push(process.__exit__)
        server = LiveServer(base_url, port)
        self._check_it_serves(snippet, server)
        return server

    def _check_it_serves(self, snippet: Snippet, server: LiveServer) -> None:
        key = re.search(r"--api-key[ =](\S+)", snippet.text)
        headers = {"Authorization": f"Bearer {key.group(1)}"} if key else {}
        body = {"prompt": "docs", "size": "64x64", "num_inference_steps": 2}
        response = httpx.post(
            f"{server.base_url}/v1/images/generations", json=body, headers=headers, timeout=120
        )
        assert response.status_code == 200, f"{snippet}\n{response.text}"
        assert response.json()["data"][0]["b64_json"]


def scratch_for(document: Path, root: Path) -> Path:
    """A folder of `document`'s own that looks like the checkout (its entries are links) but
    keeps what the document's commands write."""
    folder = root / str(document.relative_to(REPO)).replace("/", "-")
    folder.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in {".git"}:
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def servers(
    model_cache: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    venv_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(Path(venv_bin).parent),
        "VLLM_OMNI_IMAGES_CACHE": str(model_cache),
        "HF_HUB_OFFLINE": "1",
    }
    running = Servers(env, tmp_path_factory.mktemp("docs-servers"))
    with running.stack:
        try:
            yield running
        finally:
            running.background.shutdown()  # a start under way: it ends, then stops with the rest


def run_snippet(snippet: Snippet, scratch: Path, env: dict[str, str]) -> None:
    if snippet.language == "python":
        script = scratch / f"snippet_{snippet.document.stem}_{snippet.line}.py"
        script.write_text(snippet.text)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-o", "pipefail", "-c", snippet.text]
    full_env = {key: value for key, value in os.environ.items() if key != "OPENAI_API_KEY"}
    # A session of its own: a command past its time gets Ctrl-C, as a user stops it, so that
    # the servers it started (each in a session of its own) are stopped by its own clean-up.
    with subprocess.Popen(
        command,
        cwd=scratch,
        env={**full_env, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.communicate(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            raise
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, (
        f"{snippet}\nexited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}"
        f"\n--- stderr\n{result.stderr[-3000:]}"
    )


def at_port(snippet: Snippet, doc_port: int, port: int) -> Snippet:
    text = re.sub(rf"\b(127\.0\.0\.1|localhost):{doc_port}\b", f"127.0.0.1:{port}", snippet.text)
    return Snippet(snippet.document, snippet.line, snippet.language, text)


def is_server(snippet: Snippet) -> bool:
    return snippet.language == "bash" and SERVER_COMMAND.match(snippet.text) is not None


def walk(document: Path, servers: Servers, scratch: Path) -> list[Future[tuple[LiveServer, int]]]:
    """Run `document`'s commands in order, as a reader follows it (the module docstring).

    A server that no command talks to (the next command starts another server, or there is
    none) is started when its command comes, but not waited for: its start goes on while the
    walk, and its lane's next document, go on. The walk returns those starts; the document's
    test waits for each."""
    runnable = [
        snippet
        for snippet in snippets(document)
        if snippet.language == "python" or reason_not_run(snippet) is None
    ]
    server: LiveServer | None = None
    doc_port = DEFAULT_PORT
    unwaited: list[Future[tuple[LiveServer, int]]] = []
    for index, snippet in enumerate(runnable):
        if is_server(snippet):
            following = runnable[index + 1 : index + 2]
            if following and not is_server(following[0]):
                server, doc_port = servers.start(snippet, scratch)
            else:
                unwaited.append(servers.start_in_background(snippet, scratch))
                server = None
            continue
        if server is None and re.search(r"(127\.0\.0\.1|localhost):\d+", snippet.text):
            pytest.fail(f"{snippet}\ntalks to a server the document never starts")
        env = dict(servers.env)
        if server is not None:
            snippet = at_port(snippet, doc_port, server.port)
            # The example client's default URL is the doc's server; the SDK's variable moves it.
            env["OPENAI_BASE_URL"] = f"{server.base_url}/v1"
        run_snippet(snippet, scratch, env)
    return unwaited


def runnable_commands(document: Path) -> int:
    return sum(
        snippet.language == "python" or reason_not_run(snippet) is None
        for snippet in snippets(document)
    )


@pytest.fixture(scope="module")
def walks(
    request: pytest.FixtureRequest, servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Path, Future[list[Future[tuple[LiveServer, int]]]]]]:
    """The walks of the documents this run selected, `LANES` at a time, each in a scratch
    folder of its own (`scratch_for`); the longest (most commands) first, so that the lanes
    end together."""
    chosen = {
        item.callspec.params["document"]
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.module is sys.modules[__name__]
        and item.originalname == test_every_command_in_the_document_runs.__name__
    }
    selected = [document for document in DOCUMENTS if document in chosen]
    root = tmp_path_factory.mktemp("docs-scratch")
    pool = ThreadPoolExecutor(LANES, thread_name_prefix="docs-walk")
    try:
        yield {
            document: pool.submit(walk, document, servers, scratch_for(document, root))
            for document in sorted(selected, key=runnable_commands, reverse=True)
        }
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # -x: the walks not begun never begin


@pytest.mark.parametrize(
    "document", DOCUMENTS, ids=[str(path.relative_to(REPO)) for path in DOCUMENTS]
)
def test_every_command_in_the_document_runs(
    document: Path, walks: dict[Path, Future[list[Future[tuple[LiveServer, int]]]]]
) -> None:
    for start in walks[document].result():  # the walk's failure, raised here
        start.result()  # and that of a server it did not wait for


def test_snippets_are_read_as_a_reader_sees_them(tmp_path: Path) -> None:
    document = tmp_path / "doc.md"
    document.write_text(
        "text\n```bash\n# a comment\nmake serve   # serves\n\ncurl -s a \\\n  -d b\n```\n"
        "```text\nnot a command\n```\n```python\nprint(1)\nprint(2)\n```\n"
    )
    found = snippets(document)
    assert [(s.language, s.line, s.text) for s in found] == [
        ("bash", 4, "make serve   # serves"),
        ("bash", 6, "curl -s a -d b"),
        ("python", 13, "print(1)\nprint(2)"),
    ]
    assert shlex.split(found[1].text) == ["curl", "-s", "a", "-d", "b"]
