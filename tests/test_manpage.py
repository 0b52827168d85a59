"""The command line documents itself: every option has a help text that names its default,
every ``--help`` ends with the exit codes, and the man page the package ships is generated
from the same parser, so it names every verb and option there is.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from pigateway import cli
from pigateway.cli import manpage

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "packaging" / "debian" / "extra" / "pigateway.1"

EVERY_VERB = [" ".join(path) for path, _ in manpage.verbs()]


def test_the_tree_has_every_verb() -> None:
    assert {"run", "send", "queue show", "queue ls", "queue stats", "queue requeue-dead",
            "queue purge", "status", "metrics", "pause", "resume", "flush", "config check",
            "inbox ls"} == set(EVERY_VERB)


@pytest.mark.parametrize("verb", EVERY_VERB)
def test_every_option_has_help_that_names_its_default(verb: str) -> None:
    [sub] = [parser for path, parser in manpage.verbs() if " ".join(path) == verb]
    assert sub.description, f"{verb} has no description"
    for action in manpage.options(sub):
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"pigateway {verb} {name} has no help"
        if action.option_strings and action.default not in (None, False, [],
                                                            argparse.SUPPRESS):
            default = f"{action.default:g}" if isinstance(action.default, float) else (
                str(action.default))
            assert f"(default: {default})" in action.help, (
                f"pigateway {verb} {name}: the help does not name the default {default}")
        elif action.option_strings and not action.required and action.nargs != 0:
            assert "default" in action.help, f"pigateway {verb} {name}: what if not given?"


@pytest.mark.parametrize("argv", [[], ["send"], ["queue", "ls"], ["status"]], ids=str)
def test_help_ends_with_the_exit_codes(argv: list[str], capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    out = capsys.readouterr().out
    assert out.rstrip().endswith(cli._epilog())
    for code, text in cli.EXIT_MEANINGS:
        assert f"  {code:>2}  {text.split()[0]}" in out
    assert max(len(line) for line in cli._epilog().splitlines()) <= 78


def test_the_shipped_man_page_is_generated_from_the_parser() -> None:
    assert SHIPPED.read_text() == manpage.render(), (
        "packaging/debian/extra/pigateway.1 is out of date: "
        ".venv/bin/python -m pigateway.cli.manpage > packaging/debian/extra/pigateway.1")


def test_the_man_page_names_every_verb_option_and_exit_code() -> None:
    page = SHIPPED.read_text()
    for path, sub in manpage.verbs():
        assert f'.SS "pigateway {" ".join(path)}"' in page
        for action in manpage.options(sub):
            for name in action.option_strings:
                assert name.replace("-", r"\-") in page, f"{path} {name}"
    for code, _ in cli.EXIT_MEANINGS:
        assert f".B {code}\n" in page


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
def test_man_reads_the_page_without_a_warning() -> None:
    done = subprocess.run(["man", "--warnings", "-l", "-Tutf8", str(SHIPPED)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LC_ALL": "C.UTF-8"})
    assert (done.returncode, done.stderr) == (0, "")
    text = re.sub(".\b", "", done.stdout)  # the overstrikes of bold
    assert "pigateway queue ls" in text and "--limit N" in text


def _doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "ansible").rglob("README.md"))]


def _invocations(text: str) -> list[str]:
    """The ``pigateway VERB ...`` commands of a page's sh/console blocks, as typed (a
    ``sudo -u pigateway`` before, and a comment, pipe or redirection after, left out)."""
    found = []
    for block in re.findall(r"```(?:sh|console)\n(.*?)```", text, re.S):
        for typed in block.splitlines():
            line = re.sub(r"\bsudo (-u pigateway )?", "", typed.removeprefix("$ "))
            match = re.match(r"^\s*(?:/usr/bin/)?pigateway ([^|#;&<>]*)", line)
            if match:
                found.append(match.group(1).strip())
    return found


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda page: page.name)
def test_every_pigateway_command_in_the_docs_parses(page: Path) -> None:
    """A command in a runbook block is typed as it stands: it must be one the parser takes
    (a verb, options, placeholders such as ID as values)."""
    refused = []
    for command in _invocations(page.read_text()):
        try:
            cli.build_parser().parse_args(shlex.split(command))
        except SystemExit as exc:
            if exc.code:
                refused.append(command)
    assert refused == []


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda page: page.name)
def test_no_page_shows_send_with_positional_arguments(page: Path) -> None:
    """``send`` takes --device and --command, never ``send DEVICE NAME``."""
    assert re.findall(r"pigateway send [<\w]", page.read_text()) == []


def test_the_man_page_examples_parse() -> None:
    page = SHIPPED.read_text()
    examples = page.split(".SH EXAMPLES", 1)[1].split(".SH ", 1)[0]
    commands = [line.replace("\\-", "-") for line in examples.splitlines()
                if line.startswith("pigateway ")]
    assert len(commands) >= 4
    for command in commands:
        cli.build_parser().parse_args(shlex.split(command)[1:])  # exits 2 when it does not
