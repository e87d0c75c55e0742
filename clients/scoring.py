"""Consented scoring at the hospital node: one applicant, one bank, one released model, a few times.

A bank may learn the risk score of an applicant who authorised it (a grant token, see
`privacy.grants`) and whose hospital consent for `applicant-scoring` still holds, computed by the
one released model the grant names (DP-trained, installed here with its SHA-256). Nothing else
leaves the node: the probability rounded to 0.01, its risk band (from that rounded probability)
and up to three reason categories in plain language, with no magnitudes. Each score spends one
of the grant's few uses, at most one per grant per `grant_interval_s`: together with the short
expiry, scoring cannot be turned into monitoring an applicant's health.

Reason codes come from occlusion against the public reference patient of `federation.features`
(every input encoded 0): contribution of a reason category = p(x) - p(x with the category's
inputs set to the reference). Categories (`REASON_CATEGORIES`) are what a bank may be told:
billing behaviour item by item, but every diagnosis and test result in one undisclosed
"health record" category, and sex never. The reasons given are the categories with the largest
positive contributions, i.e. what raised this applicant's score above the reference, largest
first; the contributions themselves stay at the node (their exact values, re-read over time,
would track the applicant's record more finely than the rounded score).
Inputs the export schema withholds from `applicant-scoring` (psych-social conditions in the
shipped schema) are never read: they sit at the reference value, so they neither move the score
nor appear as a reason.

Speed without staleness: the validated, de-identified and encoded export and each loaded model
are cached, keyed on file identity (inode, mtime, size) and the date. Grants, consent
revocations, release status and grant uses are read afresh on every request, so a revocation, a
withdrawal or a spent use applies to the very next score. Every check that can refuse runs
before a use is spent, so a refused request costs the applicant nothing.
"""

from __future__ import annotations

import json
import shutil
import threading
import zipfile
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clients.deidentify import PSEUDONYM
from clients.node_state import NodeState
from federation import features as fx
from federation.config import model_layers
from federation.errors import ConfigError, DataError, FedriskError
from federation.model import (  # noqa: F401  (the band edges are part of scoring's public face)
    LOW_BAND_UPPER,
    MEDIUM_BAND_UPPER,
    N_FEATURES,
    load_model,
    num_parameters,
    predict_proba,
    risk_band,
    weights_digest,
)
from privacy.audit import RELEASE_INSTALL, RELEASE_WITHDRAW, SCORE_REFUSED, SCORE_USE, AuditIdentifierError, Digest
from privacy.grants import (
    DEFAULT_GRANT_HOURS,
    DEFAULT_GRANT_INTERVAL_S,
    DEFAULT_GRANT_USES,
    RELEASE_PATTERN,
    SCORING_PURPOSE,
    GrantAuthority,
)

PROBABILITY_DECIMALS = 2
"""Scores leave the node rounded to 0.01: enough for a lending decision, too coarse to follow small
changes in an applicant's record."""
TOP_REASONS = 3
"""Reason categories returned with a score: those with the largest positive contributions, at most
this many, largest first."""

RELEASES_DIR, RELEASE_FILE, MODEL_FILE, DIGEST_FILE = "releases", "release.json", "model.npz", "model.sha256"
STATUS_ACTIVE, STATUS_WITHDRAWN = "active", "withdrawn"
RELEASE_ID_PATTERN = RELEASE_PATTERN
"""Release ids are plain names (they name a directory): 1-64 letters, digits, '.', '-', '_'."""
# ScoringRefused kinds, mapped to status codes by the scoring service.
UNKNOWN_RELEASE, WITHDRAWN_RELEASE, DAMAGED_RELEASE = "unknown-release", "withdrawn-release", "damaged-release"
NO_CONSENT, NO_RECORD, NODE_UNAVAILABLE = "no-consent", "no-record", "node-unavailable"

REASON_CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "late-payments": ("Late payments on medical bills in the last 24 months", ("prior_late_payments_24m",)),
    "payment-plan": ("On a payment plan for medical bills", ("on_payment_plan",)),
    "outstanding-balance": ("Outstanding balance on medical bills", ("balance_outstanding_log",)),
    "time-since-payment": ("Time since the last payment on medical bills", ("months_since_last_payment",)),
    "billing-statements": ("Billing statements sent in the last 12 months", ("statements_sent_12m",)),
    "medical-costs": ("Size of medical charges and out-of-pocket costs", ("total_charges_log", "out_of_pocket_log")),
    "care-use": ("Recent use of hospital and medical care", fx.UTILISATION_COLUMNS),
    "health-record": ("Health conditions and test results on record (details are not disclosed)",
                      fx.CHRONIC_CONDITIONS + fx.LAB_COLUMNS),
    "insurance": ("Type of health insurance coverage", tuple(f"insurance_{t}" for t in fx.INSURANCE_TYPES)),
    "employment": ("Employment status", tuple(f"employment_{t}" for t in fx.EMPLOYMENT_STATUSES)),
    "area": ("Type of area lived in (urban to remote)", tuple(f"area_{t}" for t in fx.AREA_TYPES)),
    "age": ("Age band", ("age",)),
}
"""What a bank may be told moved a score: category -> (words a loan officer can pass on, model
inputs). Diagnoses and test results are one category whose phrase names none of them, so a
reason code never discloses a condition. Sex is in no category: it is never given as a reason
(a protected characteristic; the model card reports the model's behaviour by sex instead)."""
UNREPORTED_INPUTS = ("sex_female",)

FEATURE_GROUPS: dict[str, tuple[int, ...]] = {
    category: tuple(fx.FEATURE_NAMES.index(name) for name in names)
    for category, (_, names) in REASON_CATEGORIES.items()}
"""Reason category -> its columns in `FEATURE_NAMES` (occluded together)."""
REASON_PHRASES: dict[str, str] = {category: phrase for category, (phrase, _) in REASON_CATEGORIES.items()}
_covered = {name for _, names in REASON_CATEGORIES.values() for name in names} | set(UNREPORTED_INPUTS)
if _covered != set(fx.FEATURE_NAMES):  # the feature contract changed: every input needs a category
    raise RuntimeError(f"reason categories do not cover the model inputs: {_covered ^ set(fx.FEATURE_NAMES)}")


class ScoringRefused(FedriskError):
    """A score was refused for a reason other than the grant (see `kind`); one line, no identifier."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"score refused: {reason}")
        self.kind = kind


@dataclass(frozen=True)
class ReasonCode:
    """One reason that raised the score: its category (a key of REASON_CATEGORIES) and the
    category's fixed phrase. No magnitude: only the order of the reasons says which weighed more."""

    feature: str
    phrase: str


@dataclass(frozen=True)
class Score:
    """What the bank receives: probability of 90-day delinquency (rounded to PROBABILITY_DECIMALS),
    the band of that rounded probability, reason categories, the release used."""

    probability: float
    band: str
    reasons: tuple[ReasonCode, ...]
    release_id: str


def round_probability(probability: float) -> float:
    """The probability as it leaves the node: rounded to PROBABILITY_DECIMALS."""
    return round(float(probability), PROBABILITY_DECIMALS)


def occlusion(model: torch.nn.Module, x_row: np.ndarray) -> tuple[float, dict[str, float]]:
    """p(x) and, per reason category, p(x) - p(x with its inputs at the reference), in one batch.
    A category already at the reference contributes exactly 0."""
    x = np.asarray(x_row, dtype=np.float32).reshape(-1)
    moved = [g for g, cols in FEATURE_GROUPS.items() if np.any(x[list(cols)] != 0.0)]
    batch = np.repeat(x[None, :], 1 + len(moved), axis=0)
    for row, group in enumerate(moved, start=1):
        batch[row, list(FEATURE_GROUPS[group])] = 0.0
    p = predict_proba(model, batch).astype(np.float64)
    contributions = dict.fromkeys(FEATURE_GROUPS, 0.0)
    contributions.update({group: float(p[0] - p[row]) for row, group in enumerate(moved, start=1)})
    return float(p[0]), contributions


def score_record(model_kind: str, weights: np.ndarray, n_features: int,
                 x_row: np.ndarray) -> tuple[float, dict[str, float]]:
    """Probability and occlusion contributions per reason category of one encoded record."""
    return occlusion(load_model(model_kind, weights, n_features), x_row)


def top_reasons(contributions: dict[str, float], limit: int = TOP_REASONS) -> tuple[ReasonCode, ...]:
    """The categories of the `limit` largest positive contributions, largest first, with their
    phrases (the contributions themselves are not returned)."""
    raised = sorted(((c, g) for g, c in contributions.items() if c > 0.0), key=lambda item: -item[0])
    return tuple(ReasonCode(g, REASON_PHRASES[g]) for _, g in raised[:limit])


# --- installed releases: <node>/releases/<id>/{model.npz, model.sha256, release.json} -------------

@dataclass(frozen=True)
class InstalledRelease:
    """A release installed at the node (`release.json`)."""

    release_id: str
    model_kind: str
    n_features: int
    sha256: str
    status: str
    directory: Path


def _release_path(releases_dir: Path, release_id: str) -> Path:
    """The directory of `release_id`; refuses ids that are not plain names (no path tricks)."""
    if not isinstance(release_id, str) or not RELEASE_ID_PATTERN.match(release_id):
        raise ScoringRefused(UNKNOWN_RELEASE, "release ids are 1-64 letters, digits, '.', '-' or '_'")
    return Path(releases_dir) / release_id


def read_release(releases_dir: Path, release_id: str) -> InstalledRelease:
    """The installed release `release_id`, read from disk now (status included)."""
    path = _release_path(releases_dir, release_id)
    try:
        raw = json.loads((path / RELEASE_FILE).read_text())
        return InstalledRelease(release_id, str(raw["model"]), int(raw["n_features"]), str(raw["sha256"]),
                                str(raw["status"]), path)
    except FileNotFoundError:
        raise ScoringRefused(UNKNOWN_RELEASE, f"release {release_id} is not installed at this node") from None
    except (ValueError, KeyError, TypeError):
        raise ScoringRefused(DAMAGED_RELEASE, f"release {release_id} has a damaged {RELEASE_FILE}") from None


def _read_model(directory: Path) -> tuple[str, int, np.ndarray, str]:
    """Model kind, input count, weights and declared SHA-256 of a release directory, checked:
    the weights hash to the declared digest and fit the model kind."""
    try:
        with np.load(directory / MODEL_FILE, allow_pickle=False) as npz:
            kind, n_features, weights = str(npz["model"]), int(npz["n_features"]), np.asarray(npz["weights"])
        declared = (directory / DIGEST_FILE).read_text().split()[0]
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{directory} is not a fedrisk release ({MODEL_FILE} with weights/model/n_features, "
                          f"and {DIGEST_FILE}): {type(exc).__name__}") from None
    if weights_digest(weights) != declared:
        raise ConfigError(f"{directory / MODEL_FILE} does not match its {DIGEST_FILE}")
    model_layers(kind)
    if weights.size != num_parameters(kind, n_features):
        raise ConfigError(f"{directory / MODEL_FILE}: {weights.size} weights do not fit model {kind!r}")
    return kind, n_features, weights, declared


def _write_release_json(directory: Path, record: dict[str, object]) -> None:
    tmp = directory / f"{RELEASE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(directory / RELEASE_FILE)


def install_release(node_dir: Path, release_dir: Path, release_id: str) -> InstalledRelease:
    """Copy a training release (`<run>/release/`: model.npz + model.sha256) into the node as
    `release_id`, after checking its digest and that it reads the standard 40 inputs. Audited."""
    state = NodeState.load(Path(node_dir))
    releases = state.directory / RELEASES_DIR
    try:
        target = _release_path(releases, release_id)
    except ScoringRefused as exc:
        raise ConfigError(str(exc).removeprefix("score refused: ")) from None
    if target.exists():
        raise ConfigError(f"release {release_id} is already installed at this node (ids are never reused)")
    kind, n_features, _, digest = _read_model(Path(release_dir))
    if n_features != N_FEATURES:
        raise ConfigError(f"release reads {n_features} inputs; scoring uses the standard {N_FEATURES}")
    staging = releases / f".{release_id}.installing"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in (MODEL_FILE, DIGEST_FILE):
        shutil.copyfile(Path(release_dir) / name, staging / name)
    _write_release_json(staging, {"release": release_id, "model": kind, "n_features": n_features, "sha256": digest,
                                  "status": STATUS_ACTIVE, "installed": datetime.now(UTC).isoformat()})
    staging.rename(target)
    state.audit().append(RELEASE_INSTALL, purpose=SCORING_PURPOSE,
                         details={"release": release_id, "sha256": Digest(digest), "model": kind})
    return read_release(releases, release_id)


def installed_releases(node_dir: Path) -> list[InstalledRelease]:
    """Every release installed at the node (withdrawn ones included), by id; reads only."""
    releases = Path(node_dir) / RELEASES_DIR
    if not releases.is_dir():
        return []
    out = []
    for path in sorted(p for p in releases.iterdir() if (p / RELEASE_FILE).is_file()):
        try:
            out.append(read_release(releases, path.name))
        except ScoringRefused:
            continue  # a damaged entry is refused when scored; a listing shows what reads
    return out


def withdraw_release(node_dir: Path, release_id: str) -> InstalledRelease:
    """Mark an installed release withdrawn: every later score with it is refused. Audited."""
    state = NodeState.load(Path(node_dir))
    try:
        release = read_release(state.directory / RELEASES_DIR, release_id)
    except ScoringRefused as exc:
        raise ConfigError(str(exc).removeprefix("score refused: ")) from None
    if release.status != STATUS_WITHDRAWN:
        record = json.loads((release.directory / RELEASE_FILE).read_text())
        record.update(status=STATUS_WITHDRAWN, withdrawn=datetime.now(UTC).isoformat())
        _write_release_json(release.directory, record)
        state.audit().append(RELEASE_WITHDRAW, purpose=SCORING_PURPOSE, details={"release": release_id})
    return read_release(state.directory / RELEASES_DIR, release_id)


# --- the consented records and the scorer ----------------------------------------------------------

def _file_key(path: Path) -> tuple[int, int, int]:
    info = Path(path).stat()
    return info.st_ino, info.st_mtime_ns, info.st_size


@dataclass(frozen=True)
class _Snapshot:
    """One consistent view of the export: cache key, encoded consented rows and their index."""

    key: tuple[object, ...]
    rows: dict[str, int]
    known: frozenset[str]
    x: np.ndarray


class ConsentedRecords:
    """The node's encoded records with current `applicant-scoring` consent, by pseudonym.

    Built through `NodeState.usable` (validate, de-identify, consent policy) and cached until the
    export, its schema or the date changes. `row` also reads the revocation registry on every
    call, so a `fedrisk node revoke` applies to the next request.
    """

    def __init__(self, state: NodeState) -> None:
        self.state, self._lock = state, threading.Lock()
        self._snapshot: _Snapshot | None = None

    def _current(self) -> _Snapshot:
        try:
            key = (_file_key(self.state.data_file), _file_key(self.state.schema_file),
                   _file_key(self.state.directory / "pseudonym.key"), date.today())
        except OSError:
            raise DataError("the node's export or its schema cannot be read") from None
        with self._lock:
            if self._snapshot is None or self._snapshot.key != key:
                self._snapshot = self._build(key)
            return self._snapshot

    def _build(self, key: tuple[object, ...]) -> _Snapshot:
        table, mask, _ = self.state.usable(SCORING_PURPOSE, today=date.today())
        consented = table.loc[mask].reset_index(drop=True)
        schema = self.state.schema()
        withheld = {schema.column(c).maps_to or c for c in schema.excluded_columns(SCORING_PURPOSE)}
        for column in (set(fx.RAW_FEATURE_COLUMNS) & withheld) - set(consented.columns):
            consented[column] = pd.NA  # withheld for this purpose: encoded as the reference (0)
        return _Snapshot(key, {str(p): i for i, p in enumerate(consented[PSEUDONYM])},
                         frozenset(map(str, table[PSEUDONYM])), fx.encode_features(consented))

    def row(self, pseudonym: str) -> np.ndarray:
        """The encoded record of a patient whose applicant-scoring consent holds right now."""
        snapshot = self._current()
        index = snapshot.rows.get(pseudonym)
        if index is None:
            if pseudonym not in snapshot.known:
                raise ScoringRefused(NO_RECORD, "the patient's record is no longer held at this node")
            raise ScoringRefused(NO_CONSENT, "the patient's consent for applicant-scoring does not hold")
        if pseudonym in self.state.revocations().revoked(SCORING_PURPOSE, as_of=datetime.now(UTC)):
            raise ScoringRefused(NO_CONSENT, "the patient withdrew consent for applicant-scoring")
        return snapshot.x[index]


def grant_authority(state: NodeState, min_interval_s: float = DEFAULT_GRANT_INTERVAL_S) -> GrantAuthority:
    """The node's grant authority, auditing to the node's audit log; `min_interval_s` is its
    per-grant rate limit (seconds between two uses of one grant)."""
    return GrantAuthority(state.directory, state.hospital, audit=state.audit(), min_interval_s=min_interval_s)


def issue_grant(state: NodeState, record_key: str, bank: str, release_id: str, *,
                hours: int = DEFAULT_GRANT_HOURS, uses: int = DEFAULT_GRANT_USES) -> str:
    """Issue an applicant-scoring grant for the patient the operator names by record key: `bank`
    may score them with release `release_id`, `uses` times within `hours`. Only the pseudonym is
    stored; refused unless the release is installed and active here and the patient's
    applicant-scoring consent holds."""
    pseudonym = state.pseudonym_key().pseudonymise(pd.Series([record_key])).iloc[0]
    try:
        release = read_release(state.directory / RELEASES_DIR, release_id)
        if release.status != STATUS_ACTIVE:
            raise ScoringRefused(WITHDRAWN_RELEASE, f"release {release_id} is {release.status}")
        ConsentedRecords(state).row(pseudonym)
    except ScoringRefused as exc:
        raise ConfigError(f"no grant issued: {str(exc).removeprefix('score refused: ')}") from None
    return grant_authority(state).issue(pseudonym, bank, release_id, SCORING_PURPOSE, hours=hours, uses=uses)


class ConsentedScorer:
    """Scores applicants at one node. node_state: the node; releases_dir: installed releases
    (default `<node>/releases`); grant_interval_s: the per-grant rate limit, least seconds
    between two scores with one grant (default DEFAULT_GRANT_INTERVAL_S, 0 disables it).
    Safe to share between threads, and between processes on one node (uses are counted in
    the node's grants.sqlite)."""

    def __init__(self, node_state: NodeState, releases_dir: Path | None = None, *,
                 grant_interval_s: float = DEFAULT_GRANT_INTERVAL_S) -> None:
        self.state = node_state
        self.releases_dir = Path(releases_dir or node_state.directory / RELEASES_DIR)
        self.authority, self.audit = grant_authority(node_state, grant_interval_s), node_state.audit()
        self.records = ConsentedRecords(node_state)
        self._models: dict[str, tuple[tuple[object, ...], torch.nn.Module]] = {}
        self._lock = threading.Lock()

    def _model(self, release_id: str) -> torch.nn.Module:
        """The active release's model, verified against its SHA-256 when (re)loaded."""
        release = read_release(self.releases_dir, release_id)
        if release.status != STATUS_ACTIVE:
            raise ScoringRefused(WITHDRAWN_RELEASE, f"release {release_id} is {release.status}")
        try:
            key = (_file_key(release.directory / MODEL_FILE), release.sha256, release.model_kind, release.n_features)
        except FileNotFoundError:
            raise ScoringRefused(DAMAGED_RELEASE, f"release {release_id} has no {MODEL_FILE}") from None
        with self._lock:
            cached = self._models.get(release_id)
            if cached is None or cached[0] != key:
                try:
                    kind, n_features, weights, declared = _read_model(release.directory)
                except ConfigError:
                    raise ScoringRefused(DAMAGED_RELEASE, f"release {release_id} fails its integrity check") from None
                if (declared, kind, n_features) != (release.sha256, release.model_kind, N_FEATURES):
                    raise ScoringRefused(DAMAGED_RELEASE, f"release {release_id} fails its integrity check")
                cached = self._models[release_id] = (key, load_model(kind, weights, n_features))
            return cached[1]

    def score(self, token: str, bank: str, release_id: str) -> Score:
        """Score the applicant `token` authorises `bank` to score, with release `release_id` (the
        one the grant names). Every refusal comes before the grant's use is spent; the use is
        then spent atomically (GrantAuthority.consume), and only then is the score computed.
        Raises GrantRefused or ScoringRefused (one line); every outcome is audited."""
        grant = self.authority.verify(token, bank, release_id, SCORING_PURPOSE)
        named = {"grant": Digest(grant.grant_id), "bank": bank, "release": release_id}
        try:
            model = self._model(release_id)
            row = self.records.row(grant.pseudonym)
        except ScoringRefused as refusal:
            self._audit(SCORE_REFUSED, {"kind": refusal.kind, "reason": str(refusal), **named})
            raise
        except FedriskError as problem:  # the node's own export or state is unusable: say so, not why
            self._audit(SCORE_REFUSED, {"kind": NODE_UNAVAILABLE, "reason": str(problem)[:300], **named})
            raise ScoringRefused(NODE_UNAVAILABLE, "the node cannot score at the moment (see its audit log)") from None
        left = self.authority.consume(grant)  # GrantRefused (used up, rate-limited) is audited by the authority
        probability, contributions = occlusion(model, row)
        rounded = round_probability(probability)
        self._audit(SCORE_USE, {**named, "uses-left": left})
        return Score(rounded, risk_band(rounded), top_reasons(contributions), release_id)

    def _audit(self, action: str, details: dict[str, object]) -> None:
        try:
            self.audit.append(action, purpose=SCORING_PURPOSE, details=details)
        except AuditIdentifierError:  # a caller-chosen id the filter mistrusts: record the event alone
            self.audit.append(action, purpose=SCORING_PURPOSE, details={"kind": details.get("kind", "score")})
