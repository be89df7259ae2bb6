"""`usage`: prompt tokens by the served model's tokenizer (`engine/prompt_tokens.py`), images
in latent patches (`images/usage.py`)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from vllm_omni_images.engine.base import EngineRequest
from vllm_omni_images.engine.prompt_tokens import NO_TOKENIZER, PromptTokenCounter
from vllm_omni_images.images.usage import image_usage


@pytest.fixture(scope="module")
def tokenizer_folder(tiny_model_dir: Path) -> Path:
    return tiny_model_dir / "tokenizer"


def work(**fields: object) -> EngineRequest:
    values: dict = {"prompt": "a cat", "seeds": (1,), "width": 64, "height": 32,
                    "num_inference_steps": 2, "request_id": "r", **fields}  # fmt: skip
    return EngineRequest(**values)


def test_the_last_tokenizer_of_a_folder_counts(tokenizer_folder: Path, tmp_path: Path) -> None:
    """FLUX's and SD3's last tokenizer is T5's, which reads the longest prompt."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    tokenizer.save_pretrained(tmp_path / "tokenizer_2")
    (tmp_path / "tokenizer").mkdir()  # a first tokenizer that cannot be read: never asked
    counter = PromptTokenCounter.of_folder(str(tmp_path))
    assert counter.available
    for text in ("a cat", "café au lait", "a lighthouse at dawn, oil on canvas"):
        assert counter.count(text) == len(tokenizer(text, add_special_tokens=False).input_ids)
    assert 0 < counter.count("a cat") < counter.count("a lighthouse at dawn, oil on canvas")
    assert counter.count("") == 0


def test_a_folder_without_a_tokenizer_counts_nothing(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vllm_omni_images.engine.prompt_tokens"):
        counter = PromptTokenCounter.of_folder(str(tmp_path))
    assert not counter.available and counter.count("a cat") == 0
    assert "no tokenizer folder" in caplog.text


def test_a_pipelines_counter_is_a_copy_that_counts_beside_the_pipeline(
    tokenizer_folder: Path,
) -> None:
    """The pipeline's tokenizer runs on the engine thread while the event loop counts: a
    shared fast tokenizer raises "Already borrowed" (a 500 seen in a concurrent e2e test)."""

    class Pipeline:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)

    counter = PromptTokenCounter.of_pipeline(Pipeline())
    text = "a lighthouse " * 2000
    errors: list[BaseException] = []

    def engine_thread() -> None:
        try:
            for _ in range(50):  # as a pipeline encodes: setting padding and truncation
                Pipeline.tokenizer(text, padding="max_length", max_length=4096, truncation=True)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=engine_thread)
    thread.start()
    counts = {counter.count(text) for _ in range(50)}
    thread.join()
    assert errors == [] and counts == {PromptTokenCounter(Pipeline.tokenizer).count(text)}
    assert PromptTokenCounter.of_pipeline(object()) is not None
    assert not PromptTokenCounter.of_pipeline(object()).available


class Letters(PromptTokenCounter):
    """A counter whose tokens are letters, for readable sums."""

    def count(self, text: str) -> int:
        return sum(character.isalpha() for character in text)


def test_usage_of_a_generation_an_edit_and_a_variation() -> None:
    generated = image_usage(work(negative_prompt="dog", seeds=(1, 2, 3)), Letters(), 16)
    # 64x32 in 16-pixel patches: 4 x 2 = 8 per image.
    assert generated.model_dump() == {
        "input_tokens": 4 + 3,
        "input_tokens_details": {"text_tokens": 7, "image_tokens": 0},
        "output_tokens": 3 * 8,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 24},
        "total_tokens": 7 + 24,
    }
    edited = image_usage(work(image=Image.new("RGB", (64, 32))), Letters(), 16)
    assert edited.input_tokens_details.image_tokens == 8  # the input, once, at its size
    assert (edited.input_tokens, edited.output_tokens, edited.total_tokens) == (12, 8, 20)
    varied = image_usage(work(prompt="", image=Image.new("RGB", (64, 32))), NO_TOKENIZER, 8)
    assert varied.input_tokens_details.text_tokens == 0
    assert (varied.input_tokens, varied.output_tokens) == (32, 32)  # 8-pixel patches: 8 x 4
