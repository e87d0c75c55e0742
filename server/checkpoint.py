"""The coordinator's checkpoint: what it takes to resume a run after the coordinator dies.

Written atomically after every completed round to `<run_dir>/checkpoint.npz`, and removed once
the model is released. It holds only what the server holds anyway: hospitals' signed contributions
(the census and every completed round's updates), the newest signed state heads it relays, and
public values (round metrics, the privacy accounting hospitals reported, rejected replies, the
MLflow run). Nothing in it can be decrypted without a hospital's key.

A restarted coordinator that is handed the same run config (`RunConfig.fingerprint`) resumes
after the last completed round, under the same run id, so hospitals' ledgers recognise the
rounds they already charged.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from federation.config import RunConfig
from federation.contributions import SignedContribution, pack, unpack
from federation.errors import ConfigError, ProtocolError
from privacy.accounting import HospitalSpend

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT = 3


def new_run_id() -> str:
    """A fresh, sortable run name: `run-<UTC time>-<random>`."""
    return f"run-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass
class Checkpoint:
    """The server's state after `completed_round` rounds of run `run_id`."""

    run_id: str
    fingerprint: str
    completed_round: int
    census: list[SignedContribution]
    chain: dict[int, list[SignedContribution]]
    anchors: list[tuple[str, bytes]] = field(default_factory=list)
    mlflow_run_id: str = ""
    rounds: dict[int, dict[str, float]] = field(default_factory=dict)
    privacy: dict[str, HospitalSpend] = field(default_factory=dict)
    contributors: dict[int, list[str]] = field(default_factory=dict)
    rejections: list[dict[str, object]] = field(default_factory=list)
    evaluations: dict[int, list[float]] = field(default_factory=dict)

    def save(self, run_dir: Path) -> Path:
        """Write atomically: a crash mid-write leaves the previous checkpoint in place."""
        path = Path(run_dir) / CHECKPOINT_FILE
        meta = {k: getattr(self, k) for k in ("run_id", "fingerprint", "completed_round", "mlflow_run_id", "rounds",
                                                "contributors", "rejections", "evaluations")}
        meta["privacy"] = {name: spend.to_dict() for name, spend in self.privacy.items()}
        meta["format"] = FORMAT
        meta["chain_rounds"] = sorted(self.chain)
        meta["anchors"] = [text for text, _ in self.anchors]
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                  "census": np.frombuffer(pack(self.census), dtype=np.uint8)}
        arrays.update({f"round{r}": np.frombuffer(pack(self.chain[r]), dtype=np.uint8) for r in sorted(self.chain)})
        arrays.update({f"anchor{i}": np.frombuffer(sig, dtype=np.uint8) for i, (_, sig) in enumerate(self.anchors)})
        tmp = path.with_name(f".{CHECKPOINT_FILE}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, run_dir: Path, config: RunConfig) -> "Checkpoint | None":
        """The run directory's checkpoint, or None. Refuses one left by a different run."""
        path = Path(run_dir) / CHECKPOINT_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(data["meta"].tobytes())
                if meta.get("format") != FORMAT:
                    raise ConfigError(f"{path} has checkpoint format {meta.get('format')!r}, this fedrisk reads {FORMAT}")
                census = unpack(data["census"].tobytes())
                chain = {int(r): unpack(data[f"round{r}"].tobytes()) for r in meta["chain_rounds"]}
                anchors = [(text, data[f"anchor{i}"].tobytes()) for i, text in enumerate(meta["anchors"])]
                privacy = {str(name): HospitalSpend.from_dict(spend) for name, spend in meta["privacy"].items()}
        except (OSError, ValueError, KeyError, AttributeError, ProtocolError) as exc:
            raise ConfigError(f"{path} is not a readable fedrisk checkpoint ({exc}); move it away to start afresh") from None
        if meta["fingerprint"] != config.fingerprint():
            raise ConfigError(f"{path} belongs to a run with a different configuration; resume it with the "
                              "same run config, or use another run-dir")
        if config.run_id and config.run_id != meta["run_id"]:
            raise ConfigError(f"{path} belongs to run {meta['run_id']!r}, not run-id {config.run_id!r}")
        as_rounds = lambda d: {int(k): v for k, v in d.items()}  # noqa: E731  (JSON keys are strings)
        return cls(run_id=meta["run_id"], fingerprint=meta["fingerprint"], completed_round=int(meta["completed_round"]),
                   census=census, chain=chain, anchors=anchors, mlflow_run_id=meta["mlflow_run_id"],
                   rounds=as_rounds(meta["rounds"]), privacy=privacy,
                   contributors=as_rounds(meta["contributors"]), rejections=meta["rejections"],
                   evaluations=as_rounds(meta.get("evaluations", {})))

    def check_key(self, key_id: str, run_dir: Path) -> None:
        """Refuse to resume a checkpoint made under a CKKS key the federation has since retired:
        no hospital can decrypt its ciphertexts any more."""
        made_under = {c.header.key_id for c in [*self.census, *(c for step in self.chain.values() for c in step)]}
        if made_under - {key_id}:
            raise ConfigError(f"{Path(run_dir) / CHECKPOINT_FILE} was made under CKKS key "
                              f"{', '.join(sorted(made_under))}, retired for the federation's key {key_id}: its "
                              "ciphertexts cannot be decrypted any more; start a new run (another --run-dir)")

    @staticmethod
    def clear(run_dir: Path) -> None:
        """Remove the checkpoint of a run that has finished."""
        (Path(run_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
