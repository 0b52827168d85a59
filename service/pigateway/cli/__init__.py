"""The ``pigateway`` command line. Its verbs, options and exit codes are a contract.

Exit codes: :data:`EXIT_MEANINGS` (``--help`` and the man page print it): 0 done; 1 the
service or store failed; 2 bad input (arguments, params); 3 the queue refused the command
(full queue, full disk), or ``send --wait``: it was dead-lettered; 4 the service is not
running (``status`` too, as ``systemctl status`` exits non-zero for an inactive unit: its 3
is taken here by refusals); 5 ``send --wait``: queued, not yet delivered when the timeout
ran out (a service not running is said at once; the wait goes on, as it may be starting);
6 ``send --id``: the key names another command; 65 the queue file was migrated by a newer
pigateway (a downgrade; EX_DATAERR of sysexits(3)); 78 the config cannot be used (EX_CONFIG,
the service's too). The unit restarts the service on neither 65 nor 78: both stay until
someone acts. ``send`` reads
``[store]`` alone, so a mistake elsewhere in the file never refuses a producer's command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pigateway import __version__, inputs
from pigateway import config as configuration
from pigateway.errors import (
    ConfigError,
    InvalidCommand,
    InvalidJson,
    NewerSchema,
    PigatewayError,
    QueueFull,
    ServiceNotRunning,
    StoreFull,
)
from pigateway.store.producer import Producer
from pigateway.store.values import NewCommand, Unreadable, stored_object
from pigateway.text import json_kind, plural

if TYPE_CHECKING:  # the verbs that use them import them: send runs without asyncio
    from pigateway.store import QueueReader, Store

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_NOT_RUNNING = 0, 1, 2, 3, 4
EXIT_PENDING, EXIT_KEY_CONFLICT = 5, 6
EXIT_NEWER_QUEUE = 65  # sysexits(3) EX_DATAERR: the queue file is newer than this package
EXIT_CONFIG = 78  # sysexits(3) EX_CONFIG
#: The service's exits its unit does not restart on (``RestartPreventExitStatus=``): each
#: stays until someone acts, so it is said once, not every few seconds.
EXIT_NOT_RESTARTED = (EXIT_NEWER_QUEUE, EXIT_CONFIG)
#: Seconds between two looks at the store while ``send --wait`` waits.
WAIT_POLL = 0.05

#: Which error means which exit code (most specific first).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EXIT_CONFIG),
    (NewerSchema, EXIT_NEWER_QUEUE),
    (InvalidCommand, EXIT_BAD_INPUT),
    (QueueFull, EXIT_REFUSED),
    (StoreFull, EXIT_REFUSED),
    (ServiceNotRunning, EXIT_NOT_RUNNING),
    (PigatewayError, EXIT_FAILED),
)


#: What adds one verb's subparser (to the subparsers, with the options every verb has).
AddVerb = Callable[[Any, argparse.ArgumentParser], None]


class UsageError(PigatewayError):
    """Bad command-line input (exit 2)."""


class KeyConflict(PigatewayError):
    """``send --id KEY`` for a command other than the one the key already names (exit 6)."""


# --------------------------------------------------------------------------- parsing


def parse_params(pairs: Sequence[str], params_json: str | None) -> dict[str, Any]:
    """Build a command's params from ``--params-json`` and ``--param KEY=VALUE`` pairs.

    A VALUE that reads as JSON (``5``, ``true``, ``"x"``, ``[1,2]``) is taken as that; any
    other text is a string. ``--param`` wins over the same key in ``--params-json``. JSON
    that cannot be stored or sent on (too deep, not finite, a huge integer, a lone
    surrogate: see :mod:`pigateway.inputs`) is a :class:`UsageError`, never a traceback.
    """
    params: dict[str, Any] = {}
    if params_json is not None:
        try:
            loaded = inputs.loads(params_json)
        except InvalidCommand as exc:
            raise UsageError(f"--params-json {exc}") from exc
        if not isinstance(loaded, dict):
            raise UsageError(f"--params-json must be a JSON object, not {json_kind(loaded)}")
        params.update(loaded)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {inputs.shown(pair)} must look like KEY=VALUE")
        params[key.strip()] = _param_value(key.strip(), raw)
    return params


def _param_value(key: str, raw: str) -> Any:
    """``raw`` as JSON when it reads as JSON, else the text itself."""
    try:
        return inputs.loads(raw)
    except InvalidJson:
        return raw
    except InvalidCommand as exc:
        raise UsageError(f"--param {inputs.shown(key, 40)}: {exc}") from exc


#: Each exit code and what it means: the ``--help`` epilog and the man page say the same.
EXIT_MEANINGS: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "done (send: the command is on disk)"),
    (EXIT_FAILED, "the service or the store failed (the message says what to do)"),
    (EXIT_BAD_INPUT, "bad input: arguments, params; queue show: no such command"),
    (EXIT_REFUSED, "the queue refused the command (full queue, full disk); "
                   "send --wait: it was dead-lettered"),
    (EXIT_NOT_RUNNING, "the service is not running (status, pause, resume, flush)"),
    (EXIT_PENDING, "send --wait: queued, not yet delivered when --timeout ran out "
                   "(it stays queued and goes out once the service runs)"),
    (EXIT_KEY_CONFLICT, "send --id: the key already names a different command; "
                        "nothing queued"),
    (EXIT_NEWER_QUEUE, "the queue file was migrated by a newer pigateway (a downgrade): "
                       "nothing done; reinstall the newer package or restore a backup"),
    (75, "run: restart asked by remote management (systemd starts it again)"),
    (EXIT_CONFIG, "the config cannot be used (EX_CONFIG; pigateway config check says why)"),
)


def _epilog() -> str:
    """The exit codes, aligned and wrapped for an 80-column terminal (by hand: textwrap
    would be one more import on every ``send``)."""
    lines = ["exit codes:"]
    for code, text in EXIT_MEANINGS:
        line = f"  {code:>2} "
        for word in text.split():
            if len(line) + 1 + len(word) > 78:
                lines.append(line)
                line = " " * 5
            line += " " + word
        lines.append(line)
    return "\n".join(lines)


def _positive(text: str) -> int:
    """An ``--limit``: a whole number of at least 1 (0 or -1 would list nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    """A ``--timeout``: seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


class Help(argparse.RawDescriptionHelpFormatter):
    """argparse's help layout, the terminal's width read here: argparse would import
    :mod:`shutil` for it (and with it bz2, lzma, pwd) and ask the terminal again for each
    formatter it makes, about twenty on every ``send`` (~3% of its instructions)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_width() if width is None else width)


_WIDTH: list[int] = []


def _terminal_width() -> int:
    """As :func:`shutil.get_terminal_size` has it ($COLUMNS, else the terminal, else 80),
    less argparse's margin of 2; asked once."""
    if not _WIDTH:
        try:
            columns = int(os.environ.get("COLUMNS", "0"))
        except ValueError:
            columns = 0
        if columns <= 0:
            try:
                columns = os.get_terminal_size().columns  # standard output's
            except (ValueError, OSError):
                columns = 0
        _WIDTH.append((columns or 80) - 2)
    return _WIDTH[0]


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The command line, one subparser per verb of :data:`VERBS`. With ``verb`` (the word
    the arguments start with) only that verb's subparser is built: parsing its arguments
    needs no other, and building them all would cost every ``send`` ~4 ms more. Anything
    else (``--help``, ``--version``, a misspelt verb) gets them all. Every option has a
    help text that names its default (a test walks the tree and holds that)."""
    parser = argparse.ArgumentParser(
        prog="pigateway", epilog=_epilog(), formatter_class=Help,
        description="Durable device commands from a Raspberry Pi gateway to MQTT.")
    parser.add_argument("--version", action="version", version=f"pigateway {__version__}",
                        help="print the version and exit")
    common = argparse.ArgumentParser(add_help=False, formatter_class=Help)
    common.add_argument(
        "--config", metavar="FILE",
        help="config file (default: $PIGATEWAY_CONFIG or /etc/pigateway/config.toml)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in [verb] if verb in VERBS else VERBS:
        VERBS[name](verbs, common)
    return parser


def _verb(verbs: Any, name: str, text: str, *parents: argparse.ArgumentParser) -> Any:
    """One verb's subparser: ``text`` in the verb list and atop its own ``--help``, the
    exit codes below it."""
    return verbs.add_parser(name, parents=list(parents), help=text, description=text,
                            epilog=_epilog(), formatter_class=Help)


def _group(verbs: Any, verb: str, text: str) -> Any:
    """The subparsers of a verb that has verbs of its own (``queue ls``, ``config check``)."""
    return _verb(verbs, verb, text).add_subparsers(
        dest=f"{verb}_verb", required=True, metavar="VERB")


def _json(parser: Any) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print JSON, every field, for scripts (default: text for people)")


def _add_run(verbs: Any, common: argparse.ArgumentParser) -> None:
    run = _verb(verbs, "run", "run the service (systemd starts it: pigateway.service)", common)
    run.set_defaults(handler=cmd_run)


def _add_send(verbs: Any, common: argparse.ArgumentParser) -> None:
    send = _verb(verbs, "send", "queue one command; on exit 0 it is on disk and its id printed",
                 common)
    send.add_argument("--device", required=True, help="the device the command is for (required)")
    send.add_argument("--command", required=True, dest="name",
                      help="the command's name, e.g. start (required)")
    send.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                      help="one parameter; a VALUE that reads as JSON (5, true, [1,2]) is "
                           "taken as that, else as text; repeat for more (default: none)")
    send.add_argument("--params-json", metavar="JSON",
                      help="the parameters as one JSON object; --param wins over the same "
                           "key (default: none)")
    send.add_argument("--ttl", type=float, metavar="SECONDS",
                      help="dead-letter it as expired if not delivered within SECONDS "
                           "(default: the config's store.default_ttl, 7 days)")
    send.add_argument("--priority", choices=("high", "normal", "low"), default="normal",
                      help="claimed before lower priorities; a device's order holds within "
                           "one priority only, see docs/uplink.md (default: normal)")
    send.add_argument("--id", dest="key", metavar="KEY",
                      help="a producer's idempotency key: the same command with the same key "
                           "within 24 h queues nothing and prints the first command's id; "
                           "a different command with a used key is refused, exit 6 "
                           "(default: none)")
    send.add_argument("--wait", action="store_true",
                      help="return once the broker acknowledged it: prints the command id "
                           "and the batch id (exit 5: not yet; 3: dead-lettered); says at once "
                           "when the service is not running, and waits on, as it may be "
                           "starting (default: return once on disk)")
    send.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                      help="how long --wait waits (default: 30)")
    send.set_defaults(handler=cmd_send)


def _add_queue(verbs: Any, common: argparse.ArgumentParser) -> None:
    queue = _group(verbs, "queue", "look at and repair the queue")
    show = _verb(queue, "show", "where one command is: queued, in flight, delivered, dead",
                 common)
    show.add_argument("id", nargs="?", help="the command's id, as send printed it")
    show.add_argument("--key", metavar="KEY",
                      help="find the command by the producer key it was sent with "
                           "(send --id KEY), instead of its id (default: by id)")
    _json(show)
    show.set_defaults(handler=cmd_queue_show)
    ls = _verb(queue, "ls", "list queued commands, oldest first (or the newest dead letters)",
               common)
    ls.add_argument("--dead", action="store_true",
                    help="list dead letters instead, newest first (default: the queue)")
    ls.add_argument("--limit", type=_positive, default=50, metavar="N",
                    help="list at most N; a line under the list says how many there are "
                         "(default: 50)")
    _json(ls)
    ls.set_defaults(handler=cmd_queue_ls)
    stats = _verb(queue, "stats", "depth, size, oldest age, in flight, dead letters", common)
    _json(stats)
    stats.set_defaults(handler=cmd_queue_stats)
    requeue = _verb(queue, "requeue-dead",
                    "send dead letters again (all but the expired and the invalid, or one "
                    "--id)", common)
    requeue.add_argument("--id", metavar="ID",
                         help="only this dead letter "
                              "(default: all but the expired and the invalid)")
    requeue.add_argument("--expired", action="store_true",
                         help="with --id: send an expired command again (it is stale, and "
                              "may have been delivered already) (default: never)")
    requeue.set_defaults(handler=cmd_queue_requeue)
    purge = _verb(queue, "purge", "delete dead letters or everything", common)
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--dead", action="store_true", help="delete the dead letters")
    which.add_argument("--all", action="store_true", help="delete the queue and the dead letters")
    purge.add_argument("--yes", action="store_true",
                       help="really delete (default: only say what would go)")
    purge.set_defaults(handler=cmd_queue_purge)


def _add_status(verbs: Any, common: argparse.ArgumentParser) -> None:
    status = _verb(verbs, "status", "what the gateway is doing (exit 4: not running)", common)
    _json(status)
    status.set_defaults(handler=cmd_status)


def _add_metrics(verbs: Any, common: argparse.ArgumentParser) -> None:
    metrics = _verb(verbs, "metrics", "print Prometheus metrics (service running or not)",
                    common)
    metrics.set_defaults(handler=cmd_metrics)


def _control(verb: str, text: str) -> AddVerb:
    """The adder of a verb that asks the running service to do ``verb``."""
    def add(verbs: Any, common: argparse.ArgumentParser) -> None:
        sub = _verb(verbs, verb, text, common)
        sub.set_defaults(handler=cmd_control, control_verb=verb)
    return add


def _add_config(verbs: Any, common: argparse.ArgumentParser) -> None:
    cfg = _group(verbs, "config", "check the config")
    check = _verb(cfg, "check", "validate and print the effective config", common)
    check.add_argument("--user", metavar="NAME",
                       help="check every file it names as this user (default: the unit's "
                            "User=, pigateway, where it exists)")
    check.add_argument("--staged", action="store_true",
                       help="FILE is a copy its installer will own and chmod (Ansible's "
                            "validate): its own mode is not checked, the files it names are")
    check.set_defaults(handler=cmd_config_check)


def _add_inbox(verbs: Any, common: argparse.ArgumentParser) -> None:
    inbox = _group(verbs, "inbox", "commands from the broker")
    inbox_ls = _verb(inbox, "ls", "pending, running and finished commands", common)
    inbox_ls.add_argument("--limit", type=_positive, default=100, metavar="N",
                          help="list at most N; a line under the list says when there are "
                               "more (default: 100)")
    _json(inbox_ls)
    inbox_ls.set_defaults(handler=cmd_inbox_ls)


#: Each verb, in the order ``--help`` lists them, and what adds its subparser.
VERBS: dict[str, AddVerb] = {
    "run": _add_run,
    "send": _add_send,
    "queue": _add_queue,
    "status": _add_status,
    "metrics": _add_metrics,
    "pause": _control("pause", "stop draining (queueing goes on)"),
    "resume": _control("resume", "drain again"),
    "flush": _control("flush", "send the batch window now and retry the link at once"),
    "config": _add_config,
    "inbox": _add_inbox,
}


# --------------------------------------------------------------------------- verbs


def cmd_run(args: argparse.Namespace) -> int:
    """The service. Logging comes before the config, so a config that cannot be read is in
    the journal at crit like every other reason it stops (:func:`main` reports them)."""
    import asyncio  # noqa: PLC0415 - not for send

    # the service pulls in MQTT and GPIO; send does not
    from pigateway import app  # noqa: PLC0415
    from pigateway.logs import setup_logging  # noqa: PLC0415
    from pigateway.manage import remoteconfig  # noqa: PLC0415

    setup_logging("info")
    config, trial = remoteconfig.service_config(args.config)  # a remote config-set to try?
    restart = asyncio.run(app.run(config, trial))
    return remoteconfig.EXIT_RESTART if restart else EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    """Queue one command. No event loop: the :class:`Producer` puts on a connection of its
    own, so ``send`` never imports asyncio (it returns within 100 ms)."""
    store = configuration.load_store(args.config)  # [store] alone: what send uses
    params = parse_params(args.param, args.params_json)
    with Producer.open(store) as producer:
        if args.key is None:
            command_id = producer.put(args.device, args.name, params, ttl=args.ttl,
                                      priority=args.priority, watch=args.wait).id
        else:
            item = NewCommand(args.device, args.name, params, ttl=args.ttl,
                              priority=args.priority)
            command, command_id = producer.put_keyed(args.key, item)
            if command is None:
                _same_or_refuse(producer, args.key, command_id, item)
        if not args.wait:
            print(command_id)
            return EXIT_OK
        socket_path = _control_socket(args)
        if socket_path is not None and not _service_answers(socket_path):
            # said at once; the wait goes on (systemd may be starting the service)
            print(f"{command_id} queued; pigateway is not running (nothing answers on "
                  f"{socket_path}): it goes out once the service runs; waiting up to "
                  f"{args.timeout:g}s for that", file=sys.stderr, flush=True)
        return _wait_for(producer, command_id, args.timeout)


def _same_or_refuse(producer: Producer, key: str, first_id: str, item: NewCommand) -> None:
    """A key sent again must name the same command: the same device, name and params as
    the first (a retry); a different one would be silently dropped, so it is refused
    (:class:`KeyConflict`, exit 6). A first command already delivered is gone from the
    file and cannot be compared: a warning says so, and the retry stays a no-op."""
    first_content = producer.content(first_id)
    if first_content is None:
        print(f"pigateway: --id {inputs.shown(key, 40)} was used within 24 h for {first_id}, "
              "which was delivered; nothing queued (its content is not kept, so this send "
              "was not compared with it)", file=sys.stderr)
        return
    device, name, params = first_content
    try:  # the one reading of stored params: a row that no longer reads says why
        first_params = stored_object(params)
    except Unreadable as exc:
        raise KeyConflict(
            f"--id {inputs.shown(key, 40)} already names command {first_id}, whose stored "
            f"params cannot be read ({exc}), so this send cannot be compared with it; "
            "nothing queued. Use a new key for a new command") from None
    if (device, name, first_params) != (item.device, item.name,
                                        json.loads(json.dumps(item.params))):
        raise KeyConflict(
            f"--id {inputs.shown(key, 40)} already names command {first_id} "
            f"({inputs.shown(device, 40)} {inputs.shown(name, 40)} {inputs.shown(params, 80)}),"
            " a different command; nothing queued. Use a new key for a new command")


def _control_socket(args: argparse.Namespace) -> Path | None:
    """The control socket of the config, for ``send --wait``'s look; ``None`` when the rest
    of the config does not load (``send`` reads ``[store]`` alone: the service, which would
    not start, and ``config check`` report that, not a producer)."""
    try:
        return _load(args).control.socket
    except ConfigError:
        return None


def _service_answers(path: Path) -> bool:
    """Whether the service listens on its control socket: a plain connect (no asyncio,
    no request), so ``send --wait`` can say at once that nothing will deliver it. Only "no
    socket" and "nobody listens" mean not running: a producer outside the pigateway group
    (no permission) or a busy service says nothing rather than something false."""
    import socket  # noqa: PLC0415 - only for send --wait

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True
    return True


def _wait_for(producer: Producer, command_id: str, timeout: float) -> int:
    """Until the command is delivered (0), dead (3) or ``timeout`` ran out (5).

    It only reads the store, so a restart of the service meanwhile changes nothing.
    """
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        where = producer.where(command_id)
        if where.state == "delivered":
            print(f"{command_id} {where.batch}")
            return EXIT_OK
        if where.state == "dead":
            print(f"{command_id} dead-lettered: {where.reason}"
                  + (f": {where.detail}" if where.detail else ""), file=sys.stderr)
            return EXIT_REFUSED
        if time.monotonic() >= deadline:
            print(f"{command_id} queued, not yet delivered ({where.state})", file=sys.stderr)
            return EXIT_PENDING
        time.sleep(WAIT_POLL)


async def cmd_queue_show(args: argparse.Namespace) -> int:
    from pigateway.cli import report  # noqa: PLC0415

    if (args.id is None) == (args.key is None):
        raise UsageError("queue show takes a command id or --key KEY (one of the two)")
    async with await _open_reader(args) as store:
        command_id = args.id if args.key is None else await store.key_owner(args.key)
        if command_id is None:
            raise UsageError(f"no command was sent with --id {inputs.shown(args.key, 40)} "
                             "in the last 24 h")
        where = await store.where(command_id)
    shown = {**where.as_dict(), **({"key": args.key} if args.key is not None else {})}
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        print(report.where_text(shown, time.time()))
    return EXIT_OK if where.state != "unknown" else EXIT_BAD_INPUT


async def cmd_queue_ls(args: argparse.Namespace) -> int:
    from pigateway.cli import report  # noqa: PLC0415

    async with await _open_reader(args) as store:
        items = await (store.list_dead(args.limit) if args.dead else store.list_queued(args.limit))
        stats = await store.stats() if len(items) >= args.limit else None
    rows = [item.as_dict() for item in items]
    total = len(rows) if stats is None else (stats.dead_total if args.dead else stats.depth)
    note = report.more(len(rows), total, "dead letters" if args.dead else "queued",
                       max(total, args.limit * 2))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.dead:
        print(report.table(rows, ("id", "device", "name", "reason", "attempts", "dead_at",
                                  "detail"), time.time()))
    else:
        print(report.table(rows, ("id", "device", "name", "attempts", "queued_at",
                                  "last_error"), time.time()))
    if note:  # on stderr with --json: stdout stays the JSON
        print(note, file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


async def cmd_queue_stats(args: argparse.Namespace) -> int:
    from pigateway.cli import report  # noqa: PLC0415

    async with await _open_reader(args) as store:
        stats = (await store.stats()).as_dict()
        # forwarded messages (ingest) apart from commands (a scan: here only)
        stats["forwarded"], stats["forwarded_bytes"] = await store.forwarded()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(report.stats_text(stats))
    return EXIT_OK


async def cmd_queue_requeue(args: argparse.Namespace) -> int:
    if args.expired and not args.id:
        raise UsageError("--expired needs --id: stale commands are sent again one by one, "
                         "never all at once")
    async with await _open_store(args) as store:
        count = await store.requeue_dead(args.id, expired=args.expired,
                                         progress=_progress("requeued"))
    if args.id and count == 0:
        raise UsageError(f"no dead letter has id {args.id!r}")
    print(f"requeued {plural(count, 'dead letter')}")
    return EXIT_OK


async def cmd_queue_purge(args: argparse.Namespace) -> int:
    what = "the whole queue and every dead letter" if args.all else "every dead letter"
    if not args.yes:
        raise UsageError(f"this deletes {what}; add --yes to confirm")
    async with await _open_store(args) as store:
        count = await store.purge(queued=args.all, progress=_progress("deleted"))
    print(f"deleted {plural(count, 'row')}: {what}")
    return EXIT_OK


async def cmd_config_check(args: argparse.Namespace) -> int:
    from pigateway import handlers  # noqa: PLC0415
    from pigateway.cli import access  # noqa: PLC0415

    config = _load(args)
    handlers.check(config)  # device options too, without touching a pin or a broker
    account = access.Account.named(args.user or access.SERVICE_USER)
    if account is None and args.user:
        raise UsageError(f"--user {args.user}: no such user here")
    account = account or access.Account.current()  # no pigateway user here: as ourselves
    access.check(config, account, staged=args.staged)  # as the service will meet its files
    from pigateway.ingest import localbroker  # noqa: PLC0415

    for warning in localbroker.warnings(config):  # valid, but ingest may lose messages
        print(f"warning: {warning}", file=sys.stderr)
    for warning in access.sandbox_warnings(config):  # valid, but not under the unit
        print(f"warning: {warning}", file=sys.stderr)
    print(f"# {config.source}: valid, its files usable by user {account.name}")
    print(json.dumps(config.as_dict(), indent=2, default=str))
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    """The state, for people first (``report``); exit 4 when the service is not running,
    as ``systemctl status`` exits non-zero for an inactive unit (its 3 is ours for a
    refusal: see the module's exit codes)."""
    from pigateway.cli import report  # noqa: PLC0415 - only the verbs that talk to the service
    from pigateway.listeners import control  # noqa: PLC0415 - only the verbs that talk to the service

    config = _load(args)
    try:
        reply = await control.request(config.control.socket, "status")
        state: dict[str, Any] = {"running": True, **reply.get("state", {})}
    except ServiceNotRunning as exc:
        async with await _reader(config.store) as store:  # looks, never creates
            stats = (await store.stats()).as_dict()
        state = {"running": False, "why": str(exc), **stats}
    now = time.time()
    if args.json:
        print(json.dumps(state, indent=2, default=str))
    elif state["running"]:
        print(report.status_running(state, _status_line(state, now), now))
    else:
        print(report.status_stopped(state, state["why"], now))
    return EXIT_OK if state["running"] else EXIT_NOT_RUNNING


def _status_line(state: dict[str, Any], now: float) -> str:
    """The service's own ``STATUS=`` line for ``state`` (one wording for systemd and us)."""
    from pigateway.state import GatewayState, Link  # noqa: PLC0415 - asyncio: never for send
    from pigateway.systemd import status_line  # noqa: PLC0415

    local = state.get("local")
    shown = GatewayState(
        link=Link(state.get("link", "offline")), local=Link(local) if local else None,
        paused=bool(state.get("paused")), draining=bool(state.get("draining")),
        depth=int(state.get("depth") or 0), oldest_age=state.get("oldest_age"),
        dead_letters=int(state.get("dead_letters") or 0), fault=state.get("fault"),
        retry_at=state.get("retry_at"), link_since=float(state.get("link_since") or now))
    return status_line(shown, now)


async def cmd_metrics(args: argparse.Namespace) -> int:
    from pigateway.listeners import metrics  # noqa: PLC0415 - prometheus-client only for this verb

    sys.stdout.buffer.write(metrics.render(await metrics.cli_snapshot(_load(args))))
    return EXIT_OK


async def cmd_control(args: argparse.Namespace) -> int:
    from pigateway.listeners import control  # noqa: PLC0415 - only the verbs that talk to the service

    config = _load(args)
    await control.request(config.control.socket, args.control_verb)  # a refusal raises
    print(CONTROL_DONE[args.control_verb])
    return EXIT_OK


#: What a control verb did, said when the service confirmed it.
CONTROL_DONE: dict[str, str] = {
    "pause": "paused: queueing goes on, nothing is sent until `pigateway resume`",
    "resume": "resumed: draining the queue",
    "flush": "flushed: the open batch goes now and a down link is retried at once",
}


async def cmd_inbox_ls(args: argparse.Namespace) -> int:
    from pigateway.cli import report  # noqa: PLC0415

    async with await _open_reader(args) as reader:
        rows = [entry.as_dict() for entry in await reader.inbox.listing(args.limit + 1)]
    note = report.more(args.limit, None if len(rows) > args.limit else len(rows),
                       "inbox entries", args.limit * 2)
    rows = rows[:args.limit]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(report.table(rows, ("id", "device", "name", "state", "status", "attempts",
                                  "received_at", "last_error"), time.time()))
    if note:
        print(note, file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


# --------------------------------------------------------------------------- output


def _load(args: argparse.Namespace) -> configuration.Config:
    return configuration.load(args.config)


async def _open_store(args: argparse.Namespace) -> Store:
    from pigateway.store import Store  # noqa: PLC0415 - asyncio: never for send

    return await Store.open(_load(args).store, drainer=False)


async def _open_reader(args: argparse.Namespace) -> QueueReader:
    """The queue for a verb that only looks: read-only, never created, migrated or moved."""
    return await _reader(_load(args).store)


async def _reader(config: configuration.StoreConfig) -> QueueReader:
    from pigateway.store import QueueReader  # noqa: PLC0415 - asyncio: never for send

    reader = await QueueReader.open(config)
    _say_note(reader)
    return reader


def _say_note(reader: QueueReader) -> None:
    if reader.note:  # on stderr: stdout stays the table or the JSON
        print(f"pigateway: {reader.note}", file=sys.stderr)


#: Rows between two progress lines of a long purge or requeue.
PROGRESS_EVERY = 50_000


def _progress(verb: str) -> Callable[[int], None]:
    """A progress line on stderr every :data:`PROGRESS_EVERY` rows of a long sweep."""
    shown = [0]

    def show(done: int) -> None:
        if done - shown[0] >= PROGRESS_EVERY:
            shown[0] = done
            print(f"pigateway: {verb} {plural(done, 'row')} so far", file=sys.stderr, flush=True)
    return show


# --------------------------------------------------------------------------- entry point


def exit_code(exc: BaseException) -> int:
    """The exit code for an error, from the :data:`EXIT_CODES` table."""
    if isinstance(exc, UsageError):
        return EXIT_BAD_INPUT
    if isinstance(exc, KeyConflict):
        return EXIT_KEY_CONFLICT
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), EXIT_FAILED)


#: A verb: its exit code, or (most verbs, async) a coroutine that returns it.
Handler = Callable[[argparse.Namespace], int | Coroutine[Any, Any, int]]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; errors become one line on stderr and an exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    handler: Handler = args.handler
    try:
        return _finish(handler(args))
    except PigatewayError as exc:
        if handler is cmd_run:  # the journal at crit, not stderr (priority info there)
            return _service_failed(exc, args)
        from pigateway.cli.report import words  # noqa: PLC0415 - on an error only: send stays light

        print(f"pigateway: {words(exc)}", file=sys.stderr)  # no [Errno N]: the words say it
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if handler is cmd_run:  # a bug: its traceback in the journal at crit, exit 1
            return _service_failed(exc, args)
        raise


def _service_failed(exc: BaseException, args: argparse.Namespace) -> int:
    from pigateway import app  # noqa: PLC0415 - only the service

    code = exit_code(exc)
    app.report_failure(exc, configuration.config_path(args.config),
                       config_error=code == EXIT_CONFIG,
                       restarted=code not in EXIT_NOT_RESTARTED)
    return code


def _finish(outcome: int | Coroutine[Any, Any, int]) -> int:
    """An async verb's coroutine run to its end in an event loop of its own; asyncio is
    imported here, for the verbs that need it (``send`` needs none)."""
    if isinstance(outcome, int):
        return outcome
    import asyncio  # noqa: PLC0415 - send must start in 100 ms

    return asyncio.run(outcome)


if __name__ == "__main__":
    sys.exit(main())
