"""Each vLLM serve flag, read from the live parser: honoured, or refused at start-up when given
with a non-default value. `--markdown` prints docs/image_api.md's table."""

from __future__ import annotations

import argparse
import contextlib
import enum
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vllm_omni_images.server.cli_args import HELP_GROUP
from vllm_omni_images.server.serve_flag_table import (
    FALLBACK_REASON,
    GROUP_REASONS,
    HONOURED,
    OVERRIDES,
    SINGLE_VALUE,
)


class Verdict(enum.Enum):
    HONOURED = "honoured"
    REFUSED = "refused"


@dataclass(frozen=True)
class FlagRule:
    verdict: Verdict
    how: str
    """One line: what the flag does for images, or why it is refused and what to use instead."""
    also_accepts: tuple[object, ...] = ()
    """Values of a refused flag that ask for nothing beyond its default (`--api-server-count 1`)."""


_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)\.(\s|$)")


def _first_sentence(text: str) -> str:
    """The first sentence of a flag's help, without its full stop, its first letter lower-cased."""
    text = " ".join(text.split())
    match = _SENTENCE_END.search(text)
    sentence = text[: match.start()] if match else text
    return sentence[:1].lower() + sentence[1:]


def flag_rule(action: argparse.Action, group: str) -> FlagRule:
    """What the image task does with `action`, a flag of the argument group titled `group`."""
    if group == HELP_GROUP:
        return FlagRule(Verdict.HONOURED, _first_sentence(action.help or action.dest))
    if action.dest in HONOURED:
        return FlagRule(Verdict.HONOURED, HONOURED[action.dest])
    how = OVERRIDES.get(action.dest) or GROUP_REASONS.get(group, FALLBACK_REASON)
    accepts = (SINGLE_VALUE[action.dest],) if action.dest in SINGLE_VALUE else ()
    return FlagRule(Verdict.REFUSED, how, accepts)


def serve_groups(parser: argparse.ArgumentParser) -> Iterator[tuple[str, list[argparse.Action]]]:
    """`parser`'s argument groups that hold a flag (help aside): title, flags, in its order."""
    for group in parser._action_groups:
        actions = [
            action
            for action in group._group_actions
            if not isinstance(action, argparse._HelpAction)
        ]
        if actions:
            yield group.title or "", actions


def classify(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, argparse.Action, FlagRule]]:
    """Each flag of `parser` (help aside) with its group's title and rule, in the help's order."""
    for title, actions in serve_groups(parser):
        for action in actions:
            yield title, action, flag_rule(action, title)


def flag_name(action: argparse.Action) -> str:
    """Its first long option (`--max-model-len`), or `<model>` for the positional."""
    longs = [option for option in action.option_strings if option.startswith("--")]
    if longs:
        return longs[0]
    return "<model>" if action.dest == "model_tag" else f"<{action.dest}>"


def _default(parser: argparse.ArgumentParser, action: argparse.Action) -> object:
    """The value a flag has when it is not given (a string default converted by its `type`)."""
    default = parser.get_default(action.dest)
    if isinstance(default, str) and action.type is not None:
        return parser._get_value(action, default)
    return default


def _asks_for_something(value: object, default: object, also_accepts: Sequence[object]) -> bool:
    # Equality, not identity: a list or a config given with the default's value asks nothing.
    if value is default or value == default:
        return False
    return not any(value == accepted for accepted in also_accepts)


def refused_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The refused flags that `args` sets to other than their default (or an `also_accepts`
    value), by `flag_name`, in the help's order; restating a default does not count."""
    return [
        flag_name(action)
        for _, action, rule in classify(parser)
        if rule.verdict is Verdict.REFUSED
        and _asks_for_something(
            getattr(args, action.dest, None), _default(parser, action), rule.also_accepts
        )
    ]


def refusal_message(flags: Sequence[str]) -> str:
    """The one log line that stops the server for `flags` (from `refused_flags`)."""
    names = ", ".join(flags)
    if len(flags) == 1:
        return (
            f"{names}: the image task (--task image) cannot honour this vLLM flag; "
            'drop it (docs/image_api.md, "vLLM\'s serve flags", says why and what to use '
            "instead)."
        )
    return (
        f"{names}: the image task (--task image) cannot honour these vLLM flags; "
        'drop them (docs/image_api.md, "vLLM\'s serve flags", says why and what to use '
        "instead)."
    )


def _markdown_text(text: str) -> str:
    """`text` as one table cell: `|` escaped, and `<` outside code spans."""
    parts = text.replace("|", "\\|").split("`")
    parts[::2] = [part.replace("<", "\\<") for part in parts[::2]]
    return "`".join(parts)


def markdown_table(parser: argparse.ArgumentParser) -> str:
    """docs/image_api.md's table of `parser`'s flags: a row each, under a row per group."""
    rows = ["| flag | with `--task image` | how |", "|---|---|---|"]
    group = None
    for title, action, rule in classify(parser):
        if title != group:
            group = title
            rows.append(f"| **{group}** | | |")
        rows.append(
            f"| `{flag_name(action)}` | {rule.verdict.value} | {_markdown_text(rule.how)} |"
        )
    return "\n".join(rows) + "\n"


def live_serve_parser() -> argparse.ArgumentParser:
    """vLLM's real `vllm serve` parser, with this plugin's flags (imports vLLM)."""
    import vllm.entrypoints.cli.serve  # noqa: F401  (the CLI imports it before plugins load)
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_omni_images.server import vllm_patches

    vllm_patches.fall_back_to_cpu_platform()
    parser: argparse.ArgumentParser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    cli = argparse.ArgumentParser(
        prog="python -m vllm_omni_images.server.serve_flags",
        description="What `vllm serve --task image` does with each of vLLM's serve flags.",
    )
    cli.add_argument(
        "--markdown", action="store_true", help="print docs/image_api.md's table of the flags"
    )
    options = cli.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # vLLM logs to stdout as it loads
        parser = live_serve_parser()
    if options.markdown:
        sys.stdout.write(markdown_table(parser))
        return
    rules = [rule for _, _, rule in classify(parser)]
    honoured = sum(rule.verdict is Verdict.HONOURED for rule in rules)
    print(f"{honoured} honoured, {len(rules) - honoured} refused (--markdown: the table)")


if __name__ == "__main__":
    main()
