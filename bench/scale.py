"""Scale benchmark: the simulation at growing numbers of hospitals and patients, side by side.

For each (hospitals, patients) size, in one process: synthesise the exports, make a CKKS key,
then time `fedrisk run`'s simulation (`engines.simulation.simulate`, 2 rounds by default, delta
0.1 / patients so that every hospital's policy admits it) and report, per size:

* before_round_1_s: wall time from the call until round 1's training messages go out (the
  checks, provisioning the nodes, Flower's simulation engine and its workers starting, the
  census with each node's noise calibration, MLflow): what a user waits before training begins;
* start_up_s: wall time from the call to the end of round 1, minus the last round's seconds:
  every one-time cost, the first round's own (each worker's first data load and torch/Opacus
  imports) included;
* with --again, the same two for a second run on the nodes the first one provisioned
  (again_before_round_1_s, again_start_up_s): what a run pays once the nodes exist;
* per_hospital_round_s: the last round's seconds divided by the number of hospitals (flat from
  8 to 500 hospitals is the target: within 20%), and its ratio to the smallest size's;
* bytes_down_round_1 / bytes_down_last: the largest message one hospital was sent in round 1
  and in the last round (equal is the target: the chain does not ride along);
* peak_rss_gib: the peak resident memory of this process and all its children together,
  sampled every 0.25 s.

    PYTHONPATH=. .venv/bin/python bench/scale.py [--sizes 8:200000,50:1000000] [--rounds 2] [--json F]

The targets of the 10-million-patient / 500-hospital run are `--sizes 500:10000000`; it needs
tens of minutes and most of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.simulation import simulate  # noqa: E402
from experiments.synthetic import synthesize  # noqa: E402
from federation.config import RunConfig  # noqa: E402
from federation.he_codec import init_keys  # noqa: E402
from server.tracking import ROUND_BYTES_DOWN, ROUND_SECONDS  # noqa: E402


class PeakMemory:
    """The peak summed RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.25) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.every):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(hospitals: int, patients: int, rounds: int, work: Path, again: bool = False) -> dict[str, float]:
    """One size: synthesise, then one simulated run (and with `again` a second one on the same
    nodes), timed and sampled."""
    report = synthesize(hospitals, patients, work / "data", seed=7)
    keys = init_keys(work / "keys")
    config = RunConfig(data_dir=str(report.files[0].parent), keys_dir=str(keys.server_context.parent),
                       run_dir=str(work / "run"), num_hospitals=hospitals, rounds=rounds, delta=0.1 / patients)
    row: dict[str, float] = {"hospitals": hospitals, "patients": patients, "rounds": rounds}
    with PeakMemory() as memory:
        for prefix, run in (("", config), ("again_", config.replace(run_dir=str(work / "run2"), data_dir="",
                                                                   nodes_dir=str(work / "run" / "nodes")))):
            if prefix and not again:
                continue
            ends: dict[int, float] = {}
            starts: dict[int, float] = {}

            def heard(event: str, data: dict, ends: dict = ends, starts: dict = starts) -> None:
                if event == "round":
                    ends.setdefault(int(data["round"]), time.perf_counter())
                elif event == "stage" and data.get("stage") == "train":
                    starts.setdefault(int(data["round"]), time.perf_counter())

            began = time.perf_counter()
            result = simulate(run, progress=heard)
            first, last = result.rounds[1], result.rounds[rounds]
            row.update({f"{prefix}wall_s": time.perf_counter() - began, f"{prefix}before_round_1_s": starts[1] - began,
                        f"{prefix}start_up_s": ends[1] - began - last[ROUND_SECONDS]})
            if not prefix:
                row.update({"per_hospital_round_s": last[ROUND_SECONDS] / hospitals,
                            "bytes_down_round_1": first[ROUND_BYTES_DOWN], "bytes_down_last": last[ROUND_BYTES_DOWN]})
    row["peak_rss_gib"] = memory.peak / 2**30
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8:200000,50:1000000",
                        help="comma-separated HOSPITALS:PATIENTS (default 8:200000,50:1000000)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--again", action="store_true", help="time a second run on the provisioned nodes too")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in item.split(":")) for item in args.sizes.split(",")]
    rows = []
    for hospitals, patients in sizes:
        with tempfile.TemporaryDirectory(prefix="fedrisk-bench-scale-") as scratch:
            os.environ["FEDRISK_WORKSPACE"] = scratch
            rows.append(measure(hospitals, patients, args.rounds, Path(scratch), args.again))
        row = rows[-1]
        row["per_hospital_round_ratio"] = row["per_hospital_round_s"] / rows[0]["per_hospital_round_s"]
        again = (f"; a second run: before round 1 {row['again_before_round_1_s']:.1f} s, start-up "
                 f"{row['again_start_up_s']:.1f} s" if args.again else "")
        print(f"{hospitals:>4} hospitals {patients:>10,} patients: before round 1 {row['before_round_1_s']:.1f} s, "
              f"start-up {row['start_up_s']:.1f} s; "
              f"round {args.rounds} {row['per_hospital_round_s']:.3f} s per hospital "
              f"({row['per_hospital_round_ratio']:.2f}x the first size); bytes down per hospital round 1 "
              f"{row['bytes_down_round_1']:,.0f}, round {args.rounds} {row['bytes_down_last']:,.0f}; "
              f"peak memory {row['peak_rss_gib']:.2f} GiB; whole run {row['wall_s']:.1f} s{again}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
