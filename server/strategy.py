"""HE FedAvg: Flower's FedAvg with the arithmetic moved to the hospitals, under CKKS.

Each hospital sends a signed contribution Enc([ (n_k/N_hat)(w_k - w), n_k/N_hat, 1/128 ]). The
server cannot decrypt and does not add: it checks each reply's shape and relays the round's
signed contributions, with every earlier round's, in the next message. Each hospital verifies
the signatures, adds the contributions itself, decrypts each round once (flooded) and divides by
the summed record share, which is exactly weighted FedAvg over the hospitals that replied. The
server never holds a secret key and never sees a hospital's update, count or metric.

A round completes with the hospitals whose replies are valid, as long as there are at least
`min_replies` of them: a hospital that fails, times out or sends a malformed ciphertext is
left out of that round (and the reason logged).

Each round's federated evaluation is DP: every hospital sends a signed, noised score histogram
of its held-out records (charged to its ledger before it is computed); a hospital reveals the
flooded sum, from which the server reads AUC, Brier score and log loss
(`federation.round_evaluation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation import messages as M
from federation import round_evaluation
from federation.contributions import (
    SignedContribution,
    from_record,
    newest_by_hospital,
    relay_record,
    signed_headers,
    to_record,
)
from federation.errors import ProtocolError
from federation.he_codec import ReplyRejected, ServerContext
from privacy.accounting import HospitalSpend
from server.tracking import ROUND_EPSILON_MAX, ROUND_HOSPITALS

Reveal = Callable[[list[SignedContribution], int], list[float]]
"""Asks a key holder to reveal the flooded sum of a round's signed DP evaluations."""


@dataclass(frozen=True)
class Rejection:
    """A reply left out of an aggregate, and why (one line, never data)."""

    server_round: int
    step: str
    hospital: str
    reason: str

    def to_dict(self) -> dict[str, object]:
        """JSON form, for the checkpoint, the audit log and MLflow."""
        return {"round": self.server_round, "step": self.step, "hospital": self.hospital, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "Rejection":
        """Inverse of `to_dict` (a resumed run reads its checkpoint's rejections back)."""
        return cls(int(data["round"]), str(data["step"]), str(data["hospital"]), str(data["reason"]))


def reply_record(reply: Message) -> tuple[ConfigRecord | None, str | None]:
    """A hospital's reply record, and why it carries no result if it doesn't: Flower reported
    a failure, the reply is empty, or the hospital refused (its one-line reason)."""
    if reply.has_error():
        return None, f"failed: {reply.error.reason}"
    record = reply.content.config_records.get(M.REPLY)
    if record is None:
        return None, "empty reply"
    if M.ERROR in record:
        return record, str(record[M.ERROR])
    return record, None


@dataclass
class RoundTraffic:
    """Ciphertext bytes that crossed the wire in one round: each hospital's update (up) and the
    largest message the server sent one hospital in the round (down)."""

    up_bytes: dict[str, int] = field(default_factory=dict)
    down_bytes: int = 0


def contribution_bytes(contributions: Iterable[SignedContribution]) -> int:
    """Ciphertext bytes of some contributions."""
    return sum(len(b) for c in contributions for b in c.ciphertexts)


class ReplyChecker:
    """Sorts one step's replies into accepted signed contributions and logged rejections.

    Shared by training rounds and cohort queries: a reply enters only if it carries one
    contribution of the expected (run, round, step, kind, length) under the federation's key,
    from a hospital not already counted, whose ciphertexts have the federation's shape. (Its
    signature is verified where it matters: by every hospital that decrypts it.)"""

    def __init__(self, he: ServerContext, run_id: str, min_replies: int) -> None:
        self.he, self.run_id, self.min_replies = he, run_id, min_replies
        self.rejections: list[Rejection] = []
        self.node_ids: dict[str, int] = {}

    def hospital_of(self, node_id: int) -> str:
        """The hospital a node id last replied as (or the bare node id)."""
        return next((h for h, n in self.node_ids.items() if n == node_id), f"node-{node_id}")

    def nodes_of(self, hospitals: list[str]) -> list[int]:
        """Node ids of these hospitals, then of every other known hospital (fallback key holders)."""
        first = [self.node_ids[h] for h in hospitals if h in self.node_ids]
        return first + [n for _, n in sorted(self.node_ids.items()) if n not in first]

    def _contribution(self, reply: Message, server_round: int, step: str, kind: str, length: int,
                      seen: set[str]) -> SignedContribution:
        items = from_record(reply.content.config_records.get(M.CONTRIBUTION), "reply")
        if len(items) != 1:
            raise ReplyRejected("reply carries no signed contribution")
        item = items[0]
        header = item.header
        if (header.run, header.round, header.step, header.kind, header.length) != (
                self.run_id, server_round, step, kind, length):
            raise ReplyRejected(f"a contribution for {header.step} round {header.round} of run {header.run}, "
                                f"not {step} round {server_round}")
        if header.key_id != self.he.key_id:
            raise ReplyRejected(f"made under key {header.key_id}, not the federation's key {self.he.key_id}")
        if header.hospital in seen:
            raise ReplyRejected("a second reply from the same hospital")
        self.he.parse(item.ciphertexts, length)
        return item

    def accept(self, server_round: int, replies: Iterable[Message], step: str, kind: str, length: int,
               what: str | None = None, spends: dict[str, HospitalSpend] | None = None) -> list[SignedContribution]:
        """The valid contributions of one step; every other reply becomes a `Rejection`.
        With `spends`, a valid reply must also carry its hospital's privacy spend, which is
        stored there. Raises ProtocolError if fewer than `min_replies` remain."""
        accepted: list[SignedContribution] = []
        reasons: list[str] = []
        for reply in replies:
            who = f"node-{reply.metadata.src_node_id}"
            record, reason = reply_record(reply)
            if record is not None and M.HOSPITAL in record:
                who = str(record[M.HOSPITAL])
                self.node_ids.setdefault(who, reply.metadata.src_node_id)
            if reason is None:
                try:
                    item = self._contribution(reply, server_round, step, kind, length, {c.header.hospital for c in accepted})
                    if item.header.hospital != who:
                        raise ReplyRejected(f"signed as {item.header.hospital}, replied as {who}")
                    if spends is not None:
                        try:
                            spends[who] = HospitalSpend.from_wire(record.get(M.SPEND))  # type: ignore[union-attr]
                        except ValueError as exc:
                            raise ReplyRejected(str(exc)) from None
                    accepted.append(item)
                    continue
                except (ReplyRejected, ProtocolError) as exc:
                    reason = str(exc)
            self.rejections.append(Rejection(server_round, what or step, who, reason))
            reasons.append(f"{who}: {reason}")
        if len(accepted) < self.min_replies:
            detail = "; ".join(reasons) if reasons else "no reply in time"
            raise ProtocolError(f"{what or step} round {server_round}: {len(accepted)} valid replies, "
                                f"{self.min_replies} needed ({detail})")
        return accepted


class HEFedAvg(Strategy):
    """Weighted FedAvg over signed CKKS contributions that only hospitals add and decrypt.

    Args:
        he: the server's parameters-only CKKS context (it checks shapes, nothing more).
        census: every hospital's signed census contribution, sent until a hospital has verified it.
        reveal: asks a key-holding hospital to reveal a round's summed DP evaluation.
        min_replies: fewest hospitals whose valid replies a round needs.
        config: extra ConfigRecord entries sent with every message (run, key and parameter ids).
        update_length: values in one hospital's encrypted update (model parameters + 2).
    """

    def __init__(self, he: ServerContext, census: list[SignedContribution], reveal: Reveal,
                 min_replies: int, config: dict[str, object], update_length: int) -> None:
        self.he = he
        self.census = census
        self.reveal = reveal
        self.base_config = config
        self.update_length = update_length
        self.checker = ReplyChecker(he, str(config[M.RUN_ID]), min_replies)
        self.chain: dict[int, list[SignedContribution]] = {}
        self.anchors: list[tuple[str, bytes]] = []
        self.privacy: dict[str, HospitalSpend] = {}
        self.traffic: dict[int, RoundTraffic] = {}
        self.contributors: dict[int, list[str]] = {}
        self.evaluations: dict[int, list[float]] = {}  # each round's revealed DP evaluation (record units)
        self.verified_through: dict[int, int] = {}  # node id -> the round through which it verified the chain
        self.census_verified: set[int] = set()  # node ids whose accepted train reply decrypted the census

    @property
    def rejections(self) -> list[Rejection]:
        """Every reply left out so far."""
        return self.checker.rejections

    def summary(self) -> None:
        """Nothing to print: the run tracker logs the configuration."""

    def records(self, through: int, server_round: int, after: int = 0, census: bool = True) -> dict[str, ConfigRecord]:
        """What a message of a round carries: config, the census (unless `census` is False: the
        hospital verified it), the chain's rounds `after`+1 to `through` and the newest signed
        state heads the server relays (`clients.anchoring`)."""
        records = {M.CONFIG: ConfigRecord({**self.base_config, M.ROUND: server_round}),
                   M.ANCHORS: ConfigRecord(relay_record(self.anchors))}
        if census:
            records[M.CENSUS_RECORD] = ConfigRecord(to_record(self.census))
        for past in range(after + 1, through + 1):
            if past in self.chain:
                records[M.ROUND_RECORD.format(past)] = ConfigRecord(to_record(self.chain[past]))
        return records

    def confirm(self, hospitals: Iterable[str], through: int, census: bool = False) -> None:
        """These hospitals' accepted replies show they verified and decrypted every round up to
        `through` (a train reply of round r: through r - 1; an evaluation of round r: through r),
        and with `census` (a train reply) the census too: their later messages leave those out
        (`clients.node.HospitalNode.global_weights` and `census_total` read them from the
        hospital's own decryption records). A hospital without a valid reply in this step is
        sent the census and the whole chain again next time."""
        confirmed = {self.checker.node_ids[h] for h in hospitals if h in self.checker.node_ids}
        for node in list(self.verified_through):
            if node not in confirmed:  # no valid reply this step (lost its records, dropped out): send it all again
                del self.verified_through[node]
        self.census_verified &= confirmed
        for node in confirmed:
            self.verified_through[node] = max(self.verified_through.get(node, 0), through)
        if census:
            self.census_verified |= confirmed

    def relay(self, contributions: Iterable[SignedContribution]) -> None:
        """Keep the newest signed state head of each hospital, to relay to all."""
        self.anchors = newest_by_hospital([*self.anchors, *signed_headers(contributions)])

    def _messages(self, grid: Grid, server_round: int, through: int, message_type: str) -> list[Message]:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) < self.checker.min_replies:
            raise ProtocolError(f"only {len(node_ids)} hospital node(s) connected; {self.checker.min_replies} needed")
        contents: dict[tuple[int, bool], RecordDict] = {}  # one per (starting round, census sent), shared
        messages, largest = [], 0
        for node in node_ids:
            after = min(self.verified_through.get(node, 0), through)
            census = node not in self.census_verified
            if (after, census) not in contents:
                contents[after, census] = RecordDict(self.records(through, server_round, after, census))
            largest = max(largest, (contribution_bytes(self.census) if census else 0) + sum(
                contribution_bytes(self.chain.get(r, [])) for r in range(after + 1, through + 1)))
            messages.append(Message(content=contents[after, census], dst_node_id=node, message_type=message_type))
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        traffic.down_bytes = max(traffic.down_bytes, largest)
        return messages

    def configure_train(self, server_round: int, arrays: object, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send every hospital the chain so far; it trains from the model the chain encodes."""
        return self._messages(grid, server_round, server_round - 1, M.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[None, MetricRecord | None]:
        """Keep the round's valid signed updates: the next messages relay them to every hospital."""
        replies = list(replies)
        spends: dict[str, HospitalSpend] = {}
        accepted = self.checker.accept(server_round, replies, "train", "update", self.update_length, "training",
                                       spends)
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        for item in accepted:
            traffic.up_bytes[item.header.hospital] = contribution_bytes([item])
        self.privacy.update(spends)
        self.chain[server_round] = accepted
        self.relay(accepted)
        self.contributors[server_round] = sorted(item.header.hospital for item in accepted)
        self.confirm(self.contributors[server_round], server_round - 1, census=True)
        return None, MetricRecord({ROUND_HOSPITALS: len(accepted),
                                   ROUND_EPSILON_MAX: max(p.run_epsilon for p in self.privacy.values())})

    def configure_evaluate(self, server_round: int, arrays: object, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every hospital evaluates the new global model on its own held-out records, under DP."""
        return self._messages(grid, server_round, server_round, M.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """A key holder reveals the flooded sum of the valid DP evaluations; the metrics are read
        off the noised histogram (post-processing)."""
        replies = list(replies)
        spends: dict[str, HospitalSpend] = {}
        accepted = self.checker.accept(server_round, replies, "evaluate", "evaluation",
                                       round_evaluation.LENGTH + 1, "evaluation", spends)
        self.privacy.update(spends)
        if any(s.evaluation is None for s in spends.values()):
            raise ProtocolError(f"evaluation round {server_round}: a hospital reported no DP evaluation spend")
        multipliers = {s.evaluation.noise_multiplier for s in spends.values()}  # type: ignore[union-attr]
        if len(multipliers) != 1:
            raise ProtocolError(f"evaluation round {server_round}: hospitals used different noise ({sorted(multipliers)})")
        self.relay(accepted)
        self.confirm([item.header.hospital for item in accepted], server_round)
        values = self.reveal(accepted, server_round)
        summed = [v / M.EVAL_UNIT for v in values[:-1]]
        self.evaluations[server_round] = summed
        metrics = round_evaluation.metrics_from_noised(summed, noise_multiplier=multipliers.pop(),
                                                       hospitals=len(accepted))
        return MetricRecord({**{k: float(v) for k, v in metrics.items()}, ROUND_HOSPITALS: len(accepted)})
