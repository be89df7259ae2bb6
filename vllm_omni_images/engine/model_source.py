"""Where the served model's files come from (vLLM's model-loading flags), for either engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    revision: str | None = None
    """A branch, tag or commit of the hub repository (`--revision`)."""
    download_dir: str | None = None
    """The hub cache to use instead of the default (`--download-dir`)."""
    token: str | bool | None = None
    """The hub token (`--hf-token`: a token, or true for the stored one)."""
    trust_remote_code: bool = False
    """Allow a pipeline's own code from its repository (`--trust-remote-code`)."""


def local_model_path(model: str, source: ModelSource | None = None) -> str:
    """The folder of `model`: a local folder as given, or a hub id's download."""
    source = source or ModelSource()
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser())
    from diffusers import DiffusionPipeline

    folder = DiffusionPipeline.download(
        model,
        revision=source.revision,
        cache_dir=source.download_dir,
        token=source.token,
        trust_remote_code=source.trust_remote_code,
    )
    logger.info("Model %s (revision %s) is in %s", model, source.revision or "main", folder)
    return str(folder)
