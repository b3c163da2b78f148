"""The documentation against the code: the flag reference is the parser's, and every `dms-llm` command the README
and docs/ show parses with the flags it uses."""

import re
import shlex
from pathlib import Path

import pytest

from dms_llm.cli import build_parser, flag_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "cli.md")]


def test_the_flag_reference_is_the_parsers():
    assert (ROOT / "docs" / "cli.md").read_text() == flag_reference(), (
        "docs/cli.md differs from the parser: run `python scripts/flag_reference.py > docs/cli.md`")


def test_the_flag_reference_fails_when_a_default_changes():
    parser = build_parser()
    prune = next(a for a in parser._actions if a.dest == "command").choices["prune"]
    next(a for a in prune._actions if a.dest == "steps").default = 201
    assert flag_reference(parser) != flag_reference()


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every `dms-llm ...` command in a code block or an inline code span of the docs."""
    found = []
    for path in DOCS:
        text = path.read_text()
        blocks = re.findall(r"^ *```(\w*)\n(.*?)^ *```", text, flags=re.S | re.M)
        lines = [line for lang, block in blocks if lang in ("", "bash", "sh") for line in block.splitlines()]
        spans = re.findall(r"`(dms-llm [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        lines += [span for span in spans if len(span.split()) >= 3]  # `dms-llm prune` alone names the command
        for line in lines:
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|\|", line):
                part = part.strip()
                if part.startswith("dms-llm ") and "..." not in part and not re.search(r"COMMAND|\[|<", part):
                    found.append((path.name, part))
    return found


COMMANDS = documented_commands()


def test_the_readme_shows_commands():
    assert sum(f == "README.md" for f, _ in COMMANDS) >= 8


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{f}:{c[:60]}" for f, c in COMMANDS])
def test_every_documented_command_parses(where, command):
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}` does not parse ({e})")
