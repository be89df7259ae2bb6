"""Each change in `vllm_patches` does what it says on the installed vLLM.

The tests drive vLLM's own objects (its CLI `main`, its parser, its platform switch, a FastAPI
app) and check the patched behaviour, so they fail when a vLLM release moves what a patch
relies on.
"""

import argparse
import logging
import os
import sys
import types

import pytest
from fastapi import FastAPI
from vllm.engine.arg_utils import EngineArgs

from vllm_omni_images.server import launcher, vllm_patches
from vllm_omni_images.server.cli_args import OMNI_FLAGS
from vllm_omni_images.server.endpoint import ImagesEndpointPlugin
from vllm_omni_images.server.plugin import log_through_vllm, register


def run_vllm_cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> None:
    """Run vLLM's real `vllm` command line in this process."""
    from vllm.entrypoints.cli.main import main

    monkeypatch.setattr(sys, "argv", ["vllm", *argv])
    # vLLM's CLI sets this for its subprocesses; keep it out of the rest of the test run.
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    main()


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch, serve_parser) -> list[argparse.Namespace]:
    """The arguments our launcher is started with (it starts nothing here)."""
    calls: list[argparse.Namespace] = []
    monkeypatch.setattr(launcher, "run_image_server_cli", calls.append)
    register()  # what vLLM runs in each process; idempotent
    return calls


def test_vllm_serve_task_image_runs_our_launcher_with_the_image_flags(monkeypatch, launched):
    run_vllm_cli(
        monkeypatch,
        "serve",
        "tiny-qwen-image",
        "--task",
        "image",
        "--image-max-batch-size",
        "3",
        "--api-key",
        "k",
    )
    [args] = launched
    assert args.model == "tiny-qwen-image"
    assert args.image_max_batch_size == 3
    assert args.image_engine == "auto"
    assert args.api_key == ["k"]  # vLLM's own flags still parse


def test_plain_vllm_serve_still_runs_vllms_server(monkeypatch, launched):
    import vllm.entrypoints.cli.serve as serve_cli

    served: list[str] = []
    # vLLM's own serve command (which reads the positional `model_tag`), standing in
    # underneath our patch.
    monkeypatch.setattr(
        serve_cli.ServeSubcommand, "cmd", staticmethod(lambda args: served.append(args.model_tag))
    )
    vllm_patches.patch_serve_command(launcher.run_image_server_cli)
    run_vllm_cli(monkeypatch, "serve", "some-llm")
    run_vllm_cli(monkeypatch, "serve", "tiny-qwen-image", "--task", "image")
    assert served == ["some-llm"]
    assert [args.model for args in launched] == ["tiny-qwen-image"]


def test_serve_help_lists_the_image_options(monkeypatch, launched, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_vllm_cli(monkeypatch, "serve", "--help=ImageTask")
    assert exit_info.value.code in (0, None)
    help_text = capsys.readouterr().out
    for flag in ("--task", "--image-engine", "--image-max-batch-size", "--image-max-queue"):
        assert flag in help_text
    for omni_flag in OMNI_FLAGS:  # vllm-omni's engine options, by vllm-omni's names
        assert all(option in help_text for option in omni_flag.flags)
    assert "--ulysses-degree ULYSSES_DEGREE" in help_text


def test_other_subcommands_get_no_image_flags(monkeypatch, launched, capsys):
    with pytest.raises(SystemExit):
        run_vllm_cli(monkeypatch, "run-batch", "--help")
    assert "--image-max-batch-size" not in capsys.readouterr().out
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm bench throughput"))
    assert not any("--task" in action.option_strings for action in parser._actions)


def test_patches_are_idempotent(serve_parser):
    import vllm.entrypoints.cli.serve as serve_cli

    add_cli_args, cmd = EngineArgs.add_cli_args, serve_cli.ServeSubcommand.cmd
    register()
    vllm_patches.patch_engine_args_cli()
    vllm_patches.patch_serve_command(launcher.run_image_server_cli)
    assert EngineArgs.add_cli_args is add_cli_args
    assert serve_cli.ServeSubcommand.cmd is cmd


def test_an_unspecified_platform_falls_back_to_vllms_cpu_platform(monkeypatch):
    from vllm import platforms
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import UnspecifiedPlatform

    unspecified = UnspecifiedPlatform()
    monkeypatch.setattr(platforms, "current_platform", unspecified)
    bound_at_import = types.ModuleType("vllm_module_that_bound_it")
    bound_at_import.current_platform = unspecified  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, bound_at_import.__name__, bound_at_import)
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    assert vllm_patches.fall_back_to_cpu_platform() is True
    assert isinstance(platforms.current_platform, CpuPlatform)
    assert bound_at_import.current_platform is platforms.current_platform
    assert os.environ["VLLM_TARGET_DEVICE"] == "cpu"  # for processes started later
    assert vllm_patches.fall_back_to_cpu_platform() is False


def test_core_routes_are_removed_for_the_given_paths_only():
    app = FastAPI()
    for path in ("/v1/completions", "/health"):
        app.add_api_route(path, lambda: None, methods=["POST"])
    vllm_patches.remove_core_routes(app, ("/v1/completions",))
    paths = {getattr(route, "path", None) for route in app.router.routes}
    assert "/health" in paths
    assert "/v1/completions" not in paths


def test_the_images_plugin_is_attached_once_whatever_vllm_plugins_says():
    app = FastAPI()
    assert vllm_patches.attach_endpoint_plugin(app, ImagesEndpointPlugin()) is True
    assert vllm_patches.attach_endpoint_plugin(app, ImagesEndpointPlugin()) is False
    assert [plugin.name for plugin in app.state.endpoint_plugins] == ["images"]
    generation_routes = [
        route
        for route in app.router.routes
        if getattr(route, "path", "") == "/v1/images/generations"
    ]
    assert len(generation_routes) == 1


async def test_an_exception_handler_added_after_the_stack_was_built_answers():
    """vLLM's `build_app` builds the middleware stack early (its SageMaker bootstrap); a
    handler added later is in force all the same."""
    import httpx
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    app = FastAPI()
    app.middleware_stack = app.build_middleware_stack()

    async def shaped(request: object, error: Exception) -> JSONResponse:
        return JSONResponse({"error": "shaped"}, status_code=404)

    vllm_patches.add_exception_handler(app, HTTPException, shaped)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/nowhere")).json() == {"error": "shaped"}


def test_the_server_switch_interval_is_one_millisecond():
    before = sys.getswitchinterval()
    try:
        vllm_patches.set_server_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(0.001)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize(
    "name",
    ["build_app", "serve_http", "setup_server"],
)
def test_launcher_uses_vllms_own_server_functions(name):
    function = getattr(launcher, name)
    assert function.__module__.startswith("vllm.")


def test_our_logs_print_where_vllms_do():
    log_through_vllm()
    log_through_vllm()  # idempotent
    ours = logging.getLogger("vllm_omni_images")
    vllm_root = logging.getLogger("vllm")
    [vllm_handler] = [handler for handler in vllm_root.handlers if handler.name == "vllm"]
    assert ours.handlers == [vllm_handler]
    served = logging.getLogger("vllm_omni_images.images.serving")
    assert served.getEffectiveLevel() == vllm_root.level
