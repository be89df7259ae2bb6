"""The diffusers engine on the real tiny Qwen-Image pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_omni_images.engine.base import EngineRequest, ModelDefaults
from vllm_omni_images.engine.batching import BatchingEngine
from vllm_omni_images.engine.diffusers_runner import DiffusersRunner, split_per_request
from vllm_omni_images.engine.errors import (
    EngineError,
    EngineOutOfMemoryError,
    GenerationCancelled,
)
from vllm_omni_images.engine.model_folder import read_defaults
from vllm_omni_images.engine.selection import create_engine
from vllm_omni_images.tiny_model import TINY_MODEL_BYTES_PER_MEGAPIXEL


def request(prompt: str = "a red fox", seeds: tuple[int, ...] = (1,), **knobs) -> EngineRequest:
    values = {"width": 64, "height": 64, "num_inference_steps": 2, **knobs}
    return EngineRequest(prompt=prompt, seeds=seeds, **values)


def test_defaults_come_from_the_model_folder(tiny_runner: DiffusersRunner) -> None:
    assert tiny_runner.defaults == ModelDefaults(
        width=256,
        height=256,
        num_inference_steps=4,
        size_multiple=16,
        max_side=98_304,  # Qwen-Image's RoPE table (model_folder.max_side)
        min_steps=2,
        supports_partial_images=True,
        bytes_per_megapixel=TINY_MODEL_BYTES_PER_MEGAPIXEL,  # measured (memory_admission)
    )


def test_without_a_defaults_file_the_pipeline_decides(
    tiny_runner: DiffusersRunner, tmp_path: Path
) -> None:
    # Qwen-Image's own: 128 latent pixels x 8, 50 steps, sizes in multiples of 8 x 2x2 patches.
    # Its scheduler stretches the schedule to a terminal shift: one step would be 0/0.
    assert read_defaults(tiny_runner.pipeline, str(tmp_path)) == ModelDefaults(
        width=1024,
        height=1024,
        num_inference_steps=50,
        size_multiple=16,
        max_side=98_304,  # read from the loaded transformer's config
        min_steps=2,
    )


def test_one_step_of_a_terminal_shift_scheduler_is_a_blank_image(
    tiny_runner: DiffusersRunner,
) -> None:
    """Why `min_steps` is 2 for Qwen-Image's scheduler: diffusers makes a black image of one."""
    [[one]] = tiny_runner.run([request(num_inference_steps=1)])
    [[two]] = tiny_runner.run([request(num_inference_steps=2)])
    assert np.asarray(one).max() == 0 and np.asarray(two).std() > 10


def test_one_call_serves_every_request_of_a_batch(tiny_runner: DiffusersRunner) -> None:
    batch = [request("a red fox", (1, 2)), request("a blue boat", (3,))]
    fox, boat = tiny_runner.run(batch)
    assert len(fox) == 2 and len(boat) == 1
    assert all(image.size == (64, 64) and image.mode == "RGB" for image in [*fox, *boat])
    [[fox_1]] = tiny_runner.run([request("a red fox", (1,))])
    assert np.abs(np.asarray(fox_1, np.int16) - np.asarray(fox[0], np.int16)).max() <= 1


def test_size_follows_the_request(tiny_runner: DiffusersRunner) -> None:
    [[image]] = tiny_runner.run([request(width=96, height=48)])
    assert image.size == (96, 48)


def test_step_callback_sees_every_step(tiny_runner: DiffusersRunner) -> None:
    steps: list[tuple[int, int]] = []
    tiny_runner.run([request(num_inference_steps=3)], on_step=lambda s, t: steps.append((s, t)))
    assert steps == [(0, 3), (1, 3), (2, 3)]


def test_a_cancelling_callback_stops_the_batch(tiny_runner: DiffusersRunner) -> None:
    steps: list[int] = []

    def cancel_after_first(step: int, total: int) -> None:
        steps.append(step)
        raise GenerationCancelled()

    with pytest.raises(GenerationCancelled):
        tiny_runner.run([request(num_inference_steps=4)], on_step=cancel_after_first)
    assert steps == [0]


def test_incompatible_requests_are_refused(tiny_runner: DiffusersRunner) -> None:
    with pytest.raises(ValueError, match="share size"):
        tiny_runner.run([request(width=64), request(width=128)])
    with pytest.raises(ValueError, match="share size"):
        tiny_runner.run([request(), request(negative_prompt="blurry")])


def test_true_cfg_with_a_negative_prompt_changes_the_image(tiny_runner: DiffusersRunner) -> None:
    [[plain]] = tiny_runner.run([request()])
    [[guided]] = tiny_runner.run([request(negative_prompt="blurry", true_cfg_scale=4.0)])
    assert np.abs(np.asarray(plain, np.int16) - np.asarray(guided, np.int16)).max() > 1


class RaisingPipeline:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, **kwargs: object) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), EngineOutOfMemoryError),
        (MemoryError(), EngineOutOfMemoryError),
        (RuntimeError("shape mismatch"), EngineError),
    ],
)
def test_pipeline_failures_become_engine_errors(
    tiny_runner: DiffusersRunner,
    monkeypatch: pytest.MonkeyPatch,
    raised: BaseException,
    expected: type[EngineError],
) -> None:
    monkeypatch.setattr(tiny_runner, "_pipe", RaisingPipeline(raised))
    with pytest.raises(expected) as caught:
        tiny_runner.run([request()])
    assert caught.value.__cause__ is raised


def test_the_server_loads_the_embedded_model_by_name(tiny_model_dir: Path, serve_parser) -> None:
    from vllm_omni_images.server.launcher import load_engine

    args = serve_parser.parse_args(["tiny-qwen-image", "--task", "image"])
    args.model = args.model_tag
    engine = load_engine(args)
    assert isinstance(engine, BatchingEngine)  # the diffusers engine batches for its runner
    assert isinstance(engine.runner, DiffusersRunner)
    assert engine.runner.model_path == str(tiny_model_dir)


def test_a_missing_model_folder_fails_to_load(tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 - diffusers' own error type varies by cause
        create_engine(str(tmp_path / "nothing-here"), "diffusers", device="cpu")


def test_a_bad_pipeline_result_is_an_error_not_a_misdelivery() -> None:
    """The count is checked where the images are made (moved here from the batching engine and
    admission): an image short fails the call cleanly, never gives an image to another request."""
    batch = [request(seeds=(1, 2)), request(seeds=(3,))]
    image = Image.new("RGB", (8, 8))
    assert [len(images) for images in split_per_request(batch, [image] * 3)] == [2, 1]
    with pytest.raises(EngineError, match="returned 2 images, expected 3"):
        split_per_request(batch, [image] * 2)
