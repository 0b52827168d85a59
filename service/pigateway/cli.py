"""The ``pigateway`` command line. Its verbs, options and exit codes are a contract.

Exit codes: 0 done; 1 the service or store failed; 2 bad input (arguments, params); 3 the
queue refused the command (full queue, full disk), or ``send --wait``: it was
dead-lettered; 4 the service is not running (for verbs that need it); 5 ``send --wait``:
queued, not yet delivered when the timeout ran out (it stays queued); 78 the config cannot
be used (EX_CONFIG of sysexits(3), the service's too: its unit does not restart on it).
``send`` reads ``[store]`` alone, so a mistake elsewhere in the file never refuses a
producer's command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from pigateway import __version__, inputs
from pigateway import config as configuration
from pigateway.errors import (
    ConfigError,
    InvalidCommand,
    InvalidJson,
    PigatewayError,
    QueueFull,
    ServiceNotRunning,
    StoreFull,
)
from pigateway.store.producer import Producer
from pigateway.store.values import NewCommand
from pigateway.text import format_age

if TYPE_CHECKING:  # the verbs that use them import them: send runs without asyncio
    from pigateway.store import QueueReader, Store

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_NOT_RUNNING = 0, 1, 2, 3, 4
EXIT_PENDING = 5
EXIT_CONFIG = 78  # sysexits(3) EX_CONFIG
#: Seconds between two looks at the store while ``send --wait`` waits.
WAIT_POLL = 0.05

#: Which error means which exit code (most specific first).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EXIT_CONFIG),
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
            raise UsageError(f"--params-json must be a JSON object, got {type(loaded).__name__}")
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


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The command line, one subparser per verb of :data:`VERBS`. With ``verb`` (the word
    the arguments start with) only that verb's subparser is built: parsing its arguments
    needs no other, and building them all would cost every ``send`` ~4 ms more. Anything
    else (``--help``, ``--version``, a misspelt verb) gets them all."""
    parser = argparse.ArgumentParser(
        prog="pigateway",
        description="Durable device commands from a Raspberry Pi gateway to MQTT.")
    parser.add_argument("--version", action="version", version=f"pigateway {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE",
        help="config file (default: $PIGATEWAY_CONFIG or /etc/pigateway/config.toml)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in [verb] if verb in VERBS else VERBS:
        VERBS[name](verbs, common)
    return parser


def _group(verbs: Any, verb: str, text: str) -> Any:
    """The subparsers of a verb that has verbs of its own (``queue ls``, ``config check``)."""
    return verbs.add_parser(verb, help=text).add_subparsers(
        dest=f"{verb}_verb", required=True, metavar="VERB")


def _add_run(verbs: Any, common: argparse.ArgumentParser) -> None:
    run = verbs.add_parser("run", parents=[common], help="run the service")
    run.set_defaults(handler=cmd_run)


def _add_send(verbs: Any, common: argparse.ArgumentParser) -> None:
    send = verbs.add_parser("send", parents=[common],
                            help="queue one command (durable on exit 0)")
    send.add_argument("--device", required=True)
    send.add_argument("--command", required=True, dest="name")
    send.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    send.add_argument("--params-json", metavar="JSON")
    send.add_argument("--ttl", type=float, metavar="SECONDS")
    send.add_argument("--priority", choices=("high", "normal", "low"), default="normal",
                      help="claimed before lower priorities; a device's order holds within "
                           "one priority only (docs/uplink.md)")
    send.add_argument("--id", dest="key", metavar="KEY",
                      help="a producer's idempotency key: the same key again within 24 h "
                           "queues nothing and prints the first command's id")
    send.add_argument("--wait", action="store_true",
                      help="return once the broker acknowledged it: prints the command id "
                           "and the batch id (exit 5: not yet; 3: dead-lettered)")
    send.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="how long --wait waits (default 30)")
    send.set_defaults(handler=cmd_send)


def _add_queue(verbs: Any, common: argparse.ArgumentParser) -> None:
    queue = _group(verbs, "queue", "look at and repair the queue")
    show = queue.add_parser("show", parents=[common],
                            help="where one command is: queued, in flight, delivered, dead")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_queue_show)
    ls = queue.add_parser("ls", parents=[common], help="list queued (or dead) commands")
    ls.add_argument("--dead", action="store_true", help="list dead letters instead")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=cmd_queue_ls)
    stats = queue.add_parser("stats", parents=[common], help="depth, bytes, age, dead letters")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(handler=cmd_queue_stats)
    requeue = queue.add_parser("requeue-dead", parents=[common],
                               help="send dead letters again (all but the expired, or one --id)")
    requeue.add_argument("--id")
    requeue.add_argument("--expired", action="store_true",
                         help="with --id: send an expired command again (it is stale, and "
                              "may have been delivered already)")
    requeue.set_defaults(handler=cmd_queue_requeue)
    purge = queue.add_parser("purge", parents=[common], help="delete dead letters or everything")
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--dead", action="store_true", help="delete the dead letters")
    which.add_argument("--all", action="store_true", help="delete the queue and the dead letters")
    purge.add_argument("--yes", action="store_true", help="really delete")
    purge.set_defaults(handler=cmd_queue_purge)


def _add_status(verbs: Any, common: argparse.ArgumentParser) -> None:
    status = verbs.add_parser("status", parents=[common], help="what the gateway is doing")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)


def _add_metrics(verbs: Any, common: argparse.ArgumentParser) -> None:
    metrics = verbs.add_parser("metrics", parents=[common],
                               help="print Prometheus metrics (service running or not)")
    metrics.set_defaults(handler=cmd_metrics)


def _control(verb: str, text: str) -> AddVerb:
    """The adder of a verb that asks the running service to do ``verb``."""
    def add(verbs: Any, common: argparse.ArgumentParser) -> None:
        sub = verbs.add_parser(verb, parents=[common], help=text)
        sub.set_defaults(handler=cmd_control, control_verb=verb)
    return add


def _add_config(verbs: Any, common: argparse.ArgumentParser) -> None:
    cfg = _group(verbs, "config", "check the config")
    check = cfg.add_parser("check", parents=[common],
                           help="validate and print the effective config")
    check.set_defaults(handler=cmd_config_check)


def _add_inbox(verbs: Any, common: argparse.ArgumentParser) -> None:
    inbox = _group(verbs, "inbox", "commands from the broker")
    inbox_ls = inbox.add_parser("ls", parents=[common],
                                help="pending, running and finished commands")
    inbox_ls.add_argument("--limit", type=int, default=100)
    inbox_ls.add_argument("--json", action="store_true")
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

    from pigateway import app  # noqa: PLC0415 - the service pulls in MQTT and GPIO; send does not
    from pigateway.logs import setup_logging  # noqa: PLC0415

    setup_logging("info")
    config = _load(args)
    asyncio.run(app.run(config))
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    """Queue one command. No event loop: the :class:`Producer` puts on a connection of its
    own, so ``send`` never imports asyncio (issue 11: it returns within 100 ms)."""
    store = configuration.load_store(args.config)  # [store] alone: what send uses
    params = parse_params(args.param, args.params_json)
    with Producer.open(store) as producer:
        if args.key is None:
            command_id = producer.put(args.device, args.name, params, ttl=args.ttl,
                                      priority=args.priority, watch=args.wait).id
        else:
            _, command_id = producer.put_keyed(args.key, NewCommand(
                args.device, args.name, params, ttl=args.ttl, priority=args.priority))
        if not args.wait:
            print(command_id)
            return EXIT_OK
        return _wait_for(producer, command_id, args.timeout)


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
    async with await _open_reader(args) as store:
        where = await store.where(args.id)
    if args.json:
        print(json.dumps(where.as_dict(), indent=2))
    else:
        print("\n".join(f"{key:>10}: {value}" for key, value in where.as_dict().items()))
    return EXIT_OK if where.state != "unknown" else EXIT_BAD_INPUT


async def cmd_queue_ls(args: argparse.Namespace) -> int:
    async with await _open_reader(args) as store:
        items = await (store.list_dead(args.limit) if args.dead else store.list_queued(args.limit))
    rows = [item.as_dict() for item in items]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.dead:
        _table(rows, ("id", "device", "name", "reason", "attempts", "detail"))
    else:
        _table(rows, ("id", "device", "name", "attempts", "queued_at", "last_error"))
    return EXIT_OK


async def cmd_queue_stats(args: argparse.Namespace) -> int:
    async with await _open_reader(args) as store:
        stats = (await store.stats()).as_dict()
        # forwarded messages (ingest) apart from commands (a scan: here only)
        stats["forwarded"], stats["forwarded_bytes"] = await store.forwarded()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(_stats_text(stats))
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
    print(f"requeued {count} dead letter(s)")
    return EXIT_OK


async def cmd_queue_purge(args: argparse.Namespace) -> int:
    what = "the whole queue and every dead letter" if args.all else "every dead letter"
    if not args.yes:
        raise UsageError(f"this deletes {what}; add --yes to confirm")
    async with await _open_store(args) as store:
        count = await store.purge(queued=args.all, progress=_progress("deleted"))
    print(f"deleted {count} row(s): {what}")
    return EXIT_OK


async def cmd_config_check(args: argparse.Namespace) -> int:
    from pigateway import handlers  # noqa: PLC0415

    config = _load(args)
    handlers.check(config)  # device options too, without touching a pin or a broker
    print(f"# {config.source}: valid")
    print(json.dumps(config.as_dict(), indent=2, default=str))
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    from pigateway import control  # noqa: PLC0415 - only the verbs that talk to the service

    config = _load(args)
    try:
        reply = await control.request(config.control.socket, "status")
        state: dict[str, Any] = {"running": True, **reply.get("state", {})}
    except ServiceNotRunning as exc:
        async with await _reader(config.store) as store:  # looks, never creates
            stats = (await store.stats()).as_dict()
        state = {"running": False, "why": str(exc), **stats}
    if args.json:
        print(json.dumps(state, indent=2, default=str))
    elif state["running"]:
        print("\n".join(f"{key:>12}: {value}" for key, value in state.items()))
    else:
        print(f"{state['why']}; the queue on disk:")
        print(_stats_text(state))
    return EXIT_OK


async def cmd_metrics(args: argparse.Namespace) -> int:
    from pigateway import metrics  # noqa: PLC0415 - prometheus-client only for this verb

    sys.stdout.buffer.write(metrics.render(await metrics.cli_snapshot(_load(args))))
    return EXIT_OK


async def cmd_control(args: argparse.Namespace) -> int:
    from pigateway import control  # noqa: PLC0415 - only the verbs that talk to the service

    config = _load(args)
    reply = await control.request(config.control.socket, args.control_verb)
    print(f"{args.control_verb}: ok" if reply.get("ok") else f"{args.control_verb}: {reply}")
    return EXIT_OK if reply.get("ok") else EXIT_FAILED


async def cmd_inbox_ls(args: argparse.Namespace) -> int:
    async with await _open_reader(args) as reader:
        rows = [entry.as_dict() for entry in await reader.inbox.listing(args.limit)]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        _table(rows, ("id", "device", "name", "state", "attempts", "result"))
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
            print(f"pigateway: {verb} {done:,} row(s) so far", file=sys.stderr, flush=True)
    return show


def _stats_text(stats: dict[str, Any]) -> str:
    age = stats.get("oldest_age")
    dead = stats.get("dead") or {}
    lines = [
        f"queued:     {stats['depth'] - stats.get('forwarded', 0):,} commands, "
        f"{stats['bytes'] - stats.get('forwarded_bytes', 0):,} bytes",
        *([f"forwarded:  {stats['forwarded']:,} messages, {stats['forwarded_bytes']:,} bytes"]
          if "forwarded" in stats else []),
        f"in flight:  {stats['in_flight']:,}",
        f"oldest:     {format_age(age) if age is not None else '-'}",
        f"dead:       {sum(dead.values()):,}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(dead.items()))})" if dead else ""),
    ]
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(line[i]) for line in cells)) for i, col in enumerate(columns)]
    print("  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True)))
    for line in cells:
        print("  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value > 1e9:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- entry point


def exit_code(exc: BaseException) -> int:
    """The exit code for an error, from the :data:`EXIT_CODES` table."""
    if isinstance(exc, UsageError):
        return EXIT_BAD_INPUT
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
        print(f"pigateway: {exc}", file=sys.stderr)
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
                       config_error=code == EXIT_CONFIG)
    return code


def _finish(outcome: int | Coroutine[Any, Any, int]) -> int:
    """An async verb's coroutine run to its end in an event loop of its own; asyncio is
    imported here, for the verbs that need it (``send`` needs none)."""
    if isinstance(outcome, int):
        return outcome
    import asyncio  # noqa: PLC0415 - not for send (issue 11)

    return asyncio.run(outcome)


if __name__ == "__main__":
    sys.exit(main())
