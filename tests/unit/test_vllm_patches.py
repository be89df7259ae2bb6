"""Fails loudly when vLLM moves anything `vllm_patches` and the launcher rely on."""

import argparse
import inspect
import sys

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

from vllm_omni_images import vllm_patches


def test_async_engine_args_loads_plugins_before_engine_args():
    source = inspect.getsource(AsyncEngineArgs.add_cli_args)
    assert source.index("load_general_plugins()") < source.index("EngineArgs.add_cli_args(parser)")


def test_cli_reads_the_serve_command_after_building_its_parser():
    import vllm.entrypoints.cli.main as cli_main

    source = inspect.getsource(cli_main.main)
    assert "cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)" in source


def test_vllm_cli_imports_the_serve_module_first():
    import vllm.entrypoints.cli.main as cli_main

    assert "import vllm.entrypoints.cli.serve" in inspect.getsource(cli_main.main)
    assert vllm_patches.SERVE_CLI_MODULE == "vllm.entrypoints.cli.serve"


def test_platform_switch_is_possible():
    from vllm import platforms
    from vllm.platforms.cpu import CpuPlatform

    assert hasattr(platforms, "current_platform")
    assert callable(CpuPlatform().is_unspecified)


def test_serve_parser_gets_the_image_flags(serve_parser):
    args = serve_parser.parse_args(["tiny-qwen-image", "--task", "image", "--api-key", "k"])
    assert args.task == "image"
    assert args.image_engine == "auto"
    assert args.model_tag == "tiny-qwen-image"
    assert args.api_key == ["k"]
    assert serve_parser.parse_args(["some-llm"]).task is None


def test_engine_args_patch_is_idempotent():
    before = EngineArgs.add_cli_args
    vllm_patches.patch_engine_args_cli()
    assert EngineArgs.add_cli_args is before


def test_other_parsers_get_no_image_flags():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm bench throughput"))
    assert not any("--task" in action.option_strings for action in parser._actions)


def test_serve_command_routes_only_the_image_task(monkeypatch):
    import vllm.entrypoints.cli.serve as serve_cli

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(
        serve_cli.ServeSubcommand,
        "cmd",
        staticmethod(lambda args: calls.append(("vllm", args.model))),
    )
    assert vllm_patches.SERVE_CLI_MODULE in sys.modules
    vllm_patches.patch_serve_command(lambda args: calls.append(("image", args.model)))

    image_args = argparse.Namespace(task="image", model_tag="tiny", model="default")
    serve_cli.ServeSubcommand.cmd(image_args)
    serve_cli.ServeSubcommand.cmd(argparse.Namespace(task=None, model_tag="llm", model="llm"))
    assert calls == [("image", "tiny"), ("vllm", "llm")]


@pytest.mark.parametrize(
    "name",
    ["build_app", "serve_http", "setup_server", "init_endpoint_plugins_state"],
)
def test_launcher_uses_vllms_own_server_functions(name):
    from vllm_omni_images import launcher

    function = getattr(launcher, name)
    assert function.__module__.startswith("vllm.")


def test_our_logs_print_where_vllms_do():
    import logging

    from vllm_omni_images.plugin import log_through_vllm

    log_through_vllm()
    log_through_vllm()  # idempotent
    ours = logging.getLogger("vllm_omni_images")
    vllm_root = logging.getLogger("vllm")
    [vllm_handler] = [handler for handler in vllm_root.handlers if handler.name == "vllm"]
    assert ours.handlers == [vllm_handler]
    assert logging.getLogger("vllm_omni_images.serving").getEffectiveLevel() == vllm_root.level
