"""Adversarial cases (issue 31) against a real `vllm serve tiny-qwen-image --task image`: what
was sent and what came back, before and after the fixes, for docs/reliability.md.

    .venv/bin/python -m benchmarks.adversarial --label before   # adversarial_before.json
    .venv/bin/python -m benchmarks.adversarial --label after    # adversarial_after.json
    .venv/bin/python -m benchmarks.adversarial --quick          # only the cases of a few seconds
    .venv/bin/python -m benchmarks.adversarial --cases slow_clients,edit_auto_16x131072
    .venv/bin/python -m benchmarks.adversarial --table          # only rewrite the table

Each run starts `vllm serve tiny-qwen-image --task image --api-key ... --enable-lora
--max-loras 2 --lora-modules style=<a tiny LoRA> --allowed-media-domains 127.0.0.1` (with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), or uses `--base-url` of one started so, and sends
every case of `testing/adversarial_cases.py`, `adversarial_lora.py` and
`adversarial_network.py`: one row each (what was sent, the status, an excerpt of the answer,
the seconds, notes). The slow clients and the trickling URL mostly wait: they run beside the
other cases. The heavy cases (the 8x2097152 edit, 2048x2048 n=4, the 1 GiB adapter) run one at
a time, are skipped when the machine has less than 8 GiB available (10 for 2048x2048 n=4),
and note the server's peak resident memory. A run with `--cases` replaces those rows of the
label's JSON file and keeps the others. `docs/benchmarks/adversarial.md` is the table of both
labels, side by side.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.report import RESULTS_DIR, benchmark_parser, machine, run_description
from benchmarks.soak import Sampler, listener
from testing import adversarial_cases as cases
from testing import adversarial_lora as lora
from testing import adversarial_network as network
from testing.adversarial_cases import Case, Row, Target
from testing.server_process import free_port, running_server, vllm_serve_command

API_KEY = "adversarial-key"
MAX_LORAS = 2
MIN_AVAILABLE_GIB = 8.0
LABELS = ("before", "after")


@dataclass(frozen=True)
class CaseSpec:
    name: str
    point: int
    run: Case
    quick: bool = False
    """A few seconds at most (also before the fixes)."""
    heavy: bool = False
    """Gigabytes: run alone, skipped on a machine short of memory; the server's RSS noted."""
    waits: bool = False
    """Mostly waits on the network: runs beside the other cases."""
    needs_gib: float = MIN_AVAILABLE_GIB
    """The memory a heavy case must find available, else it is skipped."""


CASES = [
    CaseSpec("surrogate_in_negative_prompt", 1, cases.surrogate_in("negative_prompt"), True),
    CaseSpec("surrogate_beside_good", 1, cases.surrogate_beside_a_good_request, True),
    CaseSpec("surrogate_in_prompt", 1, cases.surrogate_in("prompt"), True),
    CaseSpec("surrogate_in_user", 1, cases.surrogate_in("user"), True),
    CaseSpec("edit_auto_8x2097152", 2, cases.edit_size_auto(8, 2097152), heavy=True),
    CaseSpec("edit_auto_16x131072", 2, cases.edit_size_auto(16, 131072)),
    CaseSpec("generation_16x98304", 2, cases.generation_beyond_the_side),
    CaseSpec("generation_2048x2048_n4", 3, cases.largest_default_request, heavy=True, needs_gib=10),
    CaseSpec("slow_clients", 4, network.slow_clients, waits=True),
    CaseSpec("exif_mask_as_displayed", 5, cases.exif_mask_as_displayed, True),
    CaseSpec("exif_size_auto", 5, cases.exif_without_mask, True),
    CaseSpec("gray16_png", 5, cases.gray16_brightness, True),
    *(CaseSpec(f"mode_{m}", 5, cases.other_mode(m), True) for m in ("P", "CMYK", "LA")),
    CaseSpec("lora_named_like_the_base", 6, lora.adapter_named_like_the_base, True),
    CaseSpec("lora_named_with_a_slash", 6, lora.adapter_named_with_a_slash, True),
    CaseSpec("lora_named_5000_chars", 6, lora.adapter_named_5000_characters, True),
    CaseSpec("lora_path_probes", 6, lora.adapter_path_probes, True),
    CaseSpec("lora_header_secret", 6, lora.adapter_header_secret, True),
    CaseSpec("lora_big_rank_file", 6, lora.adapter_sparse_big_rank, heavy=True),
    CaseSpec("lora_evicted_files_deleted", 6, lora.adapter_evicted_then_deleted, True),
    CaseSpec("trickling_media_url", 7, network.trickling_media_url, waits=True),
    CaseSpec("unreadable_image_message", 7, cases.unreadable_image_message, True),
    CaseSpec("files_bad_name", 7, cases.bad_file_names, True),
    CaseSpec("head_image_url", 7, cases.head_on_an_image_url, True),
    CaseSpec("stream_as_string", 7, cases.wrong_json_type("stream", "yes"), True),
    CaseSpec("n_as_string", 7, cases.wrong_json_type("n", "2"), True),
]


def run_one(spec: CaseSpec, target: Target, server: psutil.Process | None) -> list[Row]:
    """The case's rows; a heavy one is skipped short of memory and notes the server's RSS; a
    case that fails is a row that says so, and the others run on. After a timeout (or a 503)
    the next case waits until the server makes images again, and the row says how long."""
    available_gib = psutil.virtual_memory().available / 2**30
    if spec.heavy and available_gib < spec.needs_gib:
        status = f"skipped: memory ({available_gib:.1f} GiB available)"
        return [Row(spec.name, spec.point, "", status, "", None)]
    print(f"{time.strftime('%H:%M:%S')} {spec.name}", flush=True)
    sampler = Sampler(server) if spec.heavy and server is not None else None
    start_mib = sampler.memory_mib() if sampler is not None else 0.0
    try:
        with sampler or contextlib.nullcontext():
            rows = spec.run(target)
            strays = [row.case for row in rows if row.case.split(":")[0] != spec.name]
            if strays:
                raise ValueError(f"rows not named {spec.name}[:...]: {strays}")
            if any(row.status.startswith(("timeout", "503")) for row in rows):
                add_note(rows[-1], recovery(target))
    except Exception as error:  # the table says which case broke, and the run goes on
        failed = f"case failed: {type(error).__name__}"
        return [Row(spec.name, spec.point, "", failed, str(error)[:160], None)]
    if sampler is not None:
        peak = max([start_mib, *sampler.rss_mib])
        add_note(rows[-1], f"server RSS {start_mib:.0f} MiB, peak {peak:.0f} MiB")
    return rows


def add_note(row: Row, note: str) -> None:
    row.notes = f"{row.notes}; {note}" if row.notes else note


def recovery(target: Target, cap_s: float = 900.0) -> str:
    """How long until the server makes a small image again (its engine may still be busy with
    the work of a client that left)."""
    start = time.monotonic()
    probe = {"prompt": "probe", **cases.FAST}
    answers: list[str] = []
    while time.monotonic() - start < cap_s:
        _, status, _ = cases.post_json(target, "/v1/images/generations", probe, timeout_s=60)
        if status == "200":
            return (
                f"a small generation got 200 again {time.monotonic() - start:.0f} s later "
                f"(answers before: {', '.join(sorted(set(answers))) or 'none'})"
            )
        answers.append(status)
        time.sleep(2)
    return f"no 200 for a small generation within {cap_s:.0f} s"


def run_cases(target: Target, specs: list[CaseSpec], server: psutil.Process | None) -> list[Row]:
    """Every case of `specs`, the waiting ones beside the others; rows in `specs`' order."""
    found: dict[str, list[Row]] = {}
    waiting = [spec for spec in specs if spec.waits]
    with ThreadPoolExecutor(max(1, len(waiting))) as pool:
        running = {spec.name: pool.submit(run_one, spec, target, server) for spec in waiting}
        for spec in specs:
            if not spec.waits:
                found[spec.name] = run_one(spec, target, server)
        for name, rows in running.items():
            found[name] = rows.result()
    return [row for spec in specs for row in found[spec.name]]


def server_flags(adapter: Path) -> list[str]:
    return [
        "--api-key", API_KEY,
        "--enable-lora", "--max-loras", str(MAX_LORAS), "--lora-modules", f"style={adapter}",
        "--allowed-media-domains", "127.0.0.1",
    ]  # fmt: skip


def build_adapter(folder: Path) -> Path:
    from testing.tiny_lora import build_tiny_lora
    from vllm_omni_images.tiny_model import ensure_tiny_model

    return build_tiny_lora(ensure_tiny_model(), folder / "style", seed=1)


def measure(args: Any, specs: list[CaseSpec]) -> tuple[list[Row], float]:
    workdir = Path(tempfile.mkdtemp(prefix="adversarial-"))
    adapter = build_adapter(workdir)

    def make_target(base_url: str) -> Target:
        return Target(
            base_url=base_url,
            headers={"Authorization": f"Bearer {args.api_key}"},
            workdir=workdir,
            adapter_source=adapter,
            max_cpu_loras=MAX_LORAS,
            timeout_s=args.timeout,
            slow_client_cap_s=args.slow_client_cap,
        )

    start = time.perf_counter()
    if args.base_url:
        port = int(args.base_url.rsplit(":", 1)[1].strip("/"))
        rows = run_cases(make_target(args.base_url), specs, listener(port))
        return rows, time.perf_counter() - start
    port = free_port()
    command = vllm_serve_command(args.model, port, *server_flags(adapter))
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with running_server(command, port, workdir / "serve.log", env=env) as base_url:
        print(f"server up after {time.perf_counter() - start:.0f} s; log: {workdir / 'serve.log'}")
        start = time.perf_counter()
        rows = run_cases(make_target(base_url), specs, listener(port))
    return rows, time.perf_counter() - start


def results_path(label: str) -> Path:
    return RESULTS_DIR / f"adversarial_{label}.json"


def save(label: str, rows: list[Row], wall_s: float, model: str) -> Path:
    """Write (or update, for the cases run) `adversarial_<label>.json`."""
    path = results_path(label)
    old = json.loads(path.read_text()) if path.exists() else {"runs": [], "rows": []}
    ran = {row.case.split(":")[0] for row in rows}
    kept = [row for row in old["rows"] if row["case"].split(":")[0] not in ran]
    order = {spec.name: index for index, spec in enumerate(CASES)}
    merged = sorted(
        kept + [row.to_json() for row in rows],
        key=lambda row: order.get(row["case"].split(":")[0], len(order)),
    )
    info = machine()
    run = {
        "command": run_description("benchmarks.adversarial", info),
        "server": f"vllm serve {model} --task image " + " ".join(server_flags(Path("<tiny LoRA>"))),
        "cases": sorted(ran),
        "wall_s": round(wall_s, 1),
        "machine": info,
    }
    results = {"label": label, "runs": [*old["runs"], run], "rows": merged}
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--label", choices=LABELS, default="after")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--quick", action="store_true", help="only the cases of a few seconds")
    parser.add_argument("--timeout", type=float, default=200.0, help="seconds per answer")
    parser.add_argument("--slow-client-cap", type=float, default=Target.slow_client_cap_s)
    parser.add_argument("--base-url", help="a server started with this module's flags")
    parser.add_argument("--api-key", default=API_KEY)
    parser.add_argument("--table", action="store_true", help="only rewrite adversarial.md")
    args = parser.parse_args()
    if not args.table:
        specs = select(args.cases, args.quick)
        rows, wall_s = measure(args, specs)
        print(f"wrote {save(args.label, rows, wall_s, args.model)} ({wall_s:.0f} s)")
    from benchmarks.adversarial_table import write_table

    print(f"wrote {write_table()}")


def select(names: str | None, quick: bool) -> list[CaseSpec]:
    specs = [spec for spec in CASES if spec.quick or not quick]
    if names:
        wanted = set(names.split(","))
        unknown = wanted - {spec.name for spec in CASES}
        if unknown:
            sys.exit(f"unknown cases: {', '.join(sorted(unknown))}")
        specs = [spec for spec in specs if spec.name in wanted]
    return specs


if __name__ == "__main__":
    main()
