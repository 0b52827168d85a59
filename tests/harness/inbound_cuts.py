"""Cuts during inbound receipt: the cloud's side, and what a rebooted gateway must hold.

A cloud client publishes commands (QoS 1 and QoS 2, in bursts to a few devices, so some
find their lane idle and are received already running, others queue behind a busy lane) to
``{prefix}/{gateway}/commands`` on the uplink broker; the service runs them with the
``mqtt`` handler, which publishes each command's params to the local broker, where a
watcher counts the runs of every command id; the results come back on ``results``.
Between the service and the uplink broker sits :class:`AckWatch`, a proxy that notes the
command ids the gateway acknowledged (PUBACK, or PUBREC under QoS 2): the promise
"nothing acknowledged before our commit" is checked against that, not against the
broker's own acknowledgement to the cloud (the broker keeps a command for our persistent
session whether we are up or not).

After each cut (``kill -9``, or a power cut on lossyfs), :meth:`Ledger.check_cut` reads
the queue file as a rebooted machine finds it:

- every command the gateway acknowledged is in the inbox (pending, running or done), and
  every one done has its result queued in the outbox or already at the cloud;
- no command ran more times than the inbox counts its starts (a start is durable before
  the handler runs: for an idle lane's command, in the receipt's own commit), none ran
  again after its result was on disk, and none ran twice between two cuts (a command
  interrupted while running runs again: docs/handlers.md, *Crash safety*);

and notes where the cut found each command (:class:`Windows`: at the broker; stored,
pending or already running as an idle lane's is, and not yet acknowledged; pending;
running, before or after its handler's run; done, its result not yet at the cloud), which
shows that the cuts fell between every two awaits of the path. At the end
(:meth:`Ledger.final`), every command the broker acknowledged to the cloud has exactly one
result document at the cloud (sent once or more, always the same), and every result that
was on disk at a cut has arrived. Shared by tests/test_inbound_kill.py
and the power-cut run (:mod:`harness.powercut`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from harness import found
from harness.broker import Mosquitto
from harness.mqttproxy import connect_version, parse_publish, read_packet
from harness.netproxy import LoopbackRelay
from harness.watcher import Watcher

#: the devices commands go to: few enough that lanes are often busy, enough that some idle
DEVICES = tuple(f"cmd{i}" for i in range(4))
#: the local topic the ``mqtt`` handler publishes a command's params to: one run, one message
RUNS = "runs/{device}/{name}"
#: seconds the run watcher must be quiet before a cut's runs are taken as all arrived
QUIET = 0.2
SETTLE_TIMEOUT = 5.0
#: seconds a result deleted after the broker's PUBACK may take to reach the cloud's client
RESULT_WAIT = 3.0
CONNECT, PUBLISH, PUBACK, PUBREC = 1, 3, 4, 5


def devices(local: Mosquitto) -> dict[str, dict[str, Any]]:
    """``[devices]`` of the service: every inbound device an ``mqtt`` handler on ``local``."""
    return {name: {"handler": "mqtt", "host": local.host, "port": local.port,
                   "topic": RUNS, "qos": 1} for name in DEVICES}


def make_uplink_session(broker: Mosquitto, gateway: str, prefix: str) -> None:
    """The gateway's persistent session on the uplink broker, subscribed to its commands, as
    its first start makes it: from then on the broker keeps every command for it, whenever
    it is down (a command published before any session exists goes nowhere)."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 86_400  # the service's mqtt.session_expiry
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=gateway, protocol=paho.MQTTv5)
    client.on_subscribe = lambda *_: done.set()
    client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/{gateway}/commands", qos=1)
    client.connect(broker.host, broker.port, clean_start=False, properties=properties)
    client.loop_start()
    try:
        if not done.wait(10):
            raise RuntimeError("could not make the gateway's session on the uplink broker")
    finally:
        client.disconnect()
        client.loop_stop()


def _packet_id(packet: bytes) -> int:
    """The packet id of a PUBACK or PUBREC (after the fixed header's remaining length)."""
    at = 1
    while packet[at] & 0x80:
        at += 1
    return int(struct.unpack_from("!H", packet, at + 1)[0])


class AckWatch(LoopbackRelay):
    """A proxy from 127.0.0.1:``port`` to the uplink broker that notes, in ``acked``, the id
    of every command the gateway acknowledged (its PUBACK or PUBREC for the PUBLISH that
    carried it). Everything passes unchanged, whole packets at a time. Runs on an event
    loop of its own in a thread (:meth:`open`), since the cut harness is threaded."""

    def __init__(self, target_port: int, commands: str) -> None:
        super().__init__(target_port)
        self.commands = commands
        self.acked: set[str] = set()
        self.lock = threading.Lock()
        #: set once an :meth:`arm`-ed kill was sent
        self.fired = threading.Event()
        self._armed: tuple[int, int, float] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def open(self) -> AckWatch:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), self._loop).result(10)
        return self

    def shut(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def arm(self, pid: int, after: int, delay: float) -> None:
        """SIGKILL ``pid`` ``delay`` seconds after the ``after``-th command from now has
        passed to it: a cut timed from outside, in the receipt's window, with nothing in the
        service changed."""
        self.fired.clear()
        self._loop.call_soon_threadsafe(setattr, self, "_armed", (pid, after, delay))

    def disarm(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_armed", None)

    def _passed(self) -> None:
        """A command passed to the gateway: count it down towards an armed kill."""
        if self._armed is None:
            return
        pid, after, delay = self._armed
        if after > 1:
            self._armed = (pid, after - 1, delay)
            return
        self._armed = None
        self._loop.call_later(delay, self._kill, pid)

    def _kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.fired.set()

    def snapshot(self) -> set[str]:
        with self.lock:
            return set(self.acked)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        carried: dict[int, str] = {}  # this connection's packet id -> command id
        version = [5]
        self._relay([writer, up_writer], [self._up(reader, up_writer, carried, version),
                                          self._down(up_reader, writer, carried, version)])

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  carried: dict[int, str], version: list[int]) -> None:
        """Gateway to broker: its acknowledgements of the commands it was sent."""
        try:
            for _ in range(10_000_000):  # bounded: far more packets than any run sends
                packet = await read_packet(reader)
                if packet is None:
                    break
                kind = packet[0] >> 4
                if kind == CONNECT:
                    version[0] = connect_version(packet)
                elif kind in (PUBACK, PUBREC):
                    command = carried.pop(_packet_id(packet), None)
                    if command is not None:
                        with self.lock:
                            self.acked.add(command)
                writer.write(packet)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    carried: dict[int, str], version: list[int]) -> None:
        """Broker to gateway: which command each PUBLISH carries (noted before it passes)."""
        try:
            for _ in range(10_000_000):
                packet = await read_packet(reader)
                if packet is None:
                    break
                if packet[0] >> 4 == PUBLISH:
                    topic, packet_id, payload = parse_publish(packet, version[0])
                    if packet_id is not None and topic == self.commands:
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            carried[packet_id] = str(json.loads(payload)["id"])
                    writer.write(packet)
                    await writer.drain()
                    self._passed()
                    continue
                writer.write(packet)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


class Cloud:
    """The operator's client on the uplink broker. While ``running``, every ``pause``
    seconds it publishes a burst of 1 to ``burst`` commands to random devices, QoS 1 and
    QoS 2 in turn; ``acked[qos]`` holds those the broker acknowledged (PUBACK; for QoS 2,
    PUBREC then PUBCOMP). ``results`` holds every result document that came back, by id."""

    def __init__(self, broker: Mosquitto, gateway: str, prefix: str, rng: random.Random, *,
                 pause: float, burst: int, name: str = "pc-cloud") -> None:
        self.base = f"{prefix}/{gateway}"
        self.rng = rng
        self.pause = pause
        self.burst = burst
        self.acked: dict[int, set[str]] = {1: set(), 2: set()}
        self.results: dict[str, list[bytes]] = {}
        self.pending: dict[int, tuple[int, str]] = {}
        self.early: set[int] = set()
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name,
                                  clean_session=False)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._connected
        self.client.on_publish = self._published
        self.client.on_message = self._message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self.ready.wait(10):
            raise RuntimeError("the cloud client did not connect")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _connected(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(f"{self.base}/results", qos=1)
        self.ready.set()

    def _message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            command = str(json.loads(message.payload)["id"])
            with self.lock:
                self.results.setdefault(command, []).append(bytes(message.payload))

    def _published(self, client: paho.Client, userdata: Any, mid: int, *_: Any) -> None:
        with self.lock:
            sent = self.pending.pop(mid, None)
            if sent is None:
                self.early.add(mid)  # acknowledged before publish() returned its mid
            else:
                self.acked[sent[0]].add(sent[1])

    def _run(self) -> None:
        number = 0
        while not self.stopped.is_set():
            if not self.running.wait(0.1):
                continue
            for _ in range(self.rng.randint(1, self.burst)):
                number += 1
                self._publish(number)
            time.sleep(self.pause)

    def _publish(self, number: int) -> None:
        command = f"c{number}"
        qos = 1 + number % 2
        document = {"v": 1, "id": command, "device": self.rng.choice(DEVICES), "name": "set",
                    "params": {"cmd": command}}
        # never under self.lock: paho calls _published holding its own lock
        info = self.client.publish(f"{self.base}/commands", json.dumps(document), qos=qos)
        with self.lock:
            if info.mid in self.early:
                self.early.discard(info.mid)
                self.acked[qos].add(command)
            else:
                self.pending[info.mid] = (qos, command)

    def every_acked(self) -> set[str]:
        with self.lock:
            return self.acked[1] | self.acked[2]

    def answered(self) -> set[str]:
        with self.lock:
            return set(self.results)

    def close(self) -> None:
        self.stopped.set()
        self.running.clear()
        self.thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()


class Runs(Watcher):
    """A watcher on the local broker: how many times each command ran (one message from the
    ``mqtt`` handler per run), and when the last message came."""

    def __init__(self, broker: Mosquitto, name: str = "pc-runs") -> None:
        self.counts: Counter[str] = Counter()
        self.last = time.monotonic()
        super().__init__(broker, name, "runs/#")

    def _message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            command = str(json.loads(message.payload)["cmd"])
            with self.lock:
                self.counts[command] += 1
                self.last = time.monotonic()

    def settled(self) -> Counter[str]:
        """The runs once none has come for :data:`QUIET` seconds (call it after the cut:
        a run the handler made reached the broker before its result was recorded)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            with self.lock:
                if time.monotonic() - self.last >= QUIET:
                    return Counter(self.counts)
            time.sleep(0.05)
        with self.lock:
            return Counter(self.counts)



@dataclass(frozen=True)
class Inbox:
    """The inbox as a cut left it: each row's state (pending, running, done) and starts
    counted, and the command ids whose result is queued in the outbox."""

    states: dict[str, str]
    attempts: dict[str, int]
    queued: set[str]


def read_inbox(db: Path) -> Inbox:
    """The inbox in the file as found."""
    if not db.exists():
        return Inbox({}, {}, set())
    with found.as_found(db) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if "inbox" not in names:
            return Inbox({}, {}, set())
        rows = conn.execute("SELECT id, state, attempts FROM inbox").fetchall()
        queued = {str(json.loads(r[0])["id"])
                  for r in conn.execute("SELECT params FROM outbox WHERE kind = 'result'")}
    return Inbox({str(r[0]): str(r[1]) for r in rows}, {str(r[0]): int(r[2]) for r in rows},
                 queued)


#: where a cut found a command, in the path's order (the await each window ends at)
WINDOWS = ("at the broker", "stored pending, not acknowledged",
           "stored running (an idle lane's), not acknowledged", "pending",
           "running, before its run", "running, after its run",
           "done, result not at the cloud")


@dataclass
class Windows:
    """Per window: how many cuts found some command in it, and how many commands in all."""

    cuts: Counter[str] = field(default_factory=Counter)
    commands: Counter[str] = field(default_factory=Counter)

    def add(self, found: Counter[str]) -> None:
        for window, count in found.items():
            if count:
                self.cuts[window] += 1
                self.commands[window] += count

    def missed(self) -> list[str]:
        """The windows no cut has fallen into yet."""
        return [w for w in WINDOWS if not self.cuts[w]]

    def table(self) -> str:
        lines = ["| where a cut found a command | cuts | commands |", "|---|---:|---:|"]
        lines += [f"| {w} | {self.cuts[w]} | {self.commands[w]} |" for w in WINDOWS]
        return "\n".join(lines)


@dataclass
class Ledger:
    """What the cuts found of the inbound path, checked after each cut and at the end."""

    problems: list[str] = field(default_factory=list)
    windows: Windows = field(default_factory=Windows)
    #: runs of each command when a cut first found it done (its result on disk)
    runs_when_done: dict[str, int] = field(default_factory=dict)
    last_runs: Counter[str] = field(default_factory=Counter)
    cuts: int = 0

    def check_cut(self, label: str, db: Path, cloud: Cloud, watch: AckWatch,
                  runs: Runs) -> None:
        """After a cut (every process on the queue dead): what the rebooted machine finds."""
        self.cuts += 1
        inbox = read_inbox(db)
        states, queued = inbox.states, inbox.queued
        ours = watch.snapshot()
        counted = runs.settled()
        missing = sorted(ours - set(states))
        if missing:
            self.problems.append(f"{label}: {len(missing)} commands the gateway acknowledged "
                                 f"are not in the inbox, e.g. {missing[:3]}")
        unanswered = {c for c, state in states.items() if state == "done"} - queued
        deadline = time.monotonic() + RESULT_WAIT  # a result the broker took is on its way
        while unanswered - cloud.answered() and time.monotonic() < deadline:
            time.sleep(0.05)
        answered = cloud.answered()
        if unanswered - answered:
            self.problems.append(f"{label}: {len(unanswered - answered)} commands are done "
                                 "with their result neither queued nor at the cloud, e.g. "
                                 f"{sorted(unanswered - answered)[:3]}")
        again = sorted(c for c, before in self.runs_when_done.items() if counted[c] > before)
        if again:
            self.problems.append(f"{label}: {len(again)} commands ran again after their "
                                 f"result was recorded, e.g. {again[:3]}")
            for command in again:
                self.runs_when_done[command] = counted[command]
        uncounted = sorted(c for c, n in counted.items() if n > inbox.attempts.get(c, 0))
        if uncounted:
            self.problems.append(f"{label}: {len(uncounted)} commands ran more times than "
                                 "the starts the inbox counted (a start not durable before "
                                 f"its run), e.g. {uncounted[:3]}")
        this_cut = counted - self.last_runs  # the runs since the cut before
        twice = sorted(c for c, n in this_cut.items() if n > 1)
        if twice:
            self.problems.append(f"{label}: {len(twice)} commands ran twice with no cut "
                                 f"between, e.g. {twice[:3]}")
        self.last_runs = counted
        for command, state in states.items():
            if state == "done":
                self.runs_when_done.setdefault(command, counted[command])
        self.windows.add(_where(cloud.every_acked(), states, ours, this_cut, answered))

    def final(self, cloud: Cloud, runs: Runs, timeout: float) -> None:
        """With the service running to the end: every command the broker acknowledged to
        the cloud answered, one result document each, and nothing run after its result."""
        every = cloud.every_acked()
        recorded = set(self.runs_when_done)
        deadline = time.monotonic() + timeout
        while (every | recorded) - cloud.answered() and time.monotonic() < deadline:
            time.sleep(0.1)
        counted = runs.settled()
        unanswered = sorted(every - cloud.answered())
        if unanswered:
            self.problems.append(f"inbound: {len(unanswered)} commands the broker "
                                 f"acknowledged never answered, e.g. {unanswered[:3]}")
        results_lost = sorted(recorded - cloud.answered())
        if results_lost:
            self.problems.append(f"inbound: {len(results_lost)} results on disk at a cut "
                                 f"never reached the cloud, e.g. {results_lost[:3]}")
        with cloud.lock:
            differing = sorted(c for c, docs in cloud.results.items() if len(set(docs)) > 1)
        if differing:
            self.problems.append(f"inbound: {len(differing)} commands were answered with "
                                 f"different results, e.g. {differing[:3]}")
        again = sorted(c for c, before in self.runs_when_done.items() if counted[c] > before)
        if again:
            self.problems.append(f"inbound: {len(again)} commands ran again after their "
                                 f"result was recorded, e.g. {again[:3]}")


def _where(acked: set[str], states: dict[str, str], ours: set[str], ran: Counter[str],
           answered: set[str]) -> Counter[str]:
    """Where a cut found each command (those the broker acknowledged to the cloud, and
    those in the inbox); ``ran``: the runs since the cut before."""
    found: Counter[str] = Counter()
    for command in acked | set(states):
        state = states.get(command)
        if state is None:
            found["at the broker"] += command not in ours
        elif command not in ours and state == "pending":
            found["stored pending, not acknowledged"] += 1
        elif command not in ours and state == "running" and not ran[command]:
            found["stored running (an idle lane's), not acknowledged"] += 1
        elif state == "pending":
            found["pending"] += 1
        elif state == "running":
            found["running, after its run" if ran[command] else "running, before its run"] += 1
        elif command not in answered:
            found["done, result not at the cloud"] += 1
    return found
