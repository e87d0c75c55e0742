"""No silent rollback: a node's privacy state is anchored outside the node.

A node's *state head* counts and hashes what must never go backwards: the charges in its budget
ledger, the consent withdrawals in its revocation registry and the aggregates it decrypted, plus
an *epoch* that only the documented recovery procedure raises. Every contribution a hospital signs carries its head, so
its head is anchored wherever its contributions go:

* at the other hospitals, which keep the newest signed header of every hospital they verified
  (`AnchorStore`, `anchors.sqlite` in their node directories) and drop a contribution whose
  head is behind it;
* at the coordinator, which keeps them in its checkpoint and audit log and relays the newest
  signed headers with every message (it cannot forge one; it can only withhold them, and then
  the other hospitals still refuse the node's contributions).

A node that sees a validly signed header *of its own* whose head is ahead of its state (a backup
of the node directory was restored) refuses to train or answer until its operator runs the
audited recovery (`fedrisk node anchor accept`): it raises the epoch past the anchored one and
closes every purpose's remaining budget (epsilon_total = spent), because the charges lost with
the rollback are unknown; the operator re-applies lost consent withdrawals from the hospital's
consent system and may then raise a budget deliberately (audited).
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from federation import sealing, stores
from federation.contributions import ContributionHeader, FederationManifest
from federation.errors import FedriskError, ProtocolError
from privacy.audit import ANCHOR_ACCEPTED

ANCHORS_FILE = "anchors.sqlite"
EPOCH_FILE = "anchor_epoch"
_HEAD = re.compile(r"^e(\d+):c(\d+):([0-9a-f]{16}):r(\d+):([0-9a-f]{16}):d(\d+):([0-9a-f]{16})$")


class RollbackDetected(FedriskError):
    """This node's ledger or revocations are behind a head anchored outside it."""


@dataclass(frozen=True, order=True)
class StateHead:
    """Epoch, then charge, withdrawal and decryption counts with the digest of each chain."""

    epoch: int
    charges: int
    charges_digest: str
    revocations: int
    revocations_digest: str
    decryptions: int = 0
    decryptions_digest: str = "0" * 16

    def encode(self) -> str:
        return (f"e{self.epoch}:c{self.charges}:{self.charges_digest}:"
                f"r{self.revocations}:{self.revocations_digest}:d{self.decryptions}:{self.decryptions_digest}")

    @classmethod
    def parse(cls, text: str) -> "StateHead | None":
        match = _HEAD.match(text or "")
        if match is None:
            return None
        epoch, charges, cd, revocations, rd, decryptions, dd = match.groups()
        return cls(int(epoch), int(charges), cd, int(revocations), rd, int(decryptions), dd)

    def behind(self, anchored: "StateHead") -> bool:
        """True if this head is older than `anchored`: an earlier epoch, or the same epoch with
        fewer charges, withdrawals or decryptions (all only ever grow)."""
        if self.epoch != anchored.epoch:
            return self.epoch < anchored.epoch
        return (self.charges < anchored.charges or self.revocations < anchored.revocations
                or self.decryptions < anchored.decryptions)


def _chain(rows: Iterable[object]) -> tuple[int, str]:
    digest, count = hashlib.sha256(b"fedrisk-state-head").digest(), 0
    for row in rows:
        digest = hashlib.sha256(digest + json.dumps(row, sort_keys=True, default=str).encode()).digest()
        count += 1
    return count, digest.hex()[:16]


def read_epoch(node_dir: Path) -> int:
    """The node's anchor epoch (0 until a recovery raised it). Sealed in a sealed node, so that
    someone with write access but no key cannot raise it to hide a rolled-back ledger."""
    path = Path(node_dir) / EPOCH_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0
    try:
        return int(sealing.unseal(raw, sealing.ROLE_ANCHOR_EPOCH, path).decode("ascii").strip() or 0)
    except (ValueError, UnicodeDecodeError):
        raise RollbackDetected(f"{path} is damaged") from None


def write_epoch(node_dir: Path, epoch: int) -> None:
    """Record the node's new anchor epoch (sealed in a sealed node)."""
    path = Path(node_dir) / EPOCH_FILE
    sealing.write_secret_file(path, sealing.seal_for_disk(f"{epoch}\n".encode("ascii"), sealing.ROLE_ANCHOR_EPOCH,
                                                          path))


def state_head(state: "object") -> StateHead:
    """The node's current head (`state` is a clients.node_state.NodeState)."""
    with state.ledger() as ledger:  # type: ignore[attr-defined]
        charges = [c.to_dict() for c in ledger.all_charges()]
    revocations = state.revocations().entries()  # type: ignore[attr-defined]
    count, cd = _chain(charges)
    rcount, rd = _chain(revocations)
    dcount, dd = _chain(_decryptions(Path(state.directory)))  # type: ignore[attr-defined]
    return StateHead(read_epoch(state.directory), count, cd, rcount, rd, dcount, dd)  # type: ignore[attr-defined]


def _decryptions(node_dir: Path) -> list[tuple[str, str]]:
    """What the node decrypted, in order (a restore must not let it decrypt a step twice)."""
    path = node_dir / "decryptions.sqlite"
    if not path.exists():
        return []
    with closing(stores.connect(path, timeout=30.0)) as db:
        try:
            return [tuple(r) for r in db.execute("SELECT identity, contributors FROM decryptions ORDER BY rowid")]
        except stores.OperationalError:
            return []


class AnchorStore:
    """The newest signed header this node has seen from each hospital (itself included)."""

    def __init__(self, node_dir: Path) -> None:
        self.path = Path(node_dir) / ANCHORS_FILE
        with closing(stores.connect(self.path, timeout=30.0)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS anchors (hospital TEXT PRIMARY KEY, header TEXT NOT NULL, "
                       "signature BLOB NOT NULL)")

    def _rows(self) -> list[tuple[str, str, bytes]]:
        with closing(stores.connect(self.path, timeout=30.0)) as db:
            return list(db.execute("SELECT hospital, header, signature FROM anchors ORDER BY hospital"))

    def get(self, hospital: str) -> StateHead | None:
        """The newest anchored head of `hospital`, if any."""
        for name, header, _ in self._rows():
            if name == hospital:
                return StateHead.parse(json.loads(header)["head"])
        return None

    def signed(self) -> list[tuple[str, bytes]]:
        """Every anchored (header JSON, signature) pair, for relaying."""
        return [(header, bytes(signature)) for _, header, signature in self._rows()]

    def record(self, header: ContributionHeader, signature: bytes) -> None:
        """Keep `header` if it is the newest seen from its hospital (the caller verified it)."""
        head = StateHead.parse(header.head)
        if head is None:
            return
        known = self.get(header.hospital)
        if known is not None and not known.behind(head):
            return
        with closing(stores.connect(self.path, timeout=30.0)) as db, db:
            db.execute("INSERT INTO anchors VALUES (?, ?, ?) ON CONFLICT (hospital) DO UPDATE SET "
                       "header = excluded.header, signature = excluded.signature",
                       (header.hospital, header.canonical().decode(), bytes(signature)))

    def record_many(self, items: list[tuple[ContributionHeader, bytes]]) -> None:
        """`record` for several verified headers, in one read and at most one write transaction."""
        known = {name: StateHead.parse(json.loads(text)["head"]) for name, text, _ in self._rows()}
        newest: dict[str, tuple[StateHead, ContributionHeader, bytes]] = {}
        for header, signature in items:
            head = StateHead.parse(header.head)
            if head is None:
                continue
            best = newest[header.hospital][0] if header.hospital in newest else known.get(header.hospital)
            if best is None or best.behind(head):
                newest[header.hospital] = (head, header, signature)
        if not newest:
            return
        with closing(stores.connect(self.path, timeout=30.0)) as db, db:
            db.executemany("INSERT INTO anchors VALUES (?, ?, ?) ON CONFLICT (hospital) DO UPDATE SET "
                           "header = excluded.header, signature = excluded.signature",
                           [(h.hospital, h.canonical().decode(), bytes(sig)) for _, h, sig in newest.values()])

    def heads(self) -> dict[str, StateHead | None]:
        """Every hospital's newest anchored head, in one read (for checking a whole census)."""
        return {name: StateHead.parse(json.loads(header)["head"]) for name, header, _ in self._rows()}

    @staticmethod
    def behind(header: ContributionHeader, heads: dict[str, StateHead | None]) -> StateHead | None:
        """The anchored head (of `heads()`, read once for a whole census) that `header`'s hospital
        has fallen behind, or None if it has not."""
        head, known = StateHead.parse(header.head), heads.get(header.hospital)
        if known is None:
            return None
        if head is None or head.behind(known):
            return known
        return None


def verified_anchors(pairs: Iterable[tuple[str, bytes]], manifest: FederationManifest
                     ) -> list[tuple[ContributionHeader, bytes]]:
    """The relayed (header, signature) pairs whose signature verifies against the manifest;
    the rest are ignored (the coordinator relays them; it cannot make them)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    headers = []
    for text, signature in pairs:
        try:
            header = ContributionHeader.parse(text)
            key = manifest.hospitals.get(header.hospital)
            if key is None:
                continue
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)).verify(bytes(signature), header.canonical())
        except (ProtocolError, InvalidSignature, ValueError):
            continue
        headers.append((header, bytes(signature)))
    return headers


def check_not_rolled_back(state: "object", hospital: str, relayed: Iterable[tuple[str, bytes]],
                          manifest: FederationManifest) -> StateHead:
    """This node's head, after checking it against every anchor of itself it knows: those kept
    at this node and those relayed (signed by itself). Records the newest; raises
    RollbackDetected if the node is behind any of them."""
    store = AnchorStore(state.directory)  # type: ignore[attr-defined]
    own = []  # only this node's own anchors are used: verify those, not every hospital's
    for text, signature in relayed:
        try:
            if ContributionHeader.parse(text).hospital == hospital:
                own.append((text, signature))
        except (ProtocolError, ValueError, TypeError):
            continue
    for header, signature in verified_anchors(own, manifest):
        store.record(header, signature)
    current = state_head(state)
    anchored = store.get(hospital)
    if anchored is not None and current.behind(anchored):
        raise RollbackDetected(
            f"{hospital}: this node's ledger, consent withdrawals or decryptions are behind the head anchored outside "
            f"it ({current.charges} charges, {current.revocations} withdrawals, {current.decryptions} decryptions at "
            f"epoch {current.epoch}; anchored {anchored.charges}, {anchored.revocations}, {anchored.decryptions} at "
            f"epoch {anchored.epoch}): a node directory backup was "
            "restored; it refuses to train or answer until its operator runs `fedrisk node anchor accept`")
    return current


def accept_rollback(state: "object") -> StateHead:
    """The documented recovery of a node found behind its anchored head (`fedrisk node anchor
    accept`): raise the epoch past the anchored one, close every purpose's remaining budget
    (epsilon_total = spent, since the charges lost with the rollback are unknown), and audit it.
    Refuses when the node is not behind anything it knows of."""
    hospital = state.hospital  # type: ignore[attr-defined]
    store = AnchorStore(state.directory)  # type: ignore[attr-defined]
    anchored, current = store.get(hospital), state_head(state)
    if anchored is None or not current.behind(anchored):
        raise RollbackDetected(f"{hospital}: this node is not behind any head anchored for it; nothing to accept")
    closed = {}
    with state.ledger() as ledger:  # type: ignore[attr-defined]
        for purpose in ledger.purposes():
            budget, spent = ledger.budget(purpose), ledger.spent(purpose)
            ledger.set_budget(purpose, max(spent, 1e-9), budget.delta)
            closed[purpose] = round(spent, 6)
    epoch = anchored.epoch + 1
    write_epoch(Path(state.directory), epoch)  # type: ignore[attr-defined]
    state.audit().append(ANCHOR_ACCEPTED, details={  # type: ignore[attr-defined]
        "anchored-charges": anchored.charges, "anchored-withdrawals": anchored.revocations,
        "local-charges": current.charges, "local-withdrawals": current.revocations, "new-epoch": epoch,
        "budgets-closed-at": closed})
    return state_head(state)
