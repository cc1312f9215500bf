"""The README as a user walks it: every command it shows exists as written.

Each `aidc ...` command in the README (code blocks and inline code) is parsed by the real CLI
parser, options and choices included, without running it: a renamed flag, a removed command or a
misspelt choice in the README fails here. `make` targets, `bench/` scripts and playbooks it names
must exist. Running the commands is the job of the tests of each feature; the first-hour path
(the Quickstart block) also runs for real in tests/lab/test_lab_loop.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from aidc.cli.main import build_app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHELL_OPERATORS = {"|", ">", ">>", "&&", ";", "&", "||", "<", "2>", "2>&1"}


def code_lines(text: str, inline: bool = True) -> list[str]:
    """Command lines of the fenced code blocks (continuations joined) and, with `inline`, of
    inline code spans."""
    lines: list[str] = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        lines += block.replace("\\\n", " ").splitlines()
    if inline:
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        lines += re.findall(r"`([^`\n]+)`", prose)
    return lines


def command_words(line: str) -> list[str]:
    """The words of the first command on a shell line: no comment, redirection, pipe or leading
    VAR=value; optional parts written `[--flag VALUE]` are taken as given."""
    line = re.sub(r"\[(-[^\]]*)\]", r"\1", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote: prose, not a command
        return []
    end = next((i for i, w in enumerate(words) if w in SHELL_OPERATORS), len(words))
    words = words[:end]
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words = words[1:]
    return words


def aidc_commands(text: str, inline: bool = True) -> list[tuple[str, list[str]]]:
    """(line, arguments) of every `aidc` command; `aidc spec show/check` stands for both."""
    commands = []
    for line in code_lines(text, inline):
        words = command_words(line)
        if len(words) < 2 or Path(words[0]).name != "aidc" or words[1] == "--install-completion":
            continue
        at = next((i for i, w in enumerate(words) if "/" in w and not w.startswith(("-", ".")) and i <= 3), None)
        if at is None:
            commands.append((line.strip(), words[1:]))
        else:
            commands += [(line.strip(), words[1:at] + [alt] + words[at + 1:]) for alt in words[at].split("/")]
    return commands


def parse_problem(root, args: list[str]) -> str | None:
    """Why the CLI's parser refuses `args`, or None when it accepts them (nothing is run)."""
    try:
        ctx = root.make_context("aidc", list(args))
        command, rest = root, list(ctx._protected_args) + ctx.args
        while hasattr(command, "resolve_command") and rest:
            name, sub, rest = command.resolve_command(ctx, rest)
            ctx = sub.make_context(name, list(rest), parent=ctx)
            command = sub
            rest = list(ctx._protected_args) + ctx.args if hasattr(sub, "resolve_command") else []
    except typer.Exit:  # --help, --version
        return None
    except typer.TyperException as exc:
        return exc.format_message()
    return None


@pytest.fixture(scope="module")
def cli_root():
    return get_command(build_app())


def test_the_readme_shows_aidc_commands_in_blocks_and_in_prose():
    commands = aidc_commands(README)
    assert len(commands) > 60
    assert any(words[:2] == ["lab", "run"] for _, words in commands)


# Refusals that mean the README names something the CLI does not have.
UNKNOWN = ("No such command", "No such option", "Got unexpected extra argument")


def test_every_aidc_command_in_the_readme_names_commands_and_options_that_exist(cli_root):
    """Inline code names commands and flags in passing (`aidc failover run --lease-dir`):
    those must exist; values may be placeholders."""
    problems = [f"{line}\n    -> {why}" for line, words in aidc_commands(README)
                if (why := parse_problem(cli_root, words)) and why.startswith(UNKNOWN)]
    assert not problems, "README commands the CLI does not have:\n" + "\n".join(problems)


def test_every_command_in_a_readme_code_block_is_a_complete_valid_invocation(cli_root):
    """Code blocks are meant to be pasted: every required option is there and every value has
    its type, except placeholders in capitals (`--soak-s N`) and `...` for options the text
    lists."""
    problems = []
    for line, words in aidc_commands(README, inline=False):
        why = parse_problem(cli_root, words)
        if not why:
            continue
        placeholder = why.startswith("Invalid value") and any(re.fullmatch(r"[A-Z][A-Z_]*", w) for w in words)
        elided = "..." in words and why.startswith(("Missing option", "Missing argument"))
        if not (placeholder or elided):
            problems.append(f"{line}\n    -> {why}")
    assert not problems, "README code blocks the CLI refuses:\n" + "\n".join(problems)


@pytest.mark.parametrize("bad, says", [
    (["lab", "run", "--bogus"], "No such option"),
    (["spec", "chek", "--stack", "lab"], "No such command"),
    (["audit", "verify", "--json", "extra", "words"], "unexpected extra argument"),
])
def test_the_walk_catches_a_command_the_cli_would_refuse(cli_root, bad, says):
    assert says in (parse_problem(cli_root, bad) or "")


def test_make_targets_bench_scripts_and_playbooks_the_readme_names_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.M))
    missing = []
    for line in code_lines(README):
        words = command_words(line)
        if words[:1] == ["make"] and len(words) > 1 and "=" not in words[1]:
            if words[1] not in targets:
                missing.append(f"make target {words[1]!r} ({line.strip()})")
        for word in words:
            if re.fullmatch(r"(bench|playbooks)/[\w./-]+\.(py|sh|yml)", word) and not (ROOT / word).exists():
                missing.append(f"{word} ({line.strip()})")
    assert not missing, missing
