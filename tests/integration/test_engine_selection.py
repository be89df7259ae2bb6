"""`--image-engine`: what `auto` picks and why, and vllm-omni's flags on `vllm serve --task image`.

The flag tests hold our copies of vllm-omni's flags against vllm-omni's own `vllm serve --omni`
parser and its config classes, so a rename there fails here.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from vllm_omni_images.engine import selection
from vllm_omni_images.engine.errors import EngineUnavailableError
from vllm_omni_images.engine.selection import choose_engine
from vllm_omni_images.server.cli_args import OMNI_FLAGS, omni_options_from_args


def serve_args(serve_parser: argparse.ArgumentParser, *flags: str) -> argparse.Namespace:
    args = serve_parser.parse_args(["tiny-qwen-image", "--task", "image", *flags])
    args.model = args.model_tag
    return args


def model_folder(tmp_path: Path, class_name: str) -> Path:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return tmp_path


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine, as `auto` would see one with a CUDA GPU that vllm-omni supports."""
    monkeypatch.setattr(selection, "has_accelerator", lambda: True)
    monkeypatch.setattr(selection, "omni_platform", lambda: "CudaOmniPlatform")


# Without a GPU nothing imports vllm-omni: these run in the unit-test time budget.


def test_without_a_gpu_auto_picks_diffusers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "has_accelerator", lambda: False)
    choice = choose_engine("auto", "tiny-qwen-image")
    assert choice.name == "diffusers" and "no GPU" in choice.reason


def test_omni_without_a_gpu_runs_on_this_packages_cpu_platform(tiny_model_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    choice = choose_engine("omni", str(tiny_model_dir))
    assert choice == selection.EngineChoice("omni", "--image-engine omni on CpuOmniPlatform")


def test_diffusers_is_taken_as_asked() -> None:
    assert choose_engine("diffusers", "anything").name == "diffusers"
    with pytest.raises(ValueError, match="unknown image engine"):
        choose_engine("tensorrt", "anything")


def test_omni_flags_with_the_diffusers_engine_stop_the_server(
    serve_parser: argparse.ArgumentParser, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_omni_images.server.launcher import load_engine

    monkeypatch.setattr(selection, "has_accelerator", lambda: False)
    args = serve_args(serve_parser, "--cache-backend", "tea_cache", "--vae-use-tiling")
    with pytest.raises(EngineUnavailableError) as raised:
        load_engine(args)
    message = str(raised.value)
    assert "--cache-backend, --vae-use-tiling" in message and "no GPU" in message


def test_enforce_eager_is_no_omni_only_option(
    serve_parser: argparse.ArgumentParser, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The diffusers engine never compiles, so it honours --enforce-eager as it is."""
    from vllm_omni_images.server.launcher import load_engine

    class RunnerBuiltError(Exception):
        pass

    def runner(*args: object, **kwargs: object) -> None:
        raise RunnerBuiltError

    monkeypatch.setattr(selection, "has_accelerator", lambda: False)
    monkeypatch.setattr("vllm_omni_images.engine.diffusers_runner.DiffusersRunner", runner)
    with pytest.raises(RunnerBuiltError):
        load_engine(serve_args(serve_parser, "--enforce-eager"))


def test_a_folder_that_is_not_a_diffusers_pipeline_stops_the_server_in_one_line(
    serve_parser: argparse.ArgumentParser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_omni_images.server.launcher import load_engine

    monkeypatch.setattr(selection, "has_accelerator", lambda: False)
    (tmp_path / "config.json").write_text("{}")  # a transformers model, say
    args = serve_parser.parse_args([str(tmp_path), "--task", "image"])
    args.model = args.model_tag
    with pytest.raises(EngineUnavailableError) as raised:
        load_engine(args)
    message = str(raised.value)
    assert "model_index.json" in message and str(tmp_path) in message
    assert "diffusers pipeline folder" in message


# With a GPU, `auto` asks vllm-omni (its platform detection is faked; its registry is real).


def test_on_a_gpu_auto_picks_omni_for_a_pipeline_vllm_omni_has(
    gpu: None, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    choice = choose_engine("auto", str(tiny_model_dir))
    assert choice.name == "omni" and "QwenImagePipeline" in choice.reason


def test_on_a_gpu_auto_picks_diffusers_for_a_pipeline_vllm_omni_lacks(
    gpu: None, tmp_path: Path
) -> None:
    choice = choose_engine("auto", str(model_folder(tmp_path, "KandinskyPipeline")))
    assert choice.name == "diffusers" and "KandinskyPipeline" in choice.reason


def test_a_pipeline_registered_with_vllm_omni_counts(gpu: None, tmp_path: Path) -> None:
    from vllm_omni.diffusion.registry import register_diffusion_model

    folder = model_folder(tmp_path, "TestOnlyImagePipeline")
    assert choose_engine("auto", str(folder)).name == "diffusers"
    register_diffusion_model("TestOnlyImagePipeline", "tests.support.omni", "FakeImagePipeline")
    assert choose_engine("auto", str(folder)).name == "omni"


def test_auto_picks_diffusers_where_vllm_omni_finds_no_platform(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    monkeypatch.setattr(selection, "has_accelerator", lambda: True)
    monkeypatch.setattr(selection, "omni_platform", lambda: None)
    assert choose_engine("auto", str(tiny_model_dir)).name == "diffusers"
    with pytest.raises(EngineUnavailableError, match="--image-engine diffusers"):
        choose_engine("omni", str(tiny_model_dir))


def test_a_gpu_machine_without_vllm_omni_serves_with_diffusers(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    def no_vllm_omni() -> str | None:
        raise ModuleNotFoundError("No module named 'vllm_omni'")

    monkeypatch.setattr(selection, "has_accelerator", lambda: True)
    monkeypatch.setattr(selection, "omni_platform", no_vllm_omni)
    choice = choose_engine("auto", str(tiny_model_dir))
    assert choice.name == "diffusers" and "vllm_omni" in choice.reason
    with pytest.raises(EngineUnavailableError, match="--image-engine diffusers"):
        choose_engine("omni", str(tiny_model_dir))


def test_vllm_omni_finds_this_packages_cpu_platform_on_a_cpu_machine() -> None:
    """Through vllm-omni's own resolution and our entry point (not imported by us)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert selection.omni_platform() == "CpuOmniPlatform"


def test_the_cpu_platform_never_shadows_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_omni import platforms

    from vllm_omni_images.platforms import cpu_omni_platform_plugin

    assert cpu_omni_platform_plugin() == "vllm_omni_images.platforms.cpu.CpuOmniPlatform"
    monkeypatch.setitem(
        platforms.builtin_omni_platform_plugins,
        "cuda",
        lambda: "vllm_omni.platforms.cuda.platform.CudaOmniPlatform",
    )
    assert cpu_omni_platform_plugin() is None
    qualname = platforms.resolve_current_omni_platform_cls_qualname()
    assert qualname == "vllm_omni.platforms.cuda.platform.CudaOmniPlatform"


def test_the_choice_and_its_reason_are_logged(
    gpu: None,
    tiny_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[str] = []
    monkeypatch.setattr(
        "vllm_omni_images.engine.omni_engine.OmniEngine",
        lambda config, **_: built.append(config.model),
    )
    with caplog.at_level(logging.INFO, logger="vllm_omni_images.engine.selection"):
        selection.create_engine(str(tiny_model_dir))
    assert built == [str(tiny_model_dir)]
    assert "Image engine: omni (CudaOmniPlatform and vllm-omni serves QwenImagePipeline)" in (
        caplog.text
    )


# vllm-omni's flags


def vllm_omni_serve_parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """vllm-omni's own `vllm serve --omni` parser, built with our plugin loaded (as it is
    wherever both packages are installed)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm_omni.entrypoints.cli.serve import OmniServeCommand

    monkeypatch.setattr("sys.argv", ["vllm", "serve", "Qwen/Qwen-Image", "--omni"])
    root = FlexibleArgumentParser(prog="vllm")
    return OmniServeCommand().subparser_init(root.add_subparsers())


def test_our_flags_are_vllm_omnis_flags(
    serve_parser: argparse.ArgumentParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = {
        option: action
        for action in vllm_omni_serve_parser(monkeypatch)._actions
        for option in action.option_strings
    }
    ours = {option: action for action in serve_parser._actions for option in action.option_strings}
    for flag in OMNI_FLAGS:
        for option in flag.flags:
            assert option in theirs, f"vllm-omni has no {option} any more"
            assert theirs[option].dest == flag.config_field, option
            assert ours[option].dest == flag.dest
            if theirs[option].choices is not None:
                assert list(ours[option].choices or []) == list(theirs[option].choices or []), (
                    option
                )
    assert "--tensor-parallel-size" in theirs and "--tensor-parallel-size" in ours


def test_every_flag_reaches_vllm_omnis_engine_config(
    serve_parser: argparse.ArgumentParser, tiny_model_dir: Path
) -> None:
    from vllm_omni_images.engine.omni_requests import build_omni_config

    args = serve_args(
        serve_parser,
        *("--ulysses-degree", "2", "--ring", "2", "--cfg-parallel-size", "2"),
        *("--vae-patch-parallel-size", "2", "--tensor-parallel-size", "2"),
        *("--cache-backend", "tea_cache", "--cache-config", '{"rel_l1_thresh": 0.3}'),
        "--enable-layerwise-offload",
        *("--vae-use-tiling", "--vae-use-slicing"),
        *("--diffusion-attention-backend", "TORCH_SDPA"),
        *("--diffusion-quantization-config", '{"method": "fp8"}'),
        *("--model-class-name", "QwenImagePipeline", "--diffusion-load-format", "default"),
        "--step-execution",
        "--diffusion-streaming-output",
    )
    options = omni_options_from_args(args)
    # Every flag but --enable-cpu-offload (vllm-omni lets layerwise offload override it), and
    # vLLM's --tensor-parallel-size.
    assert len(options) == len(OMNI_FLAGS)
    with pytest.warns(FutureWarning):  # vllm-omni's own deprecation of the backend shorthand
        config = build_omni_config(str(tiny_model_dir), options, max_batch_size=1)
    parallel = config.parallel_config
    assert (parallel.ulysses_degree, parallel.ring_degree, parallel.cfg_parallel_size) == (2, 2, 2)
    assert (parallel.vae_patch_parallel_size, parallel.tensor_parallel_size) == (2, 2)
    assert config.num_gpus == parallel.world_size == 16
    assert config.cache_backend == "tea_cache"
    assert getattr(config.cache_config, "rel_l1_thresh", None) == 0.3
    assert config.enable_layerwise_offload
    assert config.vae_use_tiling and config.vae_use_slicing
    assert config.step_execution
    assert config.streaming_output  # with this package's preview pipeline (test_omni_previews)
    assert config.custom_pipeline_args == {
        "pipeline_class": "vllm_omni_images.pipelines.step_previews.QwenImagePipeline"
    }
    assert "TORCH_SDPA" in repr(config.diffusion_attention_config)
    assert config.quantization_config is not None
    assert (config.model_class_name, config.diffusion_load_format) == (
        "QwenImagePipeline",
        "default",
    )
    offload = omni_options_from_args(serve_args(serve_parser, "--enable-cpu-offload"))
    assert build_omni_config(str(tiny_model_dir), offload).enable_cpu_offload


def test_batching_flags_drive_vllm_omnis_batcher(
    serve_parser: argparse.ArgumentParser, tiny_model_dir: Path
) -> None:
    from vllm_omni_images.engine.omni_requests import build_omni_config
    from vllm_omni_images.server.launcher import engine_settings_from_args

    args = serve_args(serve_parser, "--image-max-batch-size", "8", "--image-batch-delay-ms", "20")
    settings = engine_settings_from_args(args)
    config = build_omni_config(
        str(tiny_model_dir),
        settings.omni_options,
        max_batch_size=settings.batching.max_batch_size,
        batch_delay_ms=settings.batching.batch_delay_ms,
    )
    assert (config.max_num_seqs, config.request_batch_max_wait_ms) == (8, 20.0)
