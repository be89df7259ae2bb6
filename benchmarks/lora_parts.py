"""The parts of `benchmarks.lora`: single pipeline calls straight on the runners (calls of 1 to
4 images, an adapter's and a stack's own compute, the cost of a switch), and a workload's
throughput predicted from them and the calls the engine formed for it; a workload's calls by
their size and adapters; and the estimate for mixed-adapter batches. The requests, stacks and
constants that the benchmark shares with them are here too."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from benchmarks.report import median
from vllm_omni_images.engine.base import (
    AdapterStack,
    EngineRequest,
    LoRAAdapter,
    ScaledAdapter,
    StackKey,
)
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner

ADAPTERS = 3
MAX_BATCH = 4
"""The served default (`--image-max-batch-size`)."""
LORA_OFF = "off"
"""The runner without LoRA (a server without `--enable-lora`)."""
SETTINGS = ("1", str(ADAPTERS))
"""`--max-loras` of the LoRA runners: one adapter loaded at a time, or all of them."""
STACK_SCALES = (0.8, 0.6)
"""A stack of two as front-ends stack them: a style at 0.8 plus a character at 0.6."""
STACKED = "stack"
"""The switch probe between two stacks of two (on the all-loaded runner)."""
NONE_YET: Literal["none yet"] = "none yet"
SWITCH_PROBE = (64, 64), 1
"""Size and steps of the calls that time a switch: the switch costs the same whatever the call,
and a cheap call keeps the machine's noise small beside it."""


def single(adapter: LoRAAdapter) -> AdapterStack:
    """`adapter` alone, as trained."""
    return (ScaledAdapter(adapter),)


def stack_of_two(adapters: Sequence[LoRAAdapter], first: int = 0) -> AdapterStack:
    """Adapters `first` and `first + 1` together, at `STACK_SCALES`."""
    pair = (adapters[first % len(adapters)], adapters[(first + 1) % len(adapters)])
    return tuple(ScaledAdapter(a, s) for a, s in zip(pair, STACK_SCALES, strict=True))


def request(index: int, stack: AdapterStack, size: tuple[int, int], steps: int) -> EngineRequest:
    return EngineRequest(
        prompt=f"benchmark request {index}",
        seeds=(index,),
        width=size[0],
        height=size[1],
        num_inference_steps=steps,
        loras=stack,
    )


@dataclass
class Call:
    """One pipeline call the engine made, timed on the engine thread."""

    images: int
    stack: StackKey
    """Its adapters (`()`: the base model)."""
    previous: StackKey | Literal["none yet"]
    """The adapters of the runner's call before."""
    seconds: float

    @property
    def switched(self) -> bool:
        return self.previous != NONE_YET and self.previous != self.stack


@dataclass
class Parts:
    """Single calls straight on the runners, seconds, one entry per pair (interleaved); and
    the denoising steps of the calls of 4 (each step after the first, from the step before)."""

    steps: int
    times: dict[str, list[float]] = field(default_factory=dict)
    step_times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def median(self, key: str) -> float:
        return median(self.times[key])

    def difference(self, key: str, minus: str) -> float:
        """The median of the pairwise differences, at least 0."""
        pairs = zip(self.times[key], self.times[minus], strict=True)
        return max(median([a - b for a, b in pairs]), 0.0)

    def compute(self, adapters: int) -> float:
        """The own compute of `adapters` (0, 1 or 2: none, one, a stack of two) in a call of 4:
        their LoRA branches run in the transformer only, so the denoising step's median time
        with them minus without, times the steps (a step is short: other work on the machine
        hits it less often than a whole call)."""
        if adapters == 0:
            return 0.0
        key = "adapter 4" if adapters == 1 else "stack 4"
        base, with_them = (median(self.step_times[k]) for k in (f"base {MAX_BATCH}", key))
        return max(with_them - base, 0.0) * self.steps

    @property
    def adapter(self) -> float:
        return self.compute(1)

    def switch(self, probe: str) -> float:
        """A switch measured by `probe`: a setting's adapter-to-adapter switch, or `STACKED`
        (stack to stack, all loaded); switched minus same, pairwise."""
        return self.difference(f"{probe} switched", f"{probe} same")

    def switch_between(self, setting: str, previous: StackKey, stack: StackKey) -> float:
        """A switch from `previous` to `stack`: `STACKED` where either is a stack (it is one
        `set_adapters` of both, all loaded); the setting's adapter-to-adapter switch between
        single adapters; and between the base model and an adapter (`enable_lora` and
        `set_adapters`, or `disable_lora`) the all-loaded runner's switch."""
        if len(previous) > 1 or len(stack) > 1:
            return self.switch(STACKED)
        return self.switch(setting if previous and stack else SETTINGS[-1])


def measure_parts(
    runners: dict[str, DiffusersRunner],
    adapters: Sequence[LoRAAdapter],
    size: tuple[int, int],
    steps: int,
    pairs: int,
    switch_pairs: int,
) -> Parts:
    """`pairs` times, interleaved: base calls of 1 to 4 images (the runner without LoRA) and
    calls of 4 on one adapter and on a stack of two, each on the adapters of the call before
    (all loaded), at the workload's size and steps. Then `switch_pairs` times per setting,
    `SWITCH_PROBE` calls of 1 image: one on the adapter of the call before (`same`, after an
    untimed call on it), then one on the next adapter (`switched`); and the same between two
    stacks of two (`STACKED`, on the all-loaded runner)."""
    parts = Parts(steps)

    def timed(key: str, runner: DiffusersRunner, batch: list[EngineRequest]) -> None:
        ends: list[float] = []
        start = time.perf_counter()
        runner.run(batch, on_step=lambda step, total: ends.append(time.perf_counter()))
        parts.add(key, time.perf_counter() - start)
        if len(batch) == MAX_BATCH:
            steps = parts.step_times.setdefault(key, [])
            steps += [b - a for a, b in itertools.pairwise(ends)]

    kept = runners[SETTINGS[-1]]
    kept.run([request(0, single(adapters[0]), size, steps)])
    kept.run([request(0, stack_of_two(adapters), size, steps)])
    for _ in range(pairs):
        for n in range(1, MAX_BATCH + 1):
            timed(f"base {n}", runners[LORA_OFF], [request(i, (), size, steps) for i in range(n)])
        for key, stack in (("adapter 4", single(adapters[0])), ("stack 4", stack_of_two(adapters))):
            kept.run([request(0, stack, SWITCH_PROBE[0], SWITCH_PROBE[1])])  # no switch timed
            timed(key, kept, [request(i, stack, size, steps) for i in range(MAX_BATCH)])
    small, small_steps = SWITCH_PROBE

    def probe(key: str, runner: DiffusersRunner, same: AdapterStack, other: AdapterStack) -> None:
        runner.run([request(0, same, small, small_steps)])  # untimed: `same` is the call before
        timed(f"{key} same", runner, [request(0, same, small, small_steps)])
        timed(f"{key} switched", runner, [request(0, other, small, small_steps)])

    for pair in range(switch_pairs):
        for setting in SETTINGS:
            one, other = (single(adapters[(pair + n) % ADAPTERS]) for n in (0, 1))
            probe(setting, runners[setting], one, other)
        one, other = (stack_of_two(adapters, (pair + n) % 2) for n in (0, 1))
        probe(STACKED, kept, one, other)
    return parts


def parts_table(parts: Parts) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in range(1, MAX_BATCH + 1):
        call = parts.median(f"base {n}")
        rows.append(
            {"call": f"base model, {n} image(s)", "ms": ms(call), "per_image": ms(call / n)}
        )
    for key, what in (("adapter 4", "one adapter"), ("stack 4", "a stack of two")):
        call = parts.median(key)
        rows.append({"call": f"{what}, 4 images", "ms": ms(call), "per_image": ms(call / 4)})
    for key, what in (
        (f"base {MAX_BATCH}", "base model"),
        ("adapter 4", "one adapter"),
        ("stack 4", "a stack of two"),
    ):
        step = median(parts.step_times[key])
        rows.append({"call": f"a denoising step of 4 images, {what}", "ms": ms(step)})
    small, small_steps = SWITCH_PROBE
    probe = f"1 image at {small[0]}x{small[1]}, {small_steps} step"
    for label, same, switched, prefix in [
        *(
            (s, "same adapter as the call before", "switch", f"max_loras {s}, {probe}")
            for s in SETTINGS
        ),
        (
            STACKED,
            "same stack of two as the call before",
            "switch from another stack of two",
            f"max_loras {SETTINGS[-1]}, {probe}",
        ),
    ]:
        for key, what in (("same", same), ("switched", switched)):
            rows.append(
                {
                    "call": f"{prefix}, {what}",
                    "ms": ms(parts.median(f"{label} {key}")),
                    "per_image": "",
                }
            )
    return rows


def predicted_ratio(setting: str, calls: list[Call], parts: Parts) -> float:
    """A workload's throughput over all-base's, predicted from its calls as the engine formed
    them: each costs a base call of its size, plus its adapters' own compute
    (`Parts.compute`), plus a switch where its adapters differ from the call before's
    (`Parts.switch_between`)."""
    seconds = 0.0
    for call in calls:
        seconds += parts.median(f"base {call.images}")  # one-image requests: never above 4
        seconds += parts.compute(len(call.stack))
        if call.switched and call.previous != NONE_YET:
            seconds += parts.switch_between(setting, call.previous, call.stack)
    images = sum(call.images for call in calls)
    return images * parts.median(f"base {MAX_BATCH}") / MAX_BATCH / seconds


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


def parse_size(size: str) -> tuple[int, int]:
    width, height = (int(v) for v in size.split("x"))
    return width, height


def call_breakdown(calls: Sequence[Call]) -> list[dict[str, Any]]:
    """`calls` by their images and adapters (none, one, a stack of two): how many, and the
    median time per call and per image. Within one workload's run the groups ran interleaved,
    so drift on a shared machine hits them alike: a stack's cost shows against base calls of
    the same size, and what smaller batches cost against calls of 4."""
    groups: dict[tuple[int, int], list[float]] = {}
    for call in calls:
        groups.setdefault((call.images, len(call.stack)), []).append(call.seconds)
    rows = []
    for (images, adapters), seconds in sorted(groups.items()):
        typical = median(seconds)
        rows.append(
            {
                "images": images,
                "adapters": ("base model", "one adapter", "a stack of two")[adapters],
                "calls": len(seconds),
                "ms": ms(typical),
                "per_image": ms(typical / images),
            }
        )
    return rows


def mixed_batch_estimate(
    rows: list[dict[str, Any]], parts: Parts, mixes: Sequence[tuple[str, int]]
) -> list[dict[str, Any]]:
    """An estimate, from measured parts, of mixed-adapter batches (PEFT's per-sample
    `adapter_names`) with every adapter loaded: every call holds 4 images and none switches,
    so a call costs a base call of 4 plus the adapter's cost; once (high end: LoRA branches
    cost per row) or once per distinct adapter in the call (low end: PEFT runs each adapter's
    A and B over its own rows, and on the tiny model an operation costs about the same
    whatever its rows). PEFT's own bookkeeping for mixed batches is in neither. `mixes`: the
    workloads, each with its distinct adapters."""
    by = {(r["max_loras"], r["workload"]): r for r in rows}
    base_call = parts.median(f"base {MAX_BATCH}")
    adapter = parts.adapter
    estimates = []
    for workload, distinct in mixes:
        high = base_call / (base_call + adapter)
        low = base_call / (base_call + distinct * adapter)
        now = by[(str(ADAPTERS), workload)]
        estimates.append(
            {
                "workload": workload,
                "now_measured": now["vs_all_base"],
                "now_predicted": now["predicted_vs_all_base"],
                "adapters_per_mixed_call": distinct,
                "mixed_estimate": f"{low:.2f}-{high:.2f}",
                "mixed_over_now_predicted": f"{low / now['predicted_vs_all_base']:.2f}-"
                f"{high / now['predicted_vs_all_base']:.2f}",
            }
        )
    return estimates
