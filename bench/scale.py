"""Scale benchmark: the simulation at growing numbers of hospitals and patients, side by side.

For each (hospitals, patients) size, in one process: synthesise the exports, make a CKKS key,
then time `fedrisk run`'s simulation (`engines.simulation.simulate`, 2 rounds by default, delta
0.1 / patients so that every hospital's policy admits it) and report, per size:

* before_round_1_s: wall time from the call to the end of round 1, minus round 1 itself (worker
  start-up, imports, noise calibration, MLflow, provisioning and validation of the nodes);
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


def measure(hospitals: int, patients: int, rounds: int, work: Path) -> dict[str, float]:
    """One size: synthesise, then one simulated run, timed and sampled."""
    report = synthesize(hospitals, patients, work / "data", seed=7)
    keys = init_keys(work / "keys")
    config = RunConfig(data_dir=str(report.files[0].parent), keys_dir=str(keys.server_context.parent),
                       run_dir=str(work / "run"), num_hospitals=hospitals, rounds=rounds, delta=0.1 / patients)
    ends: dict[int, float] = {}
    began = time.perf_counter()
    with PeakMemory() as memory:
        result = simulate(config, progress=lambda event, data: ends.setdefault(int(data["round"]), time.perf_counter())
                          if event == "round" else None)
    wall = time.perf_counter() - began
    first, last = result.rounds[1], result.rounds[rounds]
    return {"hospitals": hospitals, "patients": patients, "rounds": rounds, "wall_s": wall,
            "before_round_1_s": ends[1] - began - first[ROUND_SECONDS],
            "per_hospital_round_s": last[ROUND_SECONDS] / hospitals,
            "bytes_down_round_1": first[ROUND_BYTES_DOWN], "bytes_down_last": last[ROUND_BYTES_DOWN],
            "peak_rss_gib": memory.peak / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8:200000,50:1000000",
                        help="comma-separated HOSPITALS:PATIENTS (default 8:200000,50:1000000)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in item.split(":")) for item in args.sizes.split(",")]
    rows = []
    for hospitals, patients in sizes:
        with tempfile.TemporaryDirectory(prefix="fedrisk-bench-scale-") as scratch:
            os.environ["FEDRISK_WORKSPACE"] = scratch
            rows.append(measure(hospitals, patients, args.rounds, Path(scratch)))
        row = rows[-1]
        row["per_hospital_round_ratio"] = row["per_hospital_round_s"] / rows[0]["per_hospital_round_s"]
        print(f"{hospitals:>4} hospitals {patients:>10,} patients: before round 1 {row['before_round_1_s']:.1f} s; "
              f"round {args.rounds} {row['per_hospital_round_s']:.3f} s per hospital "
              f"({row['per_hospital_round_ratio']:.2f}x the first size); bytes down per hospital round 1 "
              f"{row['bytes_down_round_1']:,.0f}, round {args.rounds} {row['bytes_down_last']:,.0f}; "
              f"peak memory {row['peak_rss_gib']:.2f} GiB; whole run {row['wall_s']:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
