"""Logging: priorities and fields for the journal, readable lines by hand.

The journal's native socket is a real AF_UNIX datagram socket bound in a temporary folder
(``PIGATEWAY_JOURNAL_SOCKET``); ``JOURNAL_STREAM`` names a real file standing in for the
stream systemd would give us.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from harness.sockets import DatagramListener
from pigateway.logs import QUIET, encode_field, priority, setup_logging

LEVELS = [
    (logging.DEBUG, "7"),
    (logging.INFO, "6"),
    (logging.WARNING, "4"),
    (logging.ERROR, "3"),
    (logging.CRITICAL, "2"),
]


def parse_native(data: bytes) -> dict[str, str]:
    """Decode one datagram of the native journal protocol (the last value of a repeated field)."""
    return {name: values[-1] for name, values in parse_fields(data).items()}


def parse_fields(data: bytes) -> dict[str, list[str]]:
    """Decode one datagram of the native journal protocol (both field forms, every value)."""
    fields: dict[str, list[str]] = {}
    while data:
        head, _, rest = data.partition(b"\n")
        if b"=" in head:
            name, _, value = head.partition(b"=")
            data = rest
        else:
            name = head
            (size,) = struct.unpack("<Q", rest[:8])
            value, data = rest[8 : 8 + size], rest[8 + size + 1 :]
            assert rest[8 + size : 9 + size] == b"\n"
        fields.setdefault(name.decode(), []).append(value.decode())
    return fields


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger back the way pytest had it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)
    logging.captureWarnings(False)  # setup_logging's; pytest's own recorder comes back


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Iterator[DatagramListener]:
    listener = DatagramListener("journal.sock")
    monkeypatch.setenv("PIGATEWAY_JOURNAL_SOCKET", str(listener.path))
    yield listener
    listener.close()


@pytest.fixture
def stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[io.TextIOWrapper]:
    """A real file that ``JOURNAL_STREAM`` names, as systemd does for our stderr."""
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        yield out


def _written(out: io.TextIOWrapper) -> str:
    out.flush()
    out.seek(0)
    return out.read()


@pytest.mark.parametrize(("level", "prio"), LEVELS)
def test_priority_of_each_level(level: int, prio: str) -> None:
    assert str(priority(level)) == prio


def test_levels_between_the_named_ones_round_down() -> None:
    assert priority(logging.WARNING + 5) == 4
    assert priority(logging.DEBUG - 5) == 7


def test_encode_field_plain_and_binary_safe() -> None:
    assert encode_field("MESSAGE", "hello") == b"MESSAGE=hello\n"
    assert encode_field("MESSAGE", "a\nb") == b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\n"


@pytest.mark.usefixtures("root_logging")
def test_under_the_journal_every_record_has_its_priority(
    journal: DatagramListener, stream: io.TextIOWrapper
) -> None:
    setup_logging("debug", stream=stream)
    log = logging.getLogger("pigateway.test")
    for level, _prio in LEVELS:
        log.log(level, "level %s", logging.getLevelName(level))
    journal.wait_for(lambda t: "MESSAGE=level ERROR" in t)
    records = [parse_native(d.data) for d in journal.messages()]
    assert [(r["MESSAGE"], r["PRIORITY"]) for r in records] == [
        (f"level {logging.getLevelName(level)}", prio) for level, prio in LEVELS[:-1]
    ]
    assert {r["SYSLOG_IDENTIFIER"] for r in records} == {"pigateway"}
    assert {r["LOGGER"] for r in records} == {"pigateway.test"}
    assert records[0]["CODE_FUNC"] == "test_under_the_journal_every_record_has_its_priority"
    # crit, why the service ends, goes by the stream: its unit is known to journald even
    # when the process is gone before the record is read
    assert _written(stream) == "<2>pigateway.test: level CRITICAL\n", "nothing doubled"


@pytest.mark.usefixtures("root_logging")
def test_journal_fields_from_extra(journal: DatagramListener, stream: io.TextIOWrapper) -> None:
    setup_logging("info", stream=stream)
    log = logging.getLogger("pigateway.uplink")
    log.warning("batch rejected", extra={"command_id": "01JABC", "device": "pump1",
                                         "batch_id": "b-7", "queue_depth": 1204})
    log.debug("not shown at info")
    log.info("plain")
    journal.wait_for(lambda t: "MESSAGE=plain" in t)
    first, second = (parse_native(d.data) for d in journal.messages())
    assert first["COMMAND_ID"] == "01JABC"
    assert first["DEVICE"] == "pump1"
    assert first["BATCH_ID"] == "b-7"
    assert first["QUEUE_DEPTH"] == "1204"
    assert first["PRIORITY"] == "4"
    assert "COMMAND_ID" not in second


@pytest.mark.usefixtures("root_logging")
def test_a_traceback_stays_one_record(journal: DatagramListener, stream: io.TextIOWrapper) -> None:
    setup_logging("info", stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("pigateway").exception("it failed")
    record = parse_native(journal.wait_for(lambda t: "it failed" in t).data)
    assert record["PRIORITY"] == "3"
    assert record["MESSAGE"].startswith("it failed\nTraceback")
    assert record["MESSAGE"].endswith("ValueError: boom")


@pytest.mark.usefixtures("root_logging")
def test_a_record_too_big_for_a_datagram_goes_as_a_sealed_memfd(
    journal: DatagramListener, stream: io.TextIOWrapper
) -> None:
    setup_logging("info", stream=stream)
    big = "x" * 400_000  # over the default socket send buffer
    logging.getLogger("pigateway").info("big %s", big)
    dgram = journal.wait_for(lambda t: True)
    assert dgram.data == b""
    (fd,) = dgram.fds
    os.lseek(fd, 0, os.SEEK_SET)
    content = b""
    while chunk := os.read(fd, 1 << 20):
        content += chunk
    assert parse_native(content)["MESSAGE"] == "big " + big


@pytest.mark.usefixtures("root_logging")
def test_when_the_journal_socket_vanishes_records_fall_back_to_the_stream(
    journal: DatagramListener, stream: io.TextIOWrapper
) -> None:
    setup_logging("info", stream=stream)
    journal.close()
    logging.getLogger("pigateway").warning("still here")
    assert _written(stream) == "<4>pigateway: still here\n"


@pytest.mark.usefixtures("root_logging")
def test_without_the_native_socket_lines_carry_sd_daemon_prefixes(
    stream: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PIGATEWAY_JOURNAL_SOCKET", str(tmp_path / "missing.sock"))
    setup_logging("debug", stream=stream)
    log = logging.getLogger("pigateway.store")
    for level, _prio in LEVELS:
        log.log(level, "two\nlines")
    lines = _written(stream).splitlines()
    expected = [f"<{prio}>" for _level, prio in LEVELS for _ in range(2)]
    assert [line[:3] for line in lines] == expected
    assert lines[:2] == ["<7>pigateway.store: two", "<7>lines"]


@pytest.mark.usefixtures("root_logging")
def test_by_hand_lines_are_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: DatagramListener
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("warning", stream=out)
    log = logging.getLogger("pigateway.uplink")
    log.info("hidden")
    log.warning("link lost; retrying in 4s", extra={"device": "pump1"})
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" WARNING pigateway.uplink: link lost; retrying in 4s [device=pump1]")
    assert line[:4].isdigit(), "a timestamp leads the line"
    assert not journal.messages()


@pytest.mark.usefixtures("root_logging")
def test_a_journal_stream_that_is_not_our_stderr_is_ignored(
    monkeypatch: pytest.MonkeyPatch, journal: DatagramListener, tmp_path: Path
) -> None:
    """JOURNAL_STREAM inherited by a child whose stderr goes elsewhere must not count."""
    with (tmp_path / "elsewhere").open("w+", encoding="utf-8") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        setup_logging("info", stream=out)
        logging.getLogger("pigateway").info("by hand")
        assert "INFO    pigateway: by hand" in _written(out)
    assert not journal.messages()


@pytest.mark.usefixtures("root_logging")
def test_setup_twice_replaces_its_own_handler(stream: io.TextIOWrapper,
                                              journal: DatagramListener) -> None:
    setup_logging("info", stream=stream)
    setup_logging("info", stream=stream)
    logging.getLogger("pigateway").error("once")
    journal.wait_for(lambda t: "once" in t)
    assert len(journal.messages()) == 1


def test_the_real_stderr_of_a_process_under_systemd(
    tmp_path: Path, journal: DatagramListener
) -> None:
    """As systemd starts us: fd 2 is the stream that JOURNAL_STREAM names."""
    err_path = tmp_path / "stderr"
    script = (
        "import logging, os, sys\n"
        "st = os.fstat(2)\n"
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "from pigateway.logs import setup_logging\n"
        "setup_logging('info')\n"
        "logging.getLogger('pigateway').warning('from a child', extra={'command_id': 'c1'})\n"
    )
    with err_path.open("wb") as err:
        _run(script, err)
    record = parse_native(journal.wait_for(lambda t: "from a child" in t).data)
    assert record["PRIORITY"] == "4"
    assert record["COMMAND_ID"] == "c1"
    assert err_path.read_text() == ""


def _run(script: str, err: BinaryIO) -> None:
    env = {**os.environ}
    env.pop("JOURNAL_STREAM", None)
    subprocess.run([sys.executable, "-c", script], stderr=err, env=env, check=True, timeout=30)


@pytest.mark.usefixtures("root_logging")
def test_several_command_ids_become_a_repeated_field(journal: DatagramListener,
                                                     stream: io.TextIOWrapper) -> None:
    """The store logs the ids it dead-letters at once: each must be findable on its own."""
    setup_logging("info", stream=stream)
    logging.getLogger("pigateway.store").warning(
        "3 expired", extra={"command_id": ["c1", "c2", "c3"], "queue_depth": 7})
    fields = parse_fields(journal.wait_for(lambda t: "3 expired" in t).data)
    assert fields["COMMAND_ID"] == ["c1", "c2", "c3"]
    assert fields["QUEUE_DEPTH"] == ["7"]


@pytest.mark.usefixtures("root_logging")
def test_by_hand_several_ids_read_as_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("info", stream=out)
    logging.getLogger("pigateway").warning("dead", extra={"command_id": ("a", "b")})
    assert out.getvalue().rstrip().endswith("dead [command_id=a,b]")


@pytest.mark.usefixtures("root_logging")
def test_debug_shows_our_records_not_every_library_operation(
    journal: DatagramListener, stream: io.TextIOWrapper
) -> None:
    setup_logging("debug", stream=stream)
    logging.getLogger("asyncio").debug("Using selector: EpollSelector")
    logging.getLogger("pigateway.store").debug("ours")
    journal.wait_for(lambda t: "MESSAGE=ours" in t)
    assert [parse_native(d.data)["MESSAGE"] for d in journal.messages()] == ["ours"]


@pytest.mark.usefixtures("root_logging")
def test_python_warnings_are_records_at_warning_not_bare_stderr(
    journal: DatagramListener, stream: io.TextIOWrapper
) -> None:
    """Under the unit, bare stderr is read at err (SyslogLevel=err): a library's
    DeprecationWarning must not land there."""
    import warnings  # noqa: PLC0415

    setup_logging("info", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an old way", DeprecationWarning, stacklevel=1)
    record = parse_native(journal.wait_for(lambda t: "an old way" in t).data)
    assert record["PRIORITY"] == "4"
    assert _written(stream) == ""


@pytest.mark.usefixtures("root_logging")
def test_a_record_about_a_huge_batch_stays_one_journal_entry_and_one_short_line(
        journal: DatagramListener, stream: io.TextIOWrapper,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch grows with the backlog (max_batch_bytes of small commands: thousands). One
    COMMAND_ID per command made an entry journald refuses whole (more than 1024 fields,
    since CVE-2018-16865: the batch's line was silently gone) and a by-hand line of every
    id (17 KB): the journal names the first ids and the count, the line the first few."""
    ids = [f"01JD3Q6W8K2V7N4M5P0R{i:06d}" for i in range(3000)]
    setup_logging("info", stream=stream)
    logging.getLogger("pigateway.uplink").info(
        "huge batch", extra={"command_id": ids, "device": [f"d{i}" for i in range(3000)]})
    fields = parse_fields(journal.wait_for(lambda t: "huge batch" in t).data)
    assert sum(len(values) for values in fields.values()) < 1024
    assert fields["COMMAND_ID"] == ids[:len(fields["COMMAND_ID"])]
    assert len(fields["COMMAND_ID"]) >= 10
    assert fields["COMMAND_ID_COUNT"] == ["3000"]

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("info", stream=out)
    logging.getLogger("pigateway.uplink").info("huge batch", extra={"command_id": ids})
    line = out.getvalue().rstrip()
    assert len(line) < 400, line[:400]
    assert ids[0] in line and "3000" in line, line
