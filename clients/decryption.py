"""Verified decryption: the only way a hospital node turns ciphertexts into numbers.

The coordinator never sends a sum to decrypt. It sends the individual signed contributions, and
the node

1. keeps those whose signature verifies against its own copy of the federation manifest and whose
   header names exactly the (run, round, step, kind), length and CKKS key the node expects; one
   contribution per hospital (a second copy of a hospital is dropped); and, at a run's census
   (made fresh when the run starts), only those whose hospital's state head is not behind the
   newest this node has anchored for it (`clients.anchoring`);
2. requires at least its policy's minimum of distinct hospitals among them;
3. decrypts once per (run, round, step, kind): the first verified set is decrypted, flooded and
   rounded (`HospitalKey.decrypt_flooded`) and recorded in `decryptions.sqlite`; asking again
   with the same set returns the recorded values, asking with any other set is refused, so no
   two different sums of one step are ever decrypted (no differencing);
4. checks the contributor slot of the result counts exactly the hospitals it added;
5. audits the decryption (identity, contributors), and refuses once the key has served
   `MAX_DECRYPTIONS_PER_KEY` decryptions (the flooding's security bound assumes no more).
"""

from __future__ import annotations

import json
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from clients.anchoring import AnchorStore
from federation import stores
from federation.contributions import FederationManifest, SignedContribution
from federation.errors import ProtocolError
from federation.he_codec import CONTRIBUTOR_UNIT, MAX_DECRYPTIONS_PER_KEY, HospitalKey, ReplyRejected
from privacy.audit import ANCHOR_BEHIND, CONTRIBUTION_DROPPED, DECRYPTION, hospital_names

DECRYPTIONS_FILE = "decryptions.sqlite"


class DecryptionRefused(ProtocolError):
    """The node will not decrypt what it was sent (the message says why, naming no value)."""


@dataclass(frozen=True)
class Expected:
    """What a decryption must be of: every contribution's header must name exactly this."""

    run: str
    round: int
    step: str
    kind: str
    length: int

    @property
    def identity(self) -> str:
        return f"{self.run}|{self.round}|{self.step}|{self.kind}"


class VerifiedDecryptor:
    """One hospital's decryptions, under its key, manifest and policy floor."""

    def __init__(self, state: object, key: HospitalKey, manifest: FederationManifest, min_contributors: int) -> None:
        self.state = state
        self.key = key
        self.manifest = manifest
        self.min_contributors = min_contributors
        self.hospital = state.hospital  # type: ignore[attr-defined]
        self.path = Path(state.directory) / DECRYPTIONS_FILE  # type: ignore[attr-defined]
        self._recorded: dict[str, np.ndarray] = {}
        with closing(stores.connect(self.path, timeout=30.0)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS decryptions (identity TEXT PRIMARY KEY, key_id TEXT NOT NULL, "
                       "contributors TEXT NOT NULL, vector BLOB NOT NULL, decrypted_at TEXT NOT NULL)")

    def _refuse(self, reason: str) -> None:
        error = DecryptionRefused(f"{self.hospital}: {reason}")
        self.state.audit().refusal(error)  # type: ignore[attr-defined]
        error.audited = True  # type: ignore[attr-defined]
        raise error

    def verified(self, contributions: Sequence[SignedContribution], expected: Expected,
                 first: bool = True, parsed: dict | None = None) -> list[SignedContribution]:
        """The contributions that may enter the sum, one per hospital, in hospital order. `first`:
        the step has not been decrypted yet (only then are census heads held to the anchors).
        `parsed`, if given, receives each kept hospital's loaded ciphertexts (loaded once)."""
        if len(contributions) > 2 * len(self.manifest.hospitals):  # bounds the per-item checks and audit entries
            self._refuse(f"refusing a {expected.step} set of {len(contributions)} contributions: the federation has "
                         f"{len(self.manifest.hospitals)} hospitals, one contribution each")
        anchors = AnchorStore(self.state.directory)  # type: ignore[attr-defined]
        fresh_census = first and expected.step == "census"  # only then are heads held to the anchors
        heads = anchors.heads() if fresh_census else {}
        kept: dict[str, SignedContribution] = {}
        loaded: dict[str, list] = {}
        audit = self.state.audit()  # type: ignore[attr-defined]
        for item in contributions:
            header = item.header
            reason = None
            if (header.run, header.round, header.step, header.kind, header.length) != (
                    expected.run, expected.round, expected.step, expected.kind, expected.length):
                reason = "it names another run, round, step, kind or length"
            elif header.key_id != self.key.key_id:
                reason = "it was made under another CKKS key"
            elif header.hospital in kept:
                reason = "a second contribution from the same hospital"
            else:
                try:
                    self.manifest.verify(item)
                    loaded[header.hospital] = self.key.parse(item.ciphertexts, expected.length)
                except (ProtocolError, ReplyRejected) as exc:
                    reason = str(exc)
            if reason is None and fresh_census and anchors.behind(header, heads) is not None:
                reason = "its hospital's ledger is behind the head this node anchored for it"
                audit.append(ANCHOR_BEHIND, details={"hospital": header.hospital, "step": expected.step})
            if reason is not None:
                audit.append(CONTRIBUTION_DROPPED, details={
                    "hospital": header.hospital if header.hospital in self.manifest.hospitals else "unknown",
                    "step": expected.step, "round": expected.round, "reason": reason[:200]})
                continue
            kept[header.hospital] = item
        anchors.record_many([(item.header, item.signature) for item in kept.values()])
        if parsed is not None:
            parsed.update({name: loaded[name] for name in kept})
        return [kept[name] for name in sorted(kept)]

    def recorded(self, expected: Expected) -> np.ndarray | None:
        """The sum this node verified and decrypted earlier for `expected`, under its current key,
        or None. What a node replays a round from when the server no longer sends that round's
        contributions (they are the same this node verified: a different set is never decrypted)."""
        if expected.identity not in self._recorded:  # a record, once written, never changes: read it once
            with closing(stores.connect(self.path, timeout=30.0)) as db:
                row = db.execute("SELECT key_id, vector FROM decryptions WHERE identity = ?",
                                 (expected.identity,)).fetchone()
            if row is None or row[0] != self.key.key_id:
                return None
            self._recorded[expected.identity] = np.frombuffer(row[1], dtype="<f8").copy()
        values = self._recorded[expected.identity]
        return values.copy() if len(values) == expected.length else None

    def decrypt(self, contributions: Sequence[SignedContribution], expected: Expected) -> np.ndarray:
        """The flooded, rounded sum of the verified contributions (see the module docstring)."""
        with closing(stores.connect(self.path, timeout=30.0)) as db:
            recorded = db.execute("SELECT 1 FROM decryptions WHERE identity = ?", (expected.identity,)).fetchone()
        parsed: dict[str, list] = {}
        items = self.verified(contributions, expected, first=recorded is None, parsed=parsed)
        if len(items) < self.min_contributors:
            self._refuse(f"refusing to decrypt a {expected.step} aggregate of {len(items)} verified hospital(s); "
                         f"this node's policy requires at least {self.min_contributors}")
        contributors = json.dumps([[c.header.hospital, c.header.digest] for c in items])
        with closing(stores.connect(self.path, timeout=30.0)) as db:
            row = db.execute("SELECT contributors, vector FROM decryptions WHERE identity = ?",
                             (expected.identity,)).fetchone()
            done = db.execute("SELECT COUNT(*) FROM decryptions WHERE key_id = ?", (self.key.key_id,)).fetchone()[0]
        if row is not None:
            if row[0] != contributors:
                self._refuse(f"already decrypted {expected.step} round {expected.round} of run {expected.run} from "
                             "another set of contributions; a second, different sum of one step is never decrypted")
            return np.frombuffer(row[1], dtype="<f8").copy()
        if done >= MAX_DECRYPTIONS_PER_KEY:
            self._refuse(f"this CKKS key has served {done} decryptions, the most its flooding bound allows; "
                         "rotate the federation key")
        values = self.key.decrypt_flooded([c.ciphertexts for c in items], expected.length, expected.identity,
                                          parsed=[parsed[c.header.hospital] for c in items])
        counted = int(round(values[-1] / CONTRIBUTOR_UNIT))
        if counted != len(items):
            self._refuse(f"the {expected.step} aggregate counts {counted} contributors where {len(items)} were added")
        with closing(stores.connect(self.path, timeout=30.0)) as db, db:
            db.execute("INSERT OR IGNORE INTO decryptions VALUES (?, ?, ?, ?, ?)",
                       (expected.identity, self.key.key_id, contributors, values.astype("<f8").tobytes(),
                        datetime.now(timezone.utc).isoformat(timespec="seconds")))
            stored = db.execute("SELECT contributors, vector FROM decryptions WHERE identity = ?",
                                (expected.identity,)).fetchone()
        if stored[0] != contributors:  # another process won the race with another set
            self._refuse(f"already decrypted {expected.step} round {expected.round} of run {expected.run} from "
                         "another set of contributions")
        self.state.audit().append(DECRYPTION, details={  # type: ignore[attr-defined]
            "run": expected.run, "round": expected.round, "step": expected.step,
            "contributors": hospital_names(c.header.hospital for c in items)})
        return np.frombuffer(stored[1], dtype="<f8").copy()


def decryptions_done(node_dir: Path) -> int:
    """How many decryptions a node has recorded (for reports)."""
    path = Path(node_dir) / DECRYPTIONS_FILE
    if not path.exists():
        return 0
    with closing(stores.connect(path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM decryptions").fetchone()[0])


__all__ = ["DecryptionRefused", "Expected", "VerifiedDecryptor"]
