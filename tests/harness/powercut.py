"""Power cuts at random moments, with everything that writes the queue running: the
service (its drain to the uplink broker, its ingest from the gateway's own broker, and the
commands a cloud client publishes to it, received, run and answered:
:mod:`harness.inbound_cuts`), ``pigateway send`` and ``pigateway send --id`` in a loop, and
a producer putting through the Python API. The queue's folder is a
:class:`~harness.lossy.LossyMount`, so a cut loses what was not fsynced, as a real one does
(the page cache too, which ``kill -9`` keeps). Every fifth cut falls during start-up (on
lossyfs's strict names: only a folder's fsync makes a create durable), two in five right
after a write picked at random (whatever file and process it belongs to), one in five up
to 5 ms after a command from the cloud reached the service (which is killed then, the power
cut after it), the rest at a random time once the drain delivers.

After each cut the backing folder is opened as the rebooted machine would open it:
the file passes ``PRAGMA integrity_check``, nothing is quarantined, every ``--id`` key
printed is kept with its id, every acknowledged command is either still queued or
already at the uplink broker, and the inbound path holds what
:class:`harness.inbound_cuts.Ledger` checks. At the end the service drains what is left
(and ingest takes what the local broker kept) and every acknowledged command, every
message the local broker acknowledged and a result of every command the uplink broker
acknowledged to the cloud must have arrived. Shared by tests/test_power_cut.py and
``scripts/bench powercut``; bounded in cuts and time.
"""
from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from harness import found, inbound_cuts
from harness.broker import Mosquitto
from harness.gateway import settings, to_toml
from harness.lossy import LossyMount
from harness.service import environment, spawn, terminate
from harness.watcher import Watcher

GATEWAY = "gw-cut"
PREFIX = "pc"
INGEST_CLIENT = "gw-cut-ingest"
FAST = {"batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.3}
PUTTER = Path(__file__).parent / "programs" / "putter.py"
SCENARIOS = ("send", "send --id", "put (API)", "drain", "ingest", "inbound QoS 1",
             "inbound QoS 2", "inbound results")
#: the cloud's commands: a burst of 1 to CLOUD_BURST every CLOUD_PAUSE seconds (about 17 a
#: second: lanes idle between bursts, busy within one)
CLOUD_PAUSE, CLOUD_BURST = 0.2, 6
DRAIN_TIMEOUT = 60.0
#: the Python API's producers in a round and the seconds between two puts of each: the
#: drain and the WAL busy the whole round, not so busy that the CPU goes to them rather
#: than to the sends
PUTTERS, PAUSE = 2, 0.01
START_TIMEOUT = 20.0
#: a cut at a write falls on one of the first this many writes of its round (a round's
#: puts, acks and ingest write ~1,000 times a second here; start-up a few dozen)
MAX_CUT_AT_WRITE = 3000
#: a cut after a command falls on one of the next this many commands from the cloud
MAX_CUT_AT_COMMAND = 20


@dataclass
class Row:
    """One scenario's line of the table."""

    acknowledged: int = 0
    lost: int = 0
    duplicates: int = 0


@dataclass
class Outcome:
    """What a run of cuts found."""

    cuts: int = 0
    rows: dict[str, Row] = field(default_factory=lambda: {s: Row() for s in SCENARIOS})
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: cuts that threw away writes to the queue file or its WAL (not only its -shm), and
    #: how many bytes all cuts threw away there
    dropping_cuts: int = 0
    dropped_bytes: int = 0
    #: cuts made right after a write at random, and right after a command from the cloud
    #: reached the service (the others at a random time)
    write_cuts: int = 0
    command_cuts: int = 0
    #: cuts that left a WAL with frames in it, for the restarted service to recover
    wal_cuts: int = 0
    #: what the cuts found of the inbound path (where they fell in it)
    inbound: inbound_cuts.Ledger = field(default_factory=inbound_cuts.Ledger)

    def summary(self) -> str:
        return (f"{self.cuts} power cuts ({self.write_cuts} right after a random write, "
                f"{self.command_cuts} right after a command reached the service) in "
                f"{self.seconds:.0f} s; {self.dropping_cuts} threw away unsynced writes to "
                f"queue.db or its WAL ({self.dropped_bytes:,} bytes); {self.wal_cuts} left "
                "a WAL for the restarted service to recover")

    def table(self) -> str:
        lines = ["| scenario | cuts | acknowledged | lost | duplicates |",
                 "|---|---:|---:|---:|---:|"]
        for name, row in self.rows.items():
            lines.append(f"| {name} | {self.cuts} | {row.acknowledged} | {row.lost} | "
                         f"{row.duplicates} |")
        return "\n".join(lines)


class Uplink(Watcher):
    """A subscriber on the uplink broker for the whole run: every command id in every
    batch and every forwarded payload, with how many times each arrived."""

    def __init__(self, broker: Mosquitto) -> None:
        self.ids: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()
        super().__init__(broker, "pc-uplink-watch", f"{PREFIX}/{GATEWAY}/#")

    def _message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.lock:
            if message.topic.endswith("/actions"):
                for action in json.loads(message.payload)["actions"]:
                    self.ids.update(command["id"] for command in action["commands"])
            elif "/forward/" in message.topic:
                self.forwarded[message.payload.decode()] += 1

    def count(self) -> int:
        """How many distinct commands have arrived."""
        with self.lock:
            return len(self.ids)

    def has(self, ids: set[str]) -> set[str]:
        with self.lock:
            return {i for i in ids if self.ids[i]}



class LocalPublisher:
    """Publishes unique tokens at QoS 1 to the gateway's own broker while ``running``;
    ``acked`` holds those the broker acknowledged (from then on it keeps them for ingest's
    persistent session)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.acked: set[str] = set()
        self.pending: dict[int, str] = {}
        self.early: set[int] = set()
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="pc-local-pub")
        self.client.on_publish = self._published
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _published(self, client: paho.Client, userdata: Any, mid: int, *_: Any) -> None:
        with self.lock:
            token = self.pending.pop(mid, None)
            if token is None:
                self.early.add(mid)  # acknowledged before publish() returned its mid
            else:
                self.acked.add(token)

    def _run(self) -> None:
        number = 0
        while not self.stopped.is_set():
            if not self.running.wait(0.1):
                continue
            number += 1
            token = f"t{number}"
            # never under self.lock: paho calls _published holding its own lock
            info = self.client.publish(f"z2m/dev{number % 4}/state", token, qos=1)
            with self.lock:
                if info.mid in self.early:
                    self.early.discard(info.mid)
                    self.acked.add(token)
                else:
                    self.pending[info.mid] = token
            time.sleep(0.02)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()


def make_ingest_session(broker: Mosquitto) -> None:
    """Ingest's persistent session on the local broker before the first cut, as the first
    start of the service makes it (docs/ingest.md): from then on the broker keeps every
    message for it, whenever the gateway is down."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 7 * 86_400
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=INGEST_CLIENT,
                         protocol=paho.MQTTv5)
    client.on_subscribe = lambda *_: done.set()
    client.on_connect = lambda c, *_: c.subscribe("z2m/+/state", qos=1)
    client.connect(broker.host, broker.port, clean_start=False, properties=properties)
    client.loop_start()
    try:
        if not done.wait(10):
            raise RuntimeError("could not make ingest's session on the local broker")
    finally:
        client.disconnect()
        client.loop_stop()


def write_config(path: Path, store: Path, local: Mosquitto, uplink_port: int,
                 control: Path, *, synchronous: str = "full") -> Path:
    """The service's config (``synchronous`` other than full only for a control)."""
    data = settings(None, gateway_id=GATEWAY, port=uplink_port, prefix=PREFIX, uplink=FAST,
                    devices=inbound_cuts.devices(local))
    data["store"] = {"path": str(store), "min_free_bytes": 0, "synchronous": synchronous}
    data["control"] = {"socket": str(control)}
    data["gpio"] = {"enabled": False}
    data["local"] = {"host": local.host, "port": local.port, "client_id": INGEST_CLIENT}
    data["ingest"] = [{"topic": "z2m/+/state"}]
    path.write_text(to_toml(data))
    return path


class Senders:
    """``pigateway send`` (and ``send --id``) run one after another in a thread while
    ``running``; what each printed before it exited 0 is acknowledged."""

    def __init__(self, config: Path, keyed: bool, round_: int) -> None:
        self.config = config
        self.keyed = keyed
        self.round = round_
        self.printed: dict[str, str] = {}  # key (or id) -> id
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        number = 0
        while not self.stopped.is_set():
            number += 1
            key = f"k{self.round}-{number}"
            command = [sys.executable, "-m", "pigateway", "send", "--config", str(self.config),
                       "--device", f"dev{number % 3}", "--command", "set",
                       "--param", f"n={number}"]
            if self.keyed:
                command += ["--id", key]
            with self.lock:
                if self.stopped.is_set():
                    return
                self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL, env=environment())
            out, _ = self.process.communicate()
            if self.process.returncode == 0 and out.strip():
                id_ = out.decode().split()[0]
                self.printed[key if self.keyed else id_] = id_

    def kill(self) -> None:
        with self.lock:
            self.stopped.set()
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
        self.thread.join(30)


class Putter:
    """tests/harness/programs/putter.py on the mount: the Python API's ``put`` (group commits of
    concurrent puts), each id printed once ``put`` returned."""

    def __init__(self, store: Path) -> None:
        self.ids: list[str] = []
        self.process = subprocess.Popen([sys.executable, str(PUTTER), str(store),
                                         str(PUTTERS), "100000", str(PAUSE)],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        env=environment())
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            if raw.endswith(b"\n"):
                self.ids.append(raw.decode().strip())

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)
        self.thread.join(30)


class Writers:
    """Every process a round starts on the mount: the service, the two send loops, the
    putter; killed together, each by its own PID."""

    def __init__(self) -> None:
        self.service: subprocess.Popen[bytes] | None = None
        self.senders: list[Senders] = []
        self.putter: Putter | None = None

    def start(self, config: Path, store: Path, round_: int) -> None:
        self.service = spawn(config, config.parent / "service.log")
        self.senders = [Senders(config, False, round_), Senders(config, True, round_)]
        self.putter = Putter(store)

    def kill(self) -> None:
        if self.service is not None:
            self.service.send_signal(signal.SIGKILL)
        if self.putter is not None:
            self.putter.process.send_signal(signal.SIGKILL)
        for sender in self.senders:
            sender.kill()
        if self.putter is not None:
            self.putter.kill()
        if self.service is not None:
            self.service.wait(30)

    def printed(self, *, keyed: bool) -> set[str]:
        return {id_ for s in self.senders if s.keyed == keyed for id_ in s.printed.values()}

    def keys(self) -> dict[str, str]:
        return {k: v for s in self.senders if s.keyed for k, v in s.printed.items()}


def read_disk(db: Path) -> tuple[str, set[str], dict[str, str]]:
    """What the rebooted machine finds: the integrity check, the queued ids, the keys."""
    if not db.exists():
        return "ok", set(), {}
    with found.as_found(db) as conn:
        check = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        queued = ({row[0] for row in conn.execute("SELECT id FROM outbox")}
                  if "outbox" in names else set())
        keys = ({row[0]: row[1] for row in conn.execute("SELECT key, id FROM producer_keys")}
                if "producer_keys" in names else {})
    return check, queued, keys


@contextlib.contextmanager
def brokers(folder: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    with Mosquitto(folder / "uplink-broker") as uplink, \
            Mosquitto(folder / "local-broker") as local:
        yield local, uplink


def wait_seen(uplink: Uplink, ids: set[str], timeout: float) -> set[str]:
    """Those of ``ids`` the uplink subscriber has not got within ``timeout``."""
    deadline = time.monotonic() + timeout
    missing = ids - uplink.has(ids)
    while missing and time.monotonic() < deadline:
        time.sleep(0.05)
        missing -= uplink.has(missing)
    return missing


def unforwarded(uplink: Uplink, tokens: set[str], timeout: float) -> set[str]:
    """Those of ``tokens`` (acknowledged by the local broker) not forwarded to the uplink
    broker within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with uplink.lock:
            missing = {t for t in tokens if not uplink.forwarded[t]}
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)


def run(folder: Path, cuts: int, seed: int, *, log: Callable[[str], object] | None = None
        ) -> Outcome:
    """``cuts`` power cuts at random moments (seeded), then the final drain; the outcome."""
    started = time.monotonic()
    with brokers(folder) as (local, uplink_broker):
        make_ingest_session(local)
        inbound_cuts.make_uplink_session(uplink_broker, GATEWAY, PREFIX)
        cutter = Cutter(folder, local, uplink_broker, random.Random(seed))
        try:
            for round_ in range(cuts):
                cutter.one_cut(round_)
                if log:
                    log(f"cut {round_ + 1}/{cuts}: {len(cutter.outcome.problems)} problems")
            cutter.publisher.running.clear()
            cutter.cloud.running.clear()
            cutter.final_drain()
        finally:
            cutter.close()
    cutter.outcome.seconds = time.monotonic() - started
    return cutter.outcome


class Cutter:
    """One run's parts (the brokers' watchers, the disk, the mount) and what it has seen:
    every acknowledged command by scenario, every ``--id`` key with its id."""

    def __init__(self, folder: Path, local: Mosquitto, uplink_broker: Mosquitto,
                 rng: random.Random) -> None:
        self.folder = folder
        self.local = local
        self.uplink_broker = uplink_broker
        self.rng = rng
        self.backing = folder / "disk"
        self.mount = folder / "mnt"
        self.backing.mkdir(parents=True, exist_ok=True)
        self.outcome = Outcome()
        # the service reaches the uplink broker through a proxy that sees its PUBACKs
        self.watch = inbound_cuts.AckWatch(uplink_broker.port,
                                           f"{PREFIX}/{GATEWAY}/commands").open()
        self.config = write_config(folder / "cut.toml", self.mount / "queue.db", local,
                                   self.watch.port, folder / "control.sock")
        self.acked: dict[str, set[str]] = {s: set() for s in ("send", "send --id",
                                                              "put (API)")}
        self.keys: dict[str, str] = {}
        self.uplink = Uplink(uplink_broker)
        self.publisher = LocalPublisher(local)
        self.cloud = inbound_cuts.Cloud(uplink_broker, GATEWAY, PREFIX,
                                        random.Random(rng.random()), pause=CLOUD_PAUSE,
                                        burst=CLOUD_BURST)
        self.runs = inbound_cuts.Runs(local)
        self.inbound = self.outcome.inbound

    def close(self) -> None:
        self.cloud.close()
        self.runs.close()
        self.watch.shut()
        self.publisher.close()
        self.uplink.close()

    def every_acked(self) -> set[str]:
        return set().union(*self.acked.values())

    def one_cut(self, round_: int) -> None:
        at_write = self.rng.randint(1, MAX_CUT_AT_WRITE) if round_ % 5 in (2, 4) else None
        # the start-up cuts (where files are created) on the strictest names: durable only
        # with a folder's fsync
        lossy = LossyMount(self.backing, self.mount, self.folder / "lossyfs.log",
                           cut_at_write=at_write, strict_names=round_ % 5 == 0).start()
        writers = Writers()
        try:
            writers.start(self.config, self.mount / "queue.db", round_)
            self.publisher.running.set()
            self.cloud.running.set()
            before = self.uplink.has(self.every_acked())
            if at_write is not None:  # the power goes right after a write, wherever it falls
                if lossy.powered_off.wait(START_TIMEOUT):
                    self.outcome.write_cuts += 1
            else:
                self._wait_for_the_moment(round_, writers)
        finally:
            # the cut: every process on the mount killed, by its own PID, then the page cache
            writers.kill()
            self.publisher.running.clear()
            dropped = [d for d in lossy.cut() if d.name in ("queue.db", "queue.db-wal")]
        self.outcome.cuts += 1
        if any(d.bytes or d.size for d in dropped):
            self.outcome.dropping_cuts += 1
            self.outcome.dropped_bytes += sum(d.bytes for d in dropped)
        self.acked["send"] |= writers.printed(keyed=False)
        self.acked["send --id"] |= writers.printed(keyed=True)
        self.acked["put (API)"] |= set(writers.putter.ids if writers.putter else ())
        self.keys.update(writers.keys())
        self._check_disk(round_, before)
        self._check_inbound(round_)

    def _check_inbound(self, round_: int) -> None:
        """The inbound path as the rebooted machine finds it (:class:`inbound_cuts.Ledger`);
        the cloud goes on publishing meanwhile, as it would."""
        known = len(self.inbound.problems)
        self.inbound.check_cut(f"cut {round_}", self.backing / "queue.db", self.cloud,
                               self.watch, self.runs)
        self.outcome.problems += self.inbound.problems[known:]

    def _wait_for_the_moment(self, round_: int, writers: Writers) -> None:
        """Every fifth cut during start-up (the open, its recovery and check, a migration);
        the others not at a write once the drain delivers, however slow the machine is to
        start it: one in five of those the service's (the power's, for the rest) a few
        milliseconds after a command from the cloud picked at random reached it, in its
        receipt (the commit, the acknowledgement), the rest at a random time."""
        if round_ % 5 != 0:
            delivered = self.uplink.count()
            deadline = time.monotonic() + START_TIMEOUT
            while self.uplink.count() == delivered and time.monotonic() < deadline:
                time.sleep(0.02)
        if round_ % 5 == 3 and writers.service is not None:
            self.watch.arm(writers.service.pid, self.rng.randint(1, MAX_CUT_AT_COMMAND),
                           self.rng.uniform(0.0, 0.005))
            if self.watch.fired.wait(START_TIMEOUT):
                self.outcome.command_cuts += 1
            self.watch.disarm()
            return
        time.sleep(self.rng.uniform(0.0, 1.0))

    def _check_disk(self, round_: int, before: set[str]) -> None:
        """What the rebooted machine finds after cut ``round_``."""
        outcome = self.outcome
        quarantined = sorted(p.name for p in self.backing.glob("*.corrupt-*"))
        if quarantined:
            outcome.problems.append(f"cut {round_}: quarantined {quarantined}")
        wal = self.backing / "queue.db-wal"
        if wal.exists() and wal.stat().st_size:
            outcome.wal_cuts += 1
        check, queued, kept = read_disk(self.backing / "queue.db")
        if check != "ok":
            outcome.problems.append(f"cut {round_}: integrity_check says {check}")
        every = self.every_acked()
        # drain: what the broker took during this round was deleted under the cut; whatever
        # it had not taken must still be queued
        outcome.rows["drain"].acknowledged += len(self.uplink.has(every) - before)
        missing = wait_seen(self.uplink, every - queued, 3.0)
        if missing:
            outcome.rows["drain"].lost += len(missing)
            outcome.problems.append(f"cut {round_}: {len(missing)} acknowledged commands "
                                    f"neither queued nor delivered, e.g. {sorted(missing)[:3]}")
        lost_keys = [k for k, id_ in self.keys.items() if kept.get(k) != id_]
        if lost_keys:
            outcome.rows["send --id"].lost += len(lost_keys)
            outcome.problems.append(f"cut {round_}: --id keys lost: {lost_keys[:3]}")
            for key in lost_keys:
                self.keys.pop(key)

    def final_drain(self) -> None:
        """The service on the backing folder itself drains what the cuts left; then every
        acknowledged command and every token the local broker acknowledged must be up."""
        config = write_config(self.folder / "final.toml", self.backing / "queue.db",
                              self.local, self.watch.port, self.folder / "control-final.sock")
        service = spawn(config, self.folder / "service.log")
        try:
            for name, ids in self.acked.items():
                self._count(name, ids)
            self._count_ingest()
            self._count_inbound()
            every = self.every_acked()
            with self.uplink.lock:
                self.outcome.rows["drain"].duplicates = sum(
                    1 for i in every if self.uplink.ids[i] > 1)
        finally:
            terminate(service)
        quarantined = sorted(p.name for p in self.backing.glob("*.corrupt-*"))
        if quarantined:
            self.outcome.problems.append(f"final: quarantined {quarantined}")

    def _count(self, name: str, ids: set[str]) -> None:
        missing = wait_seen(self.uplink, ids, DRAIN_TIMEOUT)
        row = self.outcome.rows[name]
        row.acknowledged = len(ids)
        row.lost += len(missing)
        with self.uplink.lock:
            row.duplicates = sum(1 for i in ids if self.uplink.ids[i] > 1)
        if missing:
            self.outcome.problems.append(f"{name}: {len(missing)} acknowledged, never "
                                         f"delivered, e.g. {sorted(missing)[:3]}")

    def _count_inbound(self) -> None:
        """Per QoS: the commands the broker acknowledged to the cloud, those never answered,
        those run more than once; and the results: those that arrived, those on disk at a
        cut that never did, those that arrived more than once (always the same document)."""
        known = len(self.inbound.problems)
        self.inbound.final(self.cloud, self.runs, DRAIN_TIMEOUT)
        self.outcome.problems += self.inbound.problems[known:]
        answered = self.cloud.answered()
        runs = self.runs.settled()
        for qos in (1, 2):
            row = self.outcome.rows[f"inbound QoS {qos}"]
            with self.cloud.lock:
                ids = set(self.cloud.acked[qos])
            row.acknowledged = len(ids)
            row.lost = len(ids - answered)
            row.duplicates = sum(1 for i in ids if runs[i] > 1)
        row = self.outcome.rows["inbound results"]
        row.acknowledged = len(answered)
        row.lost = len(set(self.inbound.runs_when_done) - answered)
        with self.cloud.lock:
            row.duplicates = sum(1 for docs in self.cloud.results.values() if len(docs) > 1)

    def _count_ingest(self) -> None:
        with self.publisher.lock:
            tokens = set(self.publisher.acked)
        missing = unforwarded(self.uplink, tokens, DRAIN_TIMEOUT)
        row = self.outcome.rows["ingest"]
        row.acknowledged = len(tokens)
        row.lost = len(missing)
        with self.uplink.lock:
            row.duplicates = sum(1 for t in tokens if self.uplink.forwarded[t] > 1)
        if missing:
            self.outcome.problems.append(f"ingest: {len(missing)} messages the local broker "
                                         f"acknowledged never reached the uplink")
