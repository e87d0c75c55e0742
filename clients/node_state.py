"""A hospital node's own state: one directory the hospital can back up.

    node.json           which hospital, which export file and schema, which CKKS key
    pseudonym.key       HMAC key for record pseudonyms (0600, never leaves the node)
    hospital.ckks       this node's copy of the federation's CKKS secret context (0600)
    ledger.sqlite       privacy budget per purpose and every charge against it
    audit.sqlite(.head) hash-chained log of every load, run, round, release and refusal
    revocations.sqlite  consent withdrawals, by pseudonym
    signing.key         Ed25519 key signing every contribution this node sends (0600)
                        (the three keys sealed with AES-256-GCM when the node is sealed: federation.sealing)
    federation_manifest.json  the federation's hospitals and their public signing keys
    policy.json         the hospital's own policy (clients.policy): the last word on what it does
    decryptions.sqlite  every aggregate this node decrypted, once per step (clients.decryption)
    anchors.sqlite      the newest signed state head seen from each hospital (clients.anchoring)

`NodeState.load_records` is the only way a run reads the hospital's data: validate against the
schema, drop identifiers, pseudonymise, generalise, keep consented records, encode.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from clients import encoding
from clients.data import HospitalData
from clients.deidentify import PSEUDONYM, deidentify
from clients.schema import SHIPPED_SYNTHETIC_SCHEMA, ExportSchema
from clients.validation import export_digest, record_validated, validate_export, validate_unless_stamped
from federation import sealing
from federation.contributions import SIGNING_KEY_FILE, FederationManifest, SigningKey
from federation.errors import ConfigError, DataError, KeyMaterialError
from federation.he_codec import HOSPITAL_CONTEXT_FILE, HospitalKey
from privacy.audit import DATA_LOAD, NODE_ENROL, NODE_INIT, REFUSAL, ROLE_HOSPITAL, AuditLog, Digest, hospital_names
from privacy.consent import RevocationRegistry
from privacy.ledger import BudgetLedger
from privacy.pseudonym import KEY_BYTES, PseudonymKey

NODE_FILE = "node.json"
VALIDATED_FILE = "export_validated"
"""In the node directory: the digest of the last export that passed a pre-flight validation."""
STAGED_PSEUDONYM_FILE = ".pseudonym.key.rekey"
"""A new pseudonym key staged by a re-key that has not completed (`clients.keys.rekey_pseudonyms`)."""
RETIRED_PSEUDONYM_FILE = "pseudonym_keys_retired"
"""The pseudonym keys a re-key replaced, sealed like the key: only to recognise old pseudonyms."""
TEST_FRACTION = 0.2


def test_split(pseudonyms: pd.Series) -> np.ndarray:
    """The local test split: a fixed hash of the pseudonym, the same in every run."""
    hashed = pd.util.hash_pandas_object(pseudonyms.astype(str), index=False).to_numpy()
    return (hashed % 1000) < int(TEST_FRACTION * 1000)


@dataclass(frozen=True)
class NodeState:
    """A hospital node's directory and what it names."""

    directory: Path
    hospital: str
    data_file: Path
    schema_file: Path
    key_file: Path

    @property
    def sealed(self) -> bool:
        """Whether the node's secrets are sealed at rest (`federation.sealing`): it then refuses a
        secret file in clear and writes none."""
        return sealing.directory_sealed(self.directory)

    @property
    def ledger_path(self) -> Path:
        """The privacy budget ledger."""
        return self.directory / "ledger.sqlite"

    @property
    def audit_path(self) -> Path:
        """The node's hash-chained audit log."""
        return self.directory / "audit.sqlite"

    def inputs_stamp(self) -> tuple[object, ...]:
        """What a load's result depends on besides the purpose: the day (consents expire) and the
        modification times of the export, the schema and the consent withdrawals. Caches of loaded
        records key on it, so an edit or a withdrawal is seen by the next load."""
        files = (self.data_file, self.schema_file, self.directory / "revocations.sqlite")
        return (date.today(), *(f.stat().st_mtime_ns if f.exists() else 0 for f in files))

    def ledger(self) -> BudgetLedger:
        """Open the budget ledger."""
        return BudgetLedger(self.ledger_path)

    def audit(self) -> AuditLog:
        """Open the audit log as this hospital's node (its alert rules see the ledger's spend)."""
        return AuditLog(self.audit_path, role=ROLE_HOSPITAL, identity=self.hospital, budget=self.budget_shares)

    def budget_shares(self) -> dict[str, tuple[float, float]]:
        """{purpose: (epsilon spent, epsilon total)} from the ledger, for the budget alert."""
        with self.ledger() as ledger:
            return {purpose: (ledger.spent(purpose), ledger.budget(purpose).epsilon_total)
                    for purpose in ledger.purposes()}

    def revocations(self) -> RevocationRegistry:
        """Consent withdrawals recorded at this node."""
        return RevocationRegistry(self.directory / "revocations.sqlite")

    def signing_key(self) -> SigningKey:
        """The node's contribution signing key."""
        return SigningKey.load(self.directory / SIGNING_KEY_FILE, require_sealed=self.sealed)

    def hospital_key(self) -> HospitalKey:
        """The node's copy of the federation's CKKS secret key."""
        return HospitalKey.load(self.key_file, require_sealed=self.sealed)

    def manifest(self) -> FederationManifest:
        """The federation manifest this hospital holds (ConfigError until enrolled)."""
        return FederationManifest.load(self.directory)

    def pseudonym_key(self) -> PseudonymKey:
        """The node's pseudonymisation key (refused while a re-key is half done: the stores may
        already hold the new key's pseudonyms)."""
        if (self.directory / STAGED_PSEUDONYM_FILE).exists():
            raise KeyMaterialError(f"{self.directory}: a pseudonym re-key was interrupted; run `fedrisk node rotate "
                                   "pseudonym` again to complete it")
        return PseudonymKey.load(self.directory / "pseudonym.key", require_sealed=self.sealed)

    def retired_pseudonym_keys(self) -> list[PseudonymKey]:
        """The pseudonym keys this node held before a re-key, oldest first. Never used to make a
        pseudonym: only to recognise a withdrawal, an erasure or an audit entry recorded under one."""
        path = self.directory / RETIRED_PSEUDONYM_FILE
        if not path.is_file():
            return []
        raw = sealing.unseal(path.read_bytes(), sealing.ROLE_PSEUDONYM_RETIRED, path, require_sealed=self.sealed)
        return [PseudonymKey(raw[i:i + KEY_BYTES]) for i in range(0, len(raw), KEY_BYTES)]

    def record_keys(self) -> list[str]:
        """The text form of every record key in the export, in file order (the form pseudonyms hash):
        what `node revoke`, `erase` and an incident's notification list look patients up by."""
        column = self.schema().record_key
        try:
            if self.data_file.suffix.lower() == ".parquet":
                values = pd.read_parquet(self.data_file, columns=[column])[column]
            else:
                values = pd.read_csv(self.data_file, usecols=[column], dtype=str, encoding="utf-8")[column]
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"cannot read column {column!r} of {self.data_file}: {type(exc).__name__}") from None
        return [str(v).strip() for v in values.dropna()]

    def schema(self) -> ExportSchema:
        """The export schema the hospital declared."""
        return ExportSchema.load(self.schema_file)

    def check_export(self) -> None:
        """Validate the export against the schema, unless these exact bytes passed before (a
        simulation's pre-flight over hundreds of nodes then costs a hash per export; loading
        records always validates)."""
        validate_unless_stamped(self.data_file, self.schema_file, self.directory / VALIDATED_FILE)

    @classmethod
    def init(cls, directory: Path, *, hospital: str, data_file: Path, key_file: Path,
             budgets: dict[str, tuple[float, float]], schema_file: Path | None = None) -> "NodeState":
        """Create a node directory: check the schema and the export against it, create the
        pseudonym key, the ledger with its budgets and the audit log. Nothing is written
        unless every check passes."""
        directory = Path(directory)
        if (directory / NODE_FILE).exists():
            raise ConfigError(f"{directory} is already a fedrisk node ({NODE_FILE} exists)")
        if not hospital or not hospital.replace("_", "").replace("-", "").isalnum() or len(hospital) > 64:
            raise ConfigError(f"hospital name must be 1-64 letters, digits, '-' or '_', got {hospital[:80]!r}")
        if not budgets:
            raise ConfigError("a node needs at least one purpose budget (--budget PURPOSE=EPSILON)")
        schema_file = Path(schema_file or SHIPPED_SYNTHETIC_SCHEMA).resolve()
        schema = ExportSchema.load(schema_file)
        digest = export_digest(Path(data_file), schema_file)
        validate_export(Path(data_file), schema)  # nothing is written before the export passes
        if not Path(key_file).is_file():
            raise ConfigError(f"hospital CKKS context not found: {key_file}")
        HospitalKey.load(Path(key_file))
        sealed = sealing.at_rest_key() is not None
        state = cls(directory.resolve(), hospital, Path(data_file).resolve(), schema_file,
                    directory.resolve() / HOSPITAL_CONTEXT_FILE)
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        if sealed:
            sealing.mark_sealed(directory)
        plain = sealing.unseal(Path(key_file).read_bytes(), sealing.ROLE_CKKS, Path(key_file))
        sealing.write_secret_file(state.key_file, sealing.seal_for_disk(plain, sealing.ROLE_CKKS, state.key_file),
                                  exclusive=True)
        PseudonymKey.create(directory / "pseudonym.key")
        SigningKey.create(directory / SIGNING_KEY_FILE)
        with state.ledger() as ledger:
            for purpose, (epsilon, delta) in budgets.items():
                ledger.set_budget(purpose, epsilon, delta)
        state.revocations()
        record_validated(directory / VALIDATED_FILE, state.data_file, schema_file, digest)  # pre-flight: no re-check
        state.audit().append(NODE_INIT, details={"purposes": sorted(budgets), "sealed": sealed})
        (directory / NODE_FILE).write_text(json.dumps({
            "hospital": hospital, "data_file": _stored(state.data_file, state.directory),
            "schema_file": _stored(schema_file, state.directory), "key_file": HOSPITAL_CONTEXT_FILE}, indent=2))
        return state

    @staticmethod
    def discover(nodes_dir: Path) -> list["NodeState"]:
        """Every node directory directly under `nodes_dir`, in name order."""
        return [NodeState.load(d) for d in sorted(p for p in Path(nodes_dir).glob("*") if (p / NODE_FILE).is_file())]

    @classmethod
    def load(cls, directory: Path, *, to_seal: bool = False) -> "NodeState":
        """Open an initialised node directory. A process given an at-rest key refuses a node that
        is not sealed (`federation.sealing.check_keyed`), unless it opens it `to_seal` it."""
        directory = Path(directory)
        try:
            raw = json.loads((directory / NODE_FILE).read_text())
            home = directory.resolve()
            # the key is always the node's own copy: found beside node.json wherever the directory moved
            state = cls(home, str(raw["hospital"]), home / Path(raw["data_file"]), home / Path(raw["schema_file"]),
                        home / HOSPITAL_CONTEXT_FILE)
        except FileNotFoundError:
            raise ConfigError(f"{directory} is not a fedrisk node; run `fedrisk node init` first") from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{directory / NODE_FILE} is damaged") from None
        if not to_seal:
            sealing.check_keyed(home, f"fedrisk node seal --dir {directory}")
        return state

    def usable(self, purpose: str, today: date | None = None) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
        """Validate, de-identify and apply consent: the de-identified table (all rows), the
        mask of rows `purpose` may use, and exclusion counts by reason. Reads, never writes."""
        schema = self.schema()
        validated = validate_export(self.data_file, schema)
        clean = deidentify(validated, schema, self.pseudonym_key(), purpose=purpose)
        revoked = self.revocations().revoked(purpose, as_of=datetime.now(timezone.utc))
        current = clean.table[PSEUDONYM]
        retired_keys = self.retired_pseudonym_keys()
        if retired_keys and revoked - set(current):  # rows of no current pseudonym: some may predate a re-key
            for retired in retired_keys:
                old = retired.pseudonymise(validated.table[schema.record_key])
                revoked = revoked | set(current[old.isin(revoked).to_numpy()])
        decision = schema.consent_policy().decide(validated.table, purpose, today=today or date.today(),
                                                  revoked=revoked, pseudonyms=clean.table[PSEUDONYM])
        return clean.table, np.asarray(decision.mask, dtype=bool), decision.excluded.as_dict()

    def load_records(self, purpose: str, today: date | None = None, features: str = "standard") -> HospitalData:
        """The records a run with `purpose` may use, encoded for the model: through the
        standard 40-input contract, or (`features="schema"`) from the schema. Audited. Refuses a
        purpose the schema does not release the label for (a restricted class, as for any column)."""
        schema = self.schema()
        if not schema.releases_label(purpose):
            self.audit().append(REFUSAL, purpose=purpose, details={"reason": "label not released for purpose"})
            raise DataError(f"{self.data_file.name}: the label column's class "
                            f"({schema.column(schema.label).sensitivity}) is restricted and the schema does not "
                            f"release it for purpose {purpose!r}")
        clean, mask, excluded = self.usable(purpose, today)
        table = clean.loc[mask].reset_index(drop=True)
        if table.empty:
            self.audit().append(REFUSAL, purpose=purpose, details={"reason": "no consented records",
                                                                      "excluded": excluded})
            raise ConfigError(f"{self.data_file}: no record may be used for purpose {purpose!r} "
                              f"(excluded: {excluded})")
        is_test = test_split(table[PSEUDONYM])
        x, y = encoding.model_inputs(table, schema, purpose, features)
        self.audit().append(DATA_LOAD, purpose=purpose, details={
            "records": int(len(clean)), "used": int(len(table)), "excluded": excluded})
        return HospitalData(name=self.hospital, train_x=x[~is_test], train_y=y[~is_test],
                            test_x=x[is_test], test_y=y[is_test], excluded=excluded)


def _stored(path: Path, directory: Path) -> str:
    """A path as node.json records it: relative to the node directory when inside it (the node can
    be moved or restored elsewhere), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(directory)) if path.is_relative_to(directory) else str(path)


def enrol(states: list[NodeState]) -> FederationManifest:
    """Write one federation manifest, listing every node's public signing key, into each node
    directory (enrolment of hospitals whose directories are all at hand, as in a simulation; on
    real machines each hospital installs the manifest it receives with `fedrisk node enrol`).
    A node directory made before nodes had signing keys gets its key here."""
    if len({s.hospital for s in states}) != len(states):
        raise ConfigError("two node directories name the same hospital; a federation needs distinct hospitals")
    keys = {}
    key_ids = set()
    for state in states:
        path = state.directory / SIGNING_KEY_FILE
        keys[state.hospital] = (state.signing_key() if path.exists() else SigningKey.create(path)).public_hex
        key_ids.add(state.hospital_key().key_id)
    if len(key_ids) != 1:
        raise ConfigError("the node directories hold different CKKS keys; they cannot form one federation")
    manifest = FederationManifest(key_ids.pop(), keys)
    for state in states:
        manifest.save(state.directory)
        state.audit().append(NODE_ENROL, details={"federation": Digest(manifest.federation),
                                                    "hospitals": hospital_names(keys)})
    return manifest
