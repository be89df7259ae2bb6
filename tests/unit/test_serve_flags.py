"""`serve_flags` classifies every flag of vLLM's real `vllm serve` parser, and refuses exactly
the refused ones that a command line sets.

The parser is vLLM's own with our plugin loaded (the session's `serve_parser` fixture): a flag
vLLM adds to a group with honoured flags fails here until the table says what the image task
does with it; one in another group is refused by its group's reason.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_omni_images.server import launcher, vllm_patches
from vllm_omni_images.server.cli_args import HELP_GROUP
from vllm_omni_images.server.serve_flag_table import (
    FALLBACK_REASON,
    GROUP_REASONS,
    HONOURED,
    OVERRIDES,
    SINGLE_VALUE,
)
from vllm_omni_images.server.serve_flags import (
    Verdict,
    classify,
    main,
    markdown_table,
    refusal_message,
    refused_flags,
    serve_groups,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "image_api.md"
BEGIN_MARK = "<!-- serve-flags:begin"
END_MARK = "<!-- serve-flags:end -->"

SPECULATIVE = json.dumps({"method": "ngram", "num_speculative_tokens": 2})


def parse(parser: argparse.ArgumentParser, *flags: str) -> argparse.Namespace:
    return parser.parse_args(["tiny-qwen-image", "--task", "image", *flags])


def parser_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for _, actions in serve_groups(parser) for action in actions}


def test_no_entry_of_the_tables_is_stale(serve_parser: argparse.ArgumentParser) -> None:
    dests = parser_dests(serve_parser)
    for table in (HONOURED, OVERRIDES, SINGLE_VALUE):
        assert [dest for dest in table if dest not in dests] == []


def test_a_flag_is_honoured_or_overridden_not_both() -> None:
    assert set(HONOURED) & set(OVERRIDES) == set()
    assert set(HONOURED) & set(SINGLE_VALUE) == set()


def test_a_group_with_honoured_flags_classifies_each_of_them(
    serve_parser: argparse.ArgumentParser,
) -> None:
    """A flag vLLM adds to a group it honours some of (Frontend) may be one to honour: it must
    be classified here, not refused by a group reason that was written for the others."""
    for title, actions in serve_groups(serve_parser):
        dests = [action.dest for action in actions]
        if title != HELP_GROUP and any(dest in HONOURED for dest in dests):
            assert [dest for dest in dests if dest not in HONOURED and dest not in OVERRIDES] == []


def test_a_flag_of_a_newer_vllm_is_refused_by_its_groups_reason() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument_group("CacheConfig").add_argument("--new-cache-knob", type=int)
    parser.add_argument_group("NewConfig").add_argument("--new-knob", default="a")
    parser.add_argument_group(HELP_GROUP).add_argument("--image-knob", help="Knob. Details.")
    rules = {action.dest: rule for _, action, rule in classify(parser)}
    assert rules["new_cache_knob"].how == GROUP_REASONS["CacheConfig"]
    assert rules["new_knob"].how == FALLBACK_REASON
    assert {rules["new_cache_knob"].verdict, rules["new_knob"].verdict} == {Verdict.REFUSED}
    assert rules["image_knob"].verdict is Verdict.HONOURED and rules["image_knob"].how == "knob"
    args = parser.parse_args(["--new-cache-knob", "2", "--new-knob", "b", "--image-knob", "c"])
    assert refused_flags(args, parser) == ["--new-cache-knob", "--new-knob"]
    assert refused_flags(parser.parse_args(["--new-knob", "a"]), parser) == []


def test_image_task_flags_are_honoured(serve_parser: argparse.ArgumentParser) -> None:
    verdicts = {rule.verdict for title, _, rule in classify(serve_parser) if title == HELP_GROUP}
    assert verdicts == {Verdict.HONOURED}


def test_every_rule_says_how_in_one_line(serve_parser: argparse.ArgumentParser) -> None:
    rules = {action.dest: rule for _, action, rule in classify(serve_parser)}
    assert [dest for dest, rule in rules.items() if not rule.how or "\n" in rule.how] == []


def test_the_plain_image_command_line_sets_no_refused_flag(
    serve_parser: argparse.ArgumentParser,
) -> None:
    assert refused_flags(parse(serve_parser), serve_parser) == []


def test_refused_flags_are_named_in_the_parsers_order(
    serve_parser: argparse.ArgumentParser,
) -> None:
    args = parse(
        serve_parser,
        "--max-model-len",
        "100",
        "--speculative-config",
        SPECULATIVE,
        "--tokenizer",
        "x",
        "--enable-prefix-caching",
    )
    assert refused_flags(args, serve_parser) == [
        "--tokenizer",
        "--max-model-len",
        "--enable-prefix-caching",
        "--speculative-config",
    ]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        # A yes/no flag whose default is unset asks for something either way.
        (["--no-enable-prefix-caching"], ["--enable-prefix-caching"]),
        # Short options and the lists of a JSON flag are told by value.
        (["-q", "fp8"], ["--quantization"]),
        (["--limit-mm-per-prompt", '{"image": 2}'], ["--limit-mm-per-prompt"]),
        (["--api-server-count", "2"], ["--api-server-count"]),
        (
            ["--max-num-seqs", "8", "--gpu-memory-utilization", "0.5"],
            ["--gpu-memory-utilization", "--max-num-seqs"],
        ),
    ],
)
def test_a_refused_flag_counts_however_it_is_spelled(
    serve_parser: argparse.ArgumentParser, flags: list[str], named: list[str]
) -> None:
    assert refused_flags(parse(serve_parser, *flags), serve_parser) == named


@pytest.mark.parametrize(
    "flags",
    [
        ["--no-enable-log-outputs"],  # restates the default
        ["--api-server-count", "1"],  # one API server is what the image task runs
        ["--data-parallel-size", "1", "--pipeline-parallel-size", "1"],
        ["--ignore-patterns", "original/**/*"],  # a list equal to the default
    ],
)
def test_restating_a_default_is_not_refused(
    serve_parser: argparse.ArgumentParser, flags: list[str]
) -> None:
    assert refused_flags(parse(serve_parser, *flags), serve_parser) == []


def test_honoured_flags_are_never_named(serve_parser: argparse.ArgumentParser) -> None:
    args = parse(
        serve_parser,
        *["--dtype", "float16", "--seed", "3", "--revision", "main", "--trust-remote-code"],
        *["--served-model-name", "a", "b", "--enforce-eager", "-tp", "2"],
        *["--api-key", "k", "--root-path", "/x", "--allowed-origins", '["http://a"]'],
        *["--port", "9000", "--uvicorn-log-level", "debug", "--enable-request-id-headers"],
        *["--disable-fastapi-docs", "--shutdown-timeout", "5", "--allowed-media-domains", "a.b"],
        *["--enable-lora", "--max-lora-rank", "64", "--disable-log-stats"],
        *["--image-max-batch-size", "2", "--cache-backend", "tea_cache", "--vae-use-tiling"],
    )
    assert refused_flags(args, serve_parser) == []


def test_the_refusal_is_one_line_naming_every_flag() -> None:
    message = refusal_message(["--tokenizer", "--max-model-len", "--enable-prefix-caching"])
    assert "\n" not in message
    assert message.startswith("--tokenizer, --max-model-len, --enable-prefix-caching: the image")
    assert "these vLLM flags" in message and "drop them" in message
    assert "this vLLM flag" in refusal_message(["--max-model-len"])


def test_the_parser_vllm_built_is_kept_for_the_launcher(
    serve_parser: argparse.ArgumentParser,
) -> None:
    """`vllm_patches` keeps the serve parser that vLLM built (the fixture's, or one built
    later in the session), for the launcher's `refused_flags`."""
    parser = vllm_patches.serve_parser()
    assert parser is not None
    assert [action.dest for action in parser._actions] == [
        action.dest for action in serve_parser._actions
    ]
    assert refused_flags(parse(parser, "--max-model-len", "100"), parser) == ["--max-model-len"]


def test_vllm_serve_refuses_to_start_in_one_line_naming_the_refused_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On vLLM's real command line, through the launcher: a `--config` file's flags count as
    if given, and the server stops before it loads anything, saying why in one line."""
    from vllm.entrypoints.cli.main import main as vllm_main

    from vllm_omni_images.server.plugin import register

    errors: list[str] = []
    monkeypatch.setattr(launcher.logger, "error", lambda text, *args: errors.append(text % args))
    monkeypatch.setattr(launcher, "load_engine", None)  # must not be reached
    register()
    config = tmp_path / "serve.yaml"
    config.write_text("max-model-len: 100\nimage-max-batch-size: 2\n")
    command = ["serve", "tiny-qwen-image", "--task", "image", "--config", str(config)]
    monkeypatch.setattr(sys, "argv", ["vllm", *command, "--tokenizer", "x", "--api-key", "k"])
    # vLLM's CLI sets this for its subprocesses; keep it out of the rest of the test run.
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    with pytest.raises(SystemExit) as exited:
        vllm_main()
    assert exited.value.code == 1
    [line] = errors
    assert "--tokenizer, --max-model-len" in line and "\n" not in line
    assert "--api-key" not in line and "--image-max-batch-size" not in line


def test_plain_vllm_serve_help_still_works(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vllm serve --help` on vLLM's real command line with the plugin registered: vLLM's
    groups and ours, side by side (`vllm serve --help=ImageTask` runs as a process in the docs
    test)."""
    from vllm.entrypoints.cli.main import main as vllm_main

    from vllm_omni_images.server.plugin import register

    register()
    monkeypatch.setattr(sys, "argv", ["vllm", "serve", "--help"])
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    with pytest.raises(SystemExit) as exited:
        vllm_main()
    assert exited.value.code in (0, None)
    out = capsys.readouterr().out
    assert "Frontend" in out  # vLLM's own option groups
    assert HELP_GROUP in out  # and ours, listed beside them


def test_the_table_imports_without_vllm_or_torch() -> None:
    """The launcher reads it before any engine loads: it costs no heavy import."""
    code = (
        "import sys, vllm_omni_images.server.serve_flags\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('vllm', 'vllm_omni', 'torch', 'diffusers')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_the_docs_table_is_the_generated_one(serve_parser: argparse.ArgumentParser) -> None:
    """docs/image_api.md's table ("vLLM's serve flags") is `markdown_table()`'s of the live
    parser: run `python -m vllm_omni_images.server.serve_flags --markdown` and paste it when
    this fails."""
    docs = DOCS.read_text()
    begin = docs.index("\n", docs.index(BEGIN_MARK)) + 1
    assert docs[begin : docs.index(END_MARK)] == markdown_table(serve_parser)


def test_the_command_prints_the_table(
    serve_parser: argparse.ArgumentParser, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["--markdown"])
    assert capsys.readouterr().out == markdown_table(serve_parser)
