"""The man page, ``pigateway(1)``, generated from the command line's parser.

Every verb, option, help text, default and exit code comes from :func:`pigateway.cli.
build_parser` and :data:`pigateway.cli.EXIT_MEANINGS`, so the page cannot fall behind the
CLI; only the description, files and pointers around them are written here. The Debian
package ships the result (``packaging/debian/extra/pigateway.1``); ``tests/test_manpage.py``
keeps that file equal to :func:`render`. Regenerate it with::

    .venv/bin/python -m pigateway.cli.manpage > packaging/debian/extra/pigateway.1
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from pigateway import cli

DESCRIPTION = """\
.B pigateway
queues device commands in a SQLite database on disk and delivers them to an
MQTT broker whenever the link is up: no command is lost, whatever the network,
the power or the SD card does. The service
.RB ( "pigateway run" ,
started by systemd as
.BR pigateway.service )
starts once
.I /etc/pigateway/config.toml
has a
.BR gateway_id .
The other verbs queue a command, look at the queue, or talk to the running
service over its control socket (as root or a member of the
.B pigateway
group).
.PP
Every verb prints text for people; with
.B \\-\\-json
the looking verbs print JSON for scripts instead."""

TAIL = """\
.SH EXAMPLES
Queue a command; its id is printed once it is on disk:
.PP
.RS
pigateway send \\-\\-device lamp\\-1 \\-\\-command on \\-\\-param level=80
.RE
.PP
Queue one with a producer key and wait for the broker's acknowledgement; the same line run
again queues nothing:
.PP
.RS
pigateway send \\-\\-device lamp\\-1 \\-\\-command on \\-\\-id job\\-42 \\-\\-wait
.br
pigateway queue show \\-\\-key job\\-42
.RE
.PP
What the gateway is doing, and what did not go out:
.PP
.RS
pigateway status
.br
pigateway queue ls \\-\\-dead
.RE
.SH ENVIRONMENT
.TP
.B PIGATEWAY_CONFIG
the config file when
.B \\-\\-config
is not given (default:
.IR /etc/pigateway/config.toml ).
.SH FILES
.TP
.I /etc/pigateway/config.toml
the configuration (every key: /usr/share/doc/pigateway/config.md.gz)
.TP
.I /etc/credstore/pigateway.mqtt\\-password
the broker password, a systemd credential (root, 0600), never in the config
.TP
.I /var/lib/pigateway/queue.db
the queue; kept when the package is removed, deleted when it is purged
.TP
.I /run/pigateway/control.sock
the running service's control socket
.SH SEE ALSO
.BR systemctl (1),
.BR journalctl (1),
/usr/share/doc/pigateway/operations.md.gz"""


def verbs(parser: argparse.ArgumentParser | None = None,
          path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Each verb that runs something (``send``, ``queue ls``...), with its parser, in
    ``--help``'s order."""
    parser = parser or cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if nested:
                    yield from verbs(sub, (*path, name))
                else:
                    yield (*path, name), sub


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """A verb's arguments and options, ``--help`` left out."""
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            yield action


def render() -> str:
    """The whole page, in roff (``man -l`` reads it)."""
    parser = cli.build_parser()
    lines = [
        '.TH PIGATEWAY 1 "" "pigateway" "User Commands"',
        ".SH NAME",
        r"pigateway \- durable MQTT command gateway for Raspberry Pi",
        ".SH SYNOPSIS",
        ".B pigateway",
        ".I VERB",
        ".RI [ OPTION ...]",
        ".br",
        ".B pigateway",
        r".RB { \-\-help | \-\-version }",
        ".SH DESCRIPTION",
        DESCRIPTION,
        ".SH VERBS",
    ]
    for path, sub in verbs(parser):
        lines += [f'.SS "pigateway {" ".join(path)}"', _text(sub.description or "")]
        for action in options(sub):
            lines += [".TP", _term(action), _text(action.help or "")]
    lines.append('.SH "EXIT STATUS"')
    for code, meaning in cli.EXIT_MEANINGS:
        lines += [".TP", f".B {code}", _text(meaning)]
    lines.append(TAIL)
    return "\n".join(lines) + "\n"


def _term(action: argparse.Action) -> str:
    """An option as the page names it: ``.B \\-\\-limit`` with its ``.I N``."""
    if not action.option_strings:  # a positional argument
        return f".I {_text(str(action.metavar or action.dest))}"
    names = ", ".join(_text(name) for name in action.option_strings)
    if action.nargs == 0:
        return f".B {names}"
    metavar = action.metavar or (("{" + ",".join(action.choices) + "}") if action.choices
                                 else action.dest.upper())
    return f'.BI "{names} " "{_text(str(metavar))}"'


def _text(text: str) -> str:
    """``text`` safe in roff: backslashes and hyphens escaped, no line starting a request."""
    escaped = text.replace("\\", r"\e").replace("-", r"\-")
    return escaped if not escaped.startswith((".", "'")) else r"\&" + escaped


if __name__ == "__main__":
    print(render(), end="")
