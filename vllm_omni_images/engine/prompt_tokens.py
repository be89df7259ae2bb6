"""`PromptTokenCounter`: a prompt's tokens as the served model's text encoder reads them, for the
`usage` of a response (`images/usage.py`). Of a pipeline with several text encoders, the one
that reads the longest prompt counts: the last tokenizer (`tokenizer_3`, then `tokenizer_2`,
then `tokenizer`): T5 for FLUX.1 and SD3, Qwen for Qwen-Image and Z-Image."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TOKENIZER_NAMES = ("tokenizer_3", "tokenizer_2", "tokenizer")
"""A diffusers pipeline's tokenizer components (and folders), the counting one first."""


class PromptTokenCounter:
    """Counts text with one tokenizer, from one thread at a time (the event loop's), its
    special tokens and the pipeline's prompt template left out (what the client wrote, not
    what the pipeline wraps it in); with none (`None`), every text counts 0 tokens."""

    def __init__(self, tokenizer: Any = None) -> None:
        self._tokenizer = tokenizer

    @property
    def available(self) -> bool:
        return self._tokenizer is not None

    def count(self, text: str) -> int:
        """The number of tokens of `text` (0 for an empty text or without a tokenizer)."""
        if self._tokenizer is None or not text:
            return 0
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    @classmethod
    def of_pipeline(cls, pipeline: Any) -> PromptTokenCounter:
        """The counter of a copy of a loaded diffusers pipeline's tokenizer (nothing more is
        read): a fast tokenizer is not to be used by two threads at once ("Already borrowed"),
        and the pipeline's runs on the engine thread while this one counts on the event loop."""
        for name in TOKENIZER_NAMES:
            tokenizer = getattr(pipeline, name, None)
            if tokenizer is not None:
                return cls(copy.deepcopy(tokenizer))
        return cls()

    @classmethod
    def of_folder(cls, model_path: str) -> PromptTokenCounter:
        """The counter of a local pipeline folder's tokenizer (only its files are read); a
        folder without one, or one that cannot be read, counts 0 tokens, which the log says."""
        from transformers import AutoTokenizer

        for name in TOKENIZER_NAMES:
            folder = Path(model_path) / name
            if folder.is_dir():
                try:
                    return cls(AutoTokenizer.from_pretrained(str(folder)))
                except (OSError, ValueError) as error:
                    logger.warning(
                        "The tokenizer in %s cannot be read (%s): usage counts no text tokens.",
                        folder,
                        error,
                    )
                    return cls()
        logger.warning(
            "%s has no tokenizer folder (%s): usage counts no text tokens.",
            model_path,
            ", ".join(TOKENIZER_NAMES),
        )
        return cls()


NO_TOKENIZER = PromptTokenCounter()
"""The counter of an engine that has no tokenizer: every text counts 0 tokens."""
