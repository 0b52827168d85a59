"""Benchmark, power cuts: the queue's folder on lossyfs (tests/harness/lossy.py), a FUSE
layer that forgets at a cut whatever was not fsynced, as a Raspberry Pi losing power
does (``kill -9`` and ``cgroup.kill`` keep the page cache, so they cannot show it).

``--cuts N`` cuts at random moments (seeded) while the service drains to a real uplink
mosquitto and ingests from a real local one, ``pigateway send`` and ``send --id`` run in a
loop, a producer puts through the Python API and a cloud client publishes commands (QoS 1
and 2) that the service receives, runs and answers; after each cut the backing folder is
opened as a rebooted machine would, and at the end the service drains what is left.
Prints, per scenario, the cuts, what was acknowledged, what was lost (the target: 0) and
the duplicates a receiver drops by id (inbound: commands run twice, results sent twice);
how many cuts threw away unsynced writes to the queue file or its WAL; and where in the
inbound path the cuts found commands. Run through ``scripts/bench powercut [--cuts N]``; ``--quick``
is 30 cuts, as tests/test_power_cut.py runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from harness import lossy, powercut

DEFAULT_CUTS = 200
QUICK_CUTS = 30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CUTS} cuts")
    parser.add_argument("--cuts", type=int, default=None,
                        help=f"how many power cuts (default {DEFAULT_CUTS})")
    parser.add_argument("--seed", type=int, default=int(time.time()),
                        help="the random moments' seed (default: the time; printed)")
    args, _ = parser.parse_known_args()  # scripts/bench hands every part all the options
    cuts = args.cuts or (QUICK_CUTS if args.quick else DEFAULT_CUTS)
    if not 1 <= cuts <= 100_000:
        parser.error("--cuts must be between 1 and 100000")
    reason = lossy.unavailable()
    if reason is not None:
        print(f"powercut: skipped: lossyfs cannot run: {reason}")
        return 0
    print(f"powercut: {cuts} cuts, seed {args.seed}", flush=True)
    started = time.monotonic()

    def progress(line: str) -> None:
        if line.startswith("cut ") and int(line.split()[1].split("/", 1)[0]) % 25 == 0:
            print(f"  {line} ({time.monotonic() - started:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-powercut-") as folder:
        outcome = powercut.run(Path(folder), cuts, args.seed, log=progress)
    print(outcome.summary())
    print(outcome.table())
    print(outcome.inbound.windows.table())
    lost = sum(row.lost for row in outcome.rows.values())
    verdict = "PASS" if not outcome.problems and lost == 0 else "FAIL"
    print(f"target: no acknowledged command, local PUBACK, --id key or inbound command or "
          f"result lost, no command run again after its result was recorded, no corrupt or "
          f"quarantined file: {verdict}")
    for problem in outcome.problems[:20]:
        print(f"  {problem}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
