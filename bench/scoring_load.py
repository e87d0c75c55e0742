"""Latency and throughput of consented scoring, end to end, under concurrent load.

    .venv/bin/python bench/scoring_load.py [--clients 1,4,16,32] [--requests 400] [--patients 3000]

Sets up everything itself (experiments/signals_local.py): a synthetic hospital node with a
release installed and `fedrisk node serve` running, a release registry, and `fedrisk serve`,
each a separate uvicorn process on loopback; then issues one grant per consenting patient (up to
--grants). For each client count N, N asyncio workers (httpx) send POST /v1/scores as one bank
until --requests have completed; every request is a full path: API key and rate limit, grant
signature check, release status from the registry, forward to the node, the node's own grant,
consent and release checks, the model on the patient's record, audit entries at both ends.

The "node only" rows send the same requests straight to the node's /v1/score (with the service
token), to show what the signals service adds. Prints a table (Markdown); --json writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import signals_local as local
from server.signals.auth import KeyStore

DEFAULT_CLIENTS = "1,4,16,32"
DEFAULT_REQUESTS = 400
DEFAULT_GRANTS = 200
WARMUP_REQUESTS = 20
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Level:
    """One measured load level."""

    path: str
    clients: int
    requests: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float
    p99_ms: float


async def _load(url: str, headers: dict[str, str], bodies: list[dict], clients: int, total: int) -> Level:
    """`total` POSTs to `url` from `clients` concurrent workers cycling through `bodies`."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        async def worker() -> None:
            nonlocal errors
            for i in counter:
                began = time.perf_counter()
                response = await client.post(url, json=bodies[i % len(bodies)], headers=headers)
                latencies.append(time.perf_counter() - began)
                errors += response.status_code != 200

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - began
    ms = np.asarray(latencies) * 1000.0
    return Level("", clients, total, errors, seconds, total / seconds, float(np.percentile(ms, 50)),
                 float(np.percentile(ms, 99)))


def _table(levels: list[Level]) -> str:
    lines = ["| path | clients | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {x.path} | {x.clients} | {x.requests} | {x.errors} | {x.throughput:.1f} | {x.p50_ms:.1f} | "
              f"{x.p99_ms:.1f} |" for x in levels]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default=DEFAULT_CLIENTS, help=f"concurrent clients per level ({DEFAULT_CLIENTS})")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="requests per level (400)")
    parser.add_argument("--patients", type=int, default=3000, help="synthetic patients at the hospital (3000)")
    parser.add_argument("--grants", type=int, default=DEFAULT_GRANTS, help="distinct applicants' grants (200)")
    parser.add_argument("--no-direct", action="store_true", help="skip the node-only comparison")
    parser.add_argument("--work", help="work directory (default: a temporary one, removed afterwards)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    levels_wanted = [int(c) for c in args.clients.split(",")]

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fedrisk-scoring-load-"))
    services: list[local.Service] = []
    try:
        print(f"setting up in {work} ...", flush=True)
        federation = local.build_federation(work / "federation", patients=args.patients)
        hospital = local.build_hospital(work / "hospital", federation)
        release = local.create_release(work / "registry", hospital, federation.runs[0])
        db = work / "service" / "signals.sqlite"
        key = KeyStore(db).add("bank-analyst", "load-bench", bank=local.BANK)[1]
        node = local.start_node_service(hospital, work / "logs", wait=False)
        service = local.start_signals_service(db, work / "registry", work / "logs", rate=1e6, burst=1_000_000,
                                              wait=False)
        services += [node, service]
        node.wait_ready()
        service.wait_ready()
        local.register_hospital(db, hospital, node)
        grants = [hospital.issue(k) for k in hospital.consenting()[:args.grants]]
        print(f"{len(grants)} grants, release {release}; warming up ...", flush=True)

        scores = f"{service.base_url}/v1/scores"
        bank = {"X-API-Key": key}
        via_service = [{"grant": g, "release": release} for g in grants]
        direct = [{"grant": g, "bank": local.BANK, "release": release} for g in grants]
        node_auth = {"Authorization": f"Bearer {hospital.service_token_file.read_text().strip()}"}
        asyncio.run(_load(scores, bank, via_service, 1, WARMUP_REQUESTS))
        asyncio.run(_load(f"{node.base_url}/v1/score", node_auth, direct, 1, WARMUP_REQUESTS))

        results: list[Level] = []
        for clients in levels_wanted:
            level = asyncio.run(_load(scores, bank, via_service, clients, args.requests))
            results.append(Level("bank -> signals -> node", *list(asdict(level).values())[1:]))
            if not args.no_direct:
                level = asyncio.run(_load(f"{node.base_url}/v1/score", node_auth, direct, clients, args.requests))
                results.append(Level("node only", *list(asdict(level).values())[1:]))
            print(f"  {clients} clients done", flush=True)
        print()
        print(_table(results))
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(x) for x in results], indent=2))
        return 0 if all(x.errors == 0 for x in results) else 1
    finally:
        for running in services:
            running.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
