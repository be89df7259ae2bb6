"""How the batching engine plans its calls, as pure functions: batch formation, the company
wait, and the halves an out-of-memory call is retried in."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from tests.support.engines import req
from vllm_omni_images.engine.base import LoRAAdapter
from vllm_omni_images.engine.batch_planning import (
    NO_BATCH_YET,
    BatchSlice,
    LastAdapter,
    adapter_of,
    batch_capacity,
    batch_key,
    company_wait_s,
    form_batch,
    split_in_halves,
)

# Batch formation

STYLE = LoRAAdapter("style", 1, "/adapters/style")
OTHER = LoRAAdapter("other", 2, "/adapters/other")


def test_form_batch_groups_compatible_requests_up_to_max_images() -> None:
    assert form_batch([req(i) for i in range(6)], max_images=4) == [0, 1, 2, 3]
    assert form_batch([req(i) for i in range(3)], max_images=4) == [0, 1, 2]
    assert form_batch([], max_images=4) == []


def test_form_batch_keeps_incompatible_requests_apart() -> None:
    queue = [req(1), req(2, width=128), req(3), req(4, width=128), req(5)]
    assert form_batch(queue, max_images=4) == [0, 2, 4]
    assert form_batch(queue[1:], max_images=4) == [0, 2]


def test_form_batch_counts_images_and_skips_requests_that_do_not_fit() -> None:
    assert form_batch([req(1, 2), req(3, 4), req(5)], max_images=4) == [0, 1]
    assert form_batch([req(1, 2, 3), req(4, 5), req(6)], max_images=4) == [0, 2]
    assert form_batch([req(1), req(2, 3, 4, 5), req(6, 7)], max_images=4) == [0, 2]


def test_form_batch_runs_an_oversized_request_alone_and_never_splits_it() -> None:
    assert form_batch([req(*range(6)), req(9)], max_images=4) == [0]
    assert form_batch([req(1), req(*range(10, 16)), req(2)], max_images=4) == [0, 2]


def test_form_batch_always_starts_with_the_oldest_request() -> None:
    odd = req(1, width=96)
    assert form_batch([odd, *(req(i) for i in range(10, 20))], max_images=4) == [0]


@pytest.mark.parametrize(
    "change",
    [
        {"width": 128},
        {"height": 128},
        {"num_inference_steps": 3},
        {"true_cfg_scale": 4.0},
        {"guidance_scale": 1.0},
        {"negative_prompt": ""},
    ],
)
def test_each_batch_key_field_separates_batches(change: dict[str, Any]) -> None:
    base = req(1)
    other = dataclasses.replace(base, seeds=(2,), **change)
    assert batch_key(base) != batch_key(other)
    assert form_batch([base, other], max_images=4) == [0]


def test_prompts_negative_texts_and_seeds_may_differ_within_a_batch() -> None:
    a = req(1, prompt="a fox", negative_prompt="blurry")
    b = req(2, 3, prompt="a cat", negative_prompt="dark")
    assert batch_key(a) == batch_key(b)
    assert form_batch([a, b], max_images=4) == [0, 1]


# The company wait


def test_company_wait_counts_from_the_head_arrival() -> None:
    assert company_wait_s(2, 4, head_arrival=10.0, now=10.002, delay_s=0.005) == pytest.approx(
        0.003
    )
    assert company_wait_s(2, 4, head_arrival=10.0, now=11.0, delay_s=0.005) == 0.0
    assert company_wait_s(4, 4, head_arrival=10.0, now=10.0, delay_s=0.005) == 0.0
    assert company_wait_s(6, 4, head_arrival=10.0, now=10.0, delay_s=0.005) == 0.0


# Out of memory: the halves to retry in


def test_split_in_halves_cuts_at_the_middle_image() -> None:
    four = [BatchSlice(index, 0, 1) for index in range(4)]
    assert split_in_halves(four) == (four[:2], four[2:])
    # A request across the middle goes to both halves, its seeds in order.
    assert split_in_halves([BatchSlice(0, 0, 1), BatchSlice(1, 0, 3)]) == (
        [BatchSlice(0, 0, 1), BatchSlice(1, 0, 1)],
        [BatchSlice(1, 1, 3)],
    )
    assert split_in_halves([BatchSlice(0, 0, 4)]) == ([BatchSlice(0, 0, 2)], [BatchSlice(0, 2, 4)])
    # An odd count: the first half is the larger; a part of a request splits again.
    assert split_in_halves([BatchSlice(0, 2, 5)]) == ([BatchSlice(0, 2, 4)], [BatchSlice(0, 4, 5)])
    with pytest.raises(ValueError):
        split_in_halves([BatchSlice(0, 0, 1)])


def test_split_in_halves_keeps_every_image_once_in_order() -> None:
    rng = random.Random(3)
    for _ in range(200):
        slices = [BatchSlice(i, 0, rng.randint(1, 5)) for i in range(rng.randint(1, 6))]
        if sum(part.num_images for part in slices) < 2:
            continue
        first, second = split_in_halves(slices)
        images = [(p.index, seed) for p in first + second for seed in range(p.start, p.stop)]
        assert images == [(p.index, seed) for p in slices for seed in range(p.start, p.stop)]
        sizes = [sum(part.num_images for part in half) for half in (first, second)]
        assert 0 <= sizes[0] - sizes[1] <= 1


# LoRA adapters


def test_a_batch_runs_one_adapter_at_one_strength() -> None:
    queue = [
        req(1),
        req(2, lora=STYLE),
        req(3),
        req(4, lora=STYLE),
        req(5, lora=STYLE, lora_scale=0.5),
    ]
    assert form_batch(queue, max_images=8) == [0, 2]
    assert form_batch(queue[1:], max_images=8) == [0, 2]
    assert batch_key(req(1, lora_scale=0.5)) == batch_key(req(1))  # no adapter: no strength


def test_adapters_take_turns_so_none_waits_behind_a_run_of_another() -> None:
    """Ten requests of one adapter, then one of another and one of the base model: after a
    batch of the first adapter, the oldest request of another leads the next batch."""
    queue = [req(i, lora=STYLE) for i in range(10)] + [req(10, lora=OTHER), req(11)]
    order: list[tuple[int, ...]] = []
    last: LastAdapter = NO_BATCH_YET
    while queue:
        indices = form_batch(queue, max_images=2, last_adapter=last)
        last = adapter_of(queue[indices[0]])
        order.append(last)
        queue = [r for i, r in enumerate(queue) if i not in indices]
    assert order[:4] == [(1,), (2,), (1,), ()]  # the base model after the two adapters
    assert order.count((1,)) == 5 and order[4:] == [(1,), (1,), (1,)]


def test_a_lone_adapter_keeps_its_turns() -> None:
    queue = [req(1, lora=STYLE), req(2, lora=STYLE)]
    assert form_batch(queue, max_images=1, last_adapter=(STYLE.adapter_id,)) == [0]


def test_the_pixel_budget_caps_a_batch_below_its_image_count() -> None:
    big = {"width": 128, "height": 128}  # 4 of req's 64x64 images each
    assert batch_capacity(req(1, **big), 8, None) == 8
    assert batch_capacity(req(1, **big), 8, 3 * 128 * 128) == 3
    assert batch_capacity(req(1, **big), 8, 100) == 1  # alone, whatever its size
    queue = [req(1, **big), req(2, 3, **big), req(4, **big), req(5), req(6)]
    assert form_batch(queue, max_images=8, max_pixels=2 * 128 * 128) == [0, 2]
    assert form_batch(queue, max_images=8, max_pixels=3 * 128 * 128) == [0, 1]
    # Smaller images of the same budget batch more (and the leader's size decides).
    assert form_batch(queue[3:], max_images=8, max_pixels=2 * 128 * 128) == [0, 1]
    assert form_batch([req(*range(6), **big)], max_images=8, max_pixels=128 * 128) == [0]
