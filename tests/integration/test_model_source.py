"""vLLM's model-loading flags on a hub id, offline: `--download-dir` is the hub cache searched,
`--revision` the snapshot taken (a hub cache laid out by hand holds the tiny model)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from vllm_omni_images.engine.errors import EngineUnavailableError
from vllm_omni_images.engine.model_source import ModelSource, local_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub cache with `org/tiny` at revision `v2` only (no `main`)."""
    cache = tmp_path_factory.mktemp("hub-cache")
    repo = cache / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "v2").write_text(COMMIT)
    return cache


def test_a_hub_id_is_found_at_its_revision_in_the_download_dir(hub_cache: Path) -> None:
    folder = local_model_path("org/tiny", ModelSource(revision="v2", download_dir=str(hub_cache)))
    assert Path(folder) == hub_cache / "models--org--tiny" / "snapshots" / COMMIT
    with pytest.raises(OSError, match="revision"):  # no `main` in this cache, and offline
        local_model_path("org/tiny", ModelSource(download_dir=str(hub_cache)))


def test_a_local_folder_is_served_as_given(tiny_model_dir: Path) -> None:
    assert local_model_path(str(tiny_model_dir), ModelSource(revision="v9")) == str(tiny_model_dir)


def test_vllm_serve_loads_the_revision_from_the_download_dir(serve_parser, hub_cache: Path) -> None:
    from vllm_omni_images.server.launcher import load_engine

    flags = ["--image-engine", "diffusers", "--download-dir", str(hub_cache)]
    args = serve_parser.parse_args(["org/tiny", "--task", "image", *flags, "--revision", "v2"])
    args.model = args.model_tag
    engine = load_engine(args)
    try:
        assert engine.defaults.width == 256  # the tiny model's own defaults
    finally:
        asyncio.run(engine.close())
    missing = serve_parser.parse_args(["org/tiny", "--task", "image", *flags])
    missing.model = missing.model_tag
    with pytest.raises(EngineUnavailableError, match="must be a diffusers pipeline folder"):
        load_engine(missing)
