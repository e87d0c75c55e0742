"""`fedrisk node ...`: a hospital's node directory, its budget, consent, policy, enrolment and
rollback recovery (grants, installed releases and the scoring endpoint are in `cli.scoring`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from federation.config import RunConfig
from federation.errors import ConfigError
from privacy.audit import CONSENT_RESTORE, CONSENT_REVOKE, NODE_ENROL, hospital_names

NODE_DIR_HELP = "the node's state directory (made by `fedrisk node init --dir`)"


def _budgets(values: list[str], delta: float) -> dict[str, tuple[float, float]]:
    budgets: dict[str, tuple[float, float]] = {}
    for value in values:
        purpose, _, epsilon = value.partition("=")
        try:
            budgets[purpose.strip()] = (float(epsilon), delta)
        except ValueError:
            raise ConfigError(f"--budget takes PURPOSE=EPSILON, got {value!r}") from None
    return budgets


def _cmd_node_init(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState

    state = NodeState.init(Path(args.dir), hospital=args.hospital, data_file=Path(args.data),
                           key_file=Path(args.key), budgets=_budgets(args.budget, args.delta),
                           schema_file=Path(args.schema) if args.schema else None)
    print(f"node {state.hospital} initialised in {state.directory}")
    print(f"  export {state.data_file} validates against {state.schema_file}")
    with state.ledger() as ledger:
        for purpose in _budgets(args.budget, args.delta):
            budget = ledger.budget(purpose)
            print(f"  budget {purpose}: epsilon {budget.epsilon_total:g} at delta {budget.delta:g}")
    return 0


def _cmd_node_provision(args: argparse.Namespace) -> int:
    from engines.provisioning import provision_nodes

    nodes = provision_nodes(Path(args.data), Path(args.key), Path(args.out),
                            purposes=_budgets(args.budget, args.delta),
                            schema_file=Path(args.schema) if args.schema else None)
    for state in nodes:
        print(f"node {state.hospital}: {state.directory}")
    return 0


def _check_config(args: argparse.Namespace) -> RunConfig:
    from federation.config import RunConfig

    defaults = RunConfig()
    return RunConfig(purpose=args.purpose or defaults.purpose, target_epsilon=args.epsilon, delta=args.delta,
                     rounds=args.rounds, model=args.model, sample_rate=args.sample_rate, features=args.features,
                     n_features=1 if args.features == "schema" else 0, min_contributors=args.min_contributors)


def _cmd_node_readiness(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState
    from clients.readiness import check_readiness

    state = NodeState.load(Path(args.dir))
    config = _check_config(args)
    report = check_readiness(state, config)
    print(f"{state.hospital}: a {config.features}-feature {config.model} run for {config.purpose}, epsilon "
          f"{config.target_epsilon:g} at delta {config.delta:g}, {config.rounds} rounds, sample rate {config.sample_rate:g}")
    if report.records:
        print(f"  records: {report.records:,} in {state.data_file.name}; {report.usable:,} usable for {config.purpose} "
              f"({report.train_records:,} to train on, {report.test_records:,} held out)")
        excluded = {k: v for k, v in report.excluded.items() if v}
        print(f"  excluded: {', '.join(f'{v:,} {k}' for k, v in excluded.items()) or 'none'}")
    if report.inputs:
        print(f"  model inputs: {len(report.inputs)} ({', '.join(report.inputs)})")
    for column, why in report.withheld.items():
        print(f"  not an input: {column} ({why})")
    if report.epsilon_after is not None:
        print(f"  budget {config.purpose}: spent {report.epsilon_spent:.3f} of {report.budget:g}; after this run "
              f"{report.epsilon_after:.3f} (privacy loss composes: a run adds at most its own epsilon, "
              "often less, to what is spent)")
    for warning in report.warnings:
        print(f"  WARNING: {warning}")
    for problem in report.problems:
        print(f"  PROBLEM: {problem}")
    if report.problems:
        raise ConfigError(f"{state.hospital}: {len(report.problems)} problem(s) a run would meet; "
                          "fix them before training (listed above)")
    print("  ready: a run with these settings passes every check this node makes before training")
    return 0


def _cmd_node_check(args: argparse.Namespace) -> int:
    from clients.schema import SHIPPED_SYNTHETIC_SCHEMA, ExportSchema
    from clients.validation import validate_export

    if args.dir:
        if args.file or args.schema:
            raise ConfigError("give either --dir NODE (checks the node's own export and schema) or FILE [--schema]")
        return _cmd_node_readiness(args)
    if not args.file:
        raise ConfigError("give an export FILE to validate, or --dir NODE to check a node for a run")
    schema = ExportSchema.load(Path(args.schema) if args.schema else SHIPPED_SYNTHETIC_SCHEMA)
    validated = validate_export(Path(args.file), schema)
    print(f"{args.file}: {len(validated.table):,} records, valid against {schema.source}")
    for role in ("record-key", "direct-identifier", "quasi-identifier", "feature", "label", "consent"):
        columns = schema.columns_by_role(role)
        if columns:
            print(f"  {role}: {', '.join(columns)}")
    for purpose in schema.consent_policy().purposes:
        print(f"  trains on for {purpose}: {len(schema.training_columns(purpose))} columns; "
              f"excluded as sensitive: {', '.join(schema.excluded_columns(purpose)) or 'none'}")
    return 0


def _cmd_node_schema_init(args: argparse.Namespace) -> int:
    from clients.schema_draft import write_draft

    schema = write_draft([Path(p) for p in args.data], Path(args.out), label=args.label,
                         record_key=args.record_key, purpose=args.purpose)
    roles: dict[str, int] = {}
    for column in schema.columns:
        roles[column.role] = roles.get(column.role, 0) + 1
    print(f"draft schema written to {args.out}: {len(schema.columns)} columns "
          f"({', '.join(f'{n} {r}' for r, n in roles.items())}); consent purposes: "
          f"{', '.join(schema.consent_policy().purposes) or 'none'}")
    print("review it: every class, every REVIEW bound (observed here: replace with clinical or domain bounds "
          "before sharing), the categories; then `fedrisk node check FILE --schema` it")
    return 0


def _cmd_node_budget(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState

    state = NodeState.load(Path(args.dir))
    with state.ledger() as ledger:
        purposes = [args.purpose] if args.purpose else ledger.purposes()
        for purpose in purposes:
            budget = ledger.budget(purpose)
            spent = ledger.spent(purpose)
            print(f"{state.hospital} / {purpose}: spent epsilon {spent:.4f} of {budget.epsilon_total:g} "
                  f"(left {ledger.remaining(purpose):.4f}) at delta {budget.delta:g}")
            print("  'spent' is every charge composed (PLD accounting), which is less than their sum: a run of "
                  "epsilon e adds at most e, often less, so a run larger than 'left' may still fit. "
                  "`fedrisk node check --dir DIR --epsilon E` says what a run would bring it to.")
            for charge in ledger.history(purpose):
                print(f"  {charge.charged_at}  {charge.kind:<10} run {charge.run_id} {charge.slot}  "
                      f"{charge.mechanism.describe()}  -> epsilon {charge.epsilon_after:.4f}")
    return 0


def _consent_target(args: argparse.Namespace) -> tuple[object, str]:
    """The node and the pseudonym of --record-key, for a --purpose a consent column of the schema
    covers and a record key the export holds (neither echoed back: errors get pasted into tickets)."""
    import pandas as pd

    from clients.node_state import NodeState

    state = NodeState.load(Path(args.dir))
    schema = state.schema()
    purposes = sorted({c.purpose for c in schema.columns if c.role == "consent" and c.purpose})
    if args.purpose not in purposes:
        raise ConfigError(f"--purpose {args.purpose!r}: no consent column of this node's schema covers it "
                          f"(purposes: {', '.join(purposes)})")
    if str(args.record_key).strip() not in set(state.record_keys()):
        raise ConfigError(f"--record-key: no record of {state.data_file.name} has that record key "
                          f"(column {schema.record_key!r}); nothing was changed")
    from clients.keys import adopt_record

    adopt_record(state, str(args.record_key).strip())  # rows kept under a retired pseudonym key, if any
    return state, state.pseudonym_key().pseudonymise(pd.Series([str(args.record_key).strip()])).iloc[0]


def _cmd_node_revoke(args: argparse.Namespace) -> int:
    from privacy.audit import Digest

    state, pseudonym = _consent_target(args)
    if not state.revocations().revoke(pseudonym, args.purpose):
        print(f"consent for {args.purpose} was already withdrawn for this record; nothing changed")
        return 0
    state.audit().append(CONSENT_REVOKE, purpose=args.purpose, details={"pseudonym": Digest(pseudonym)})
    print(f"consent for {args.purpose} withdrawn for one record: excluded from the next run or query, "
          "and from applicant scoring at once (undo a mistaken withdrawal: fedrisk node restore)")
    return 0


def _cmd_node_restore(args: argparse.Namespace) -> int:
    from privacy.audit import AuditIdentifierError, Digest

    reason = " ".join(str(args.reason or "").split())
    if not reason:
        raise ConfigError("--reason must say why the withdrawal is undone (recorded in the audit log)")
    state, pseudonym = _consent_target(args)
    state.revocations().restore(pseudonym, args.purpose)
    try:
        state.audit().append(CONSENT_RESTORE, purpose=args.purpose,
                             details={"pseudonym": Digest(pseudonym), "reason": reason})
    except AuditIdentifierError:  # the restore stands; a reason naming a person is not written to the log
        state.audit().append(CONSENT_RESTORE, purpose=args.purpose,
                             details={"pseudonym": Digest(pseudonym), "reason": "withheld by the identifier filter"})
    print(f"withdrawal of consent for {args.purpose} undone for one record: usable again from the next run, query "
          "or score (the withdrawal and its undoing both stay on record)")
    return 0


def _cmd_node_revocations(args: argparse.Namespace) -> int:
    import pandas as pd

    from clients.node_state import NodeState
    from privacy.consent import REVOKED

    state = NodeState.load(Path(args.dir))
    wanted = None
    if args.record_key:
        wanted = state.pseudonym_key().pseudonymise(pd.Series([str(args.record_key).strip()])).iloc[0]
    registry = state.revocations()
    rows = [(when, p, purpose, action) for when, p, purpose, action in registry.history()
            if (wanted is None or p == wanted) and (not args.purpose or purpose == args.purpose)]
    standing = sum(len({p for p in registry.revoked(purpose) if wanted is None or p == wanted})
                   for purpose in sorted({purpose for _, _, purpose, _ in rows}))
    print(f"{state.hospital}: {standing} consent withdrawal(s) in force; {len(rows)} event(s)")
    for when, pseudonym, purpose, action in rows:
        print(f"  {when.replace('T', ' ')} UTC  {'withdrawn' if action == REVOKED else 'restored':<9}  "
              f"{purpose:<24} pseudonym {pseudonym[:12]}…")
    return 0


def _cmd_node_usage(args: argparse.Namespace) -> int:
    """A patient's access request: every use of their record at this node, from its own records
    (clients.usage). The record key is never echoed; the only write is the usage.report entry."""
    import sys

    from clients.node_state import NodeState
    from clients.usage import UncoveredPurpose, UnknownRecord, record_answer, report_lines, usage_record, write_csv

    state = NodeState.load(Path(args.dir))
    try:
        report = usage_record(state, args.record_key, purpose=args.purpose)
    except UnknownRecord as exc:
        raise ConfigError(f"--record-key: {exc}") from None
    except UncoveredPurpose as exc:
        raise ConfigError(f"--purpose: {exc}") from None
    target = Path(args.csv) if args.csv and args.csv != "-" else None
    if target is not None and (target.is_dir() or not target.parent.is_dir()):
        raise ConfigError(f"--csv {target}: not a file in an existing directory; nothing was written")
    record_answer(state, report, output="csv" if args.csv else "text")
    if args.csv == "-":
        write_csv(report, sys.stdout)
        return 0
    for line in report_lines(report):
        print(line)
    if target is not None:
        try:
            with open(target, "w", newline="", encoding="utf-8") as handle:
                write_csv(report, handle)
        except OSError as exc:
            raise ConfigError(f"--csv {target}: cannot be written ({exc.strerror}); the answer above stands") from None
        print(f"  the same {len(report.rows)} row(s) as CSV: {target}")
    return 0


# --- fedrisk node policy show|set: the hospital's own policy (clients/policy.py) ---------------
def _cmd_node_policy_show(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState
    from clients.policy import NodePolicy

    state = NodeState.load(Path(args.dir))
    print(json.dumps(NodePolicy.load(state.directory).to_dict(), indent=2))
    return 0


def _cmd_node_policy_set(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState
    from clients.policy import POLICY_FILE, NodePolicy, parse_assignments, write_atomically
    from privacy.audit import POLICY_SET, Digest

    state = NodeState.load(Path(args.dir))
    before = NodePolicy.load(state.directory)
    after = before.with_changes(**parse_assignments(args.assignments))
    old = before.to_dict()
    changed = {k: v for k, v in after.to_dict().items() if old[k] != v}
    path = state.directory / POLICY_FILE
    previous = path.read_text(encoding="utf-8") if path.exists() else None
    after.save(state.directory)
    try:  # the audit entry and the file change together: an entry the log refuses undoes the write
        details = {k: Digest(v) if k == "federation" and v else v for k, v in changed.items()}
        state.audit().append(POLICY_SET, details=details)
    except BaseException:
        if previous is None:
            path.unlink(missing_ok=True)
        else:
            write_atomically(path, previous)
        raise
    shown = {k: ",".join(v) if isinstance(v, list) else v for k, v in changed.items()}
    print(f"{path}: " + (", ".join(f"{k} = {v}" for k, v in shown.items()) or "no field changed"))
    return 0


def _add_node_policy(node: argparse._SubParsersAction) -> None:
    policy = node.add_parser("policy", help="this hospital's policy: the last word on what its node does")
    commands = policy.add_subparsers(dest="policy_command", required=True)
    show = commands.add_parser("show", help="print the policy in force (defaults filled in); writes nothing")
    show.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    show.set_defaults(handler=_cmd_node_policy_show)
    change = commands.add_parser("set", help="change policy fields (validated; audited as policy.set)")
    change.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    change.add_argument("assignments", nargs="+", metavar="KEY=VALUE",
                        help="e.g. min_contributors=3 max_epsilon_per_run=1.0 "
                             "purposes=credit-risk-research,cohort-research")
    change.set_defaults(handler=_cmd_node_policy_set)


# --- fedrisk node enrol / anchor: the federation manifest and the rollback recovery ------------
def _cmd_node_enrol(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState, enrol
    from federation.contributions import FederationManifest

    states = [NodeState.load(Path(d)) for d in args.dirs]
    if args.install:
        source = Path(args.install)
        manifest = FederationManifest.load(source.parent) if source.name == "federation_manifest.json" else None
        if manifest is None:
            raise ConfigError(f"--install takes a federation_manifest.json file, got {source}")
        for state in states:
            if manifest.hospitals.get(state.hospital) != state.signing_key().public_hex:
                raise ConfigError(f"{source} does not list {state.hospital} with this node's signing key")
            manifest.save(state.directory)
            state.audit().append(NODE_ENROL, details={"hospitals": hospital_names(manifest.hospitals)})
        print(f"installed the manifest of {len(manifest.hospitals)} hospital(s) in {len(states)} node(s)")
        return 0
    manifest = enrol(states)
    print(f"enrolled {', '.join(sorted(manifest.hospitals))} in one federation (manifest in each node directory)")
    return 0


def _cmd_node_signing_key(args: argparse.Namespace) -> int:
    from clients.node_state import NodeState

    state = NodeState.load(Path(args.dir))
    print(json.dumps({"hospital": state.hospital, "signing_key": state.signing_key().public_hex}))
    return 0


def _cmd_node_seal_key(args: argparse.Namespace) -> int:
    from federation.sealing import KEY_FILE_ENV, create_key_file

    path = create_key_file(Path(args.out), "node at-rest key")
    print(f"node at-rest key (mode 0600): {path}; keep it off the node's disk and its backups, and give it to the "
          f"node's processes as ${KEY_FILE_ENV}={path}")
    return 0


def _cmd_node_seal(args: argparse.Namespace) -> int:
    from clients.keys import seal_node
    from clients.node_state import NodeState

    state = NodeState.load(Path(args.dir), to_seal=True)
    sealed = seal_node(state)
    print(f"{state.hospital}: sealed at rest (secrets AES-256-GCM, stores SQLCipher AES-256): "
          f"{', '.join(sealed) or 'all were already sealed'}; the node now needs its at-rest key to start, and "
          "refuses a secret file or a store in clear")
    return 0


def _cmd_node_rotate_signing(args: argparse.Namespace) -> int:
    from clients.keys import rotate_signing_key
    from clients.node_state import NodeState

    state = NodeState.load(Path(args.dir))
    old, new = rotate_signing_key(state, args.reason)
    print(json.dumps({"hospital": state.hospital, "signing_key": new, "retired": old}))
    print(f"{state.hospital}: new contribution signing key; the old one is destroyed. Until the federation re-enrols "
          "this node (`fedrisk node enrol`), the other hospitals refuse its contributions", file=sys.stderr)
    return 0


def _cmd_node_rotate_ckks(args: argparse.Namespace) -> int:
    from clients.keys import install_ckks_key
    from clients.node_state import NodeState

    state = NodeState.load(Path(args.dir))
    old, new = install_ckks_key(state, Path(args.key_file), args.reason)
    print(f"{state.hospital}: CKKS key {new} installed; key {old} destroyed (ciphertexts and checkpoints made under it "
          "can no longer be decrypted here). Re-enrol the federation (`fedrisk node enrol`) once every hospital has "
          "the new key")
    return 0


def _cmd_node_rotate_pseudonym(args: argparse.Namespace) -> int:
    from clients.keys import rekey_pseudonyms
    from clients.node_state import NodeState

    state = NodeState.load(Path(args.dir))
    remapped = rekey_pseudonyms(state, args.reason)
    print(f"{state.hospital}: new pseudonymisation key; re-mapped {remapped.get('revocations', 0)} withdrawal(s), "
          f"{remapped.get('consent_events', 0)} consent event(s), {remapped.get('erasures', 0)} erasure(s) and "
          f"{remapped.get('grants', 0)} grant(s). The local test split is redrawn")
    return 0


def _cmd_node_rotate_at_rest(args: argparse.Namespace) -> int:
    from clients.keys import rotate_at_rest_key
    from clients.node_state import NodeState

    state = NodeState.load(Path(args.dir))
    old, new = rotate_at_rest_key(state, Path(args.new_key_file), args.reason)
    print(f"{state.hospital}: secrets and stores re-encrypted under at-rest key {new} (was {old}). Set "
          f"FEDRISK_NODE_KEY_FILE={args.new_key_file} for the node's processes now, then destroy the old key")
    return 0


def _add_node_keys(node: argparse._SubParsersAction) -> None:
    seal_key = node.add_parser("seal-key", help="make a node at-rest key (AES-256; keep it off the node's disk)")
    seal_key.add_argument("--out", required=True, help="new key file (mode 0600)")
    seal_key.set_defaults(handler=_cmd_node_seal_key)
    seal = node.add_parser("seal", help="seal the node's secrets and encrypt its stores at rest under "
                                        "$FEDRISK_NODE_KEY_FILE")
    seal.add_argument("--dir", required=True, help="node directory")
    seal.set_defaults(handler=_cmd_node_seal)
    rotate = node.add_parser("rotate", help="rotate a node key: contribution signing key, pseudonym key, CKKS key or "
                             "at-rest key"
                             ).add_subparsers(dest="rotate_command", required=True)
    signing = rotate.add_parser("signing-key", help="new contribution signing key (the federation re-enrols)")
    signing.add_argument("--dir", required=True, help="node directory")
    signing.add_argument("--reason", required=True, help="why (audited)")
    signing.set_defaults(handler=_cmd_node_rotate_signing)
    pseudonym = rotate.add_parser("pseudonym", help="new pseudonymisation key; consents, erasures and grants re-mapped")
    pseudonym.add_argument("--dir", required=True, help="node directory")
    pseudonym.add_argument("--reason", required=True, help="why (audited)")
    pseudonym.set_defaults(handler=_cmd_node_rotate_pseudonym)
    ckks = rotate.add_parser("ckks", help="install the federation's new CKKS key; the old one is destroyed")
    ckks.add_argument("--dir", required=True, help="node directory")
    ckks.add_argument("--key-file", required=True, help="the new hospital.ckks from `fedrisk keys init`")
    ckks.add_argument("--reason", required=True, help="why (audited)")
    ckks.set_defaults(handler=_cmd_node_rotate_ckks)
    at_rest = rotate.add_parser("at-rest", help="re-encrypt the sealed node under a new at-rest key (the current "
                                                "one in $FEDRISK_NODE_KEY_FILE)")
    at_rest.add_argument("--dir", required=True, help="node directory")
    at_rest.add_argument("--new-key-file", required=True, help="the new key, from `fedrisk node seal-key --out`")
    at_rest.add_argument("--reason", required=True, help="why (audited)")
    at_rest.set_defaults(handler=_cmd_node_rotate_at_rest)


def _cmd_node_anchor_accept(args: argparse.Namespace) -> int:
    from clients.anchoring import accept_rollback
    from clients.node_state import NodeState

    head = accept_rollback(NodeState.load(Path(args.dir)))
    print(f"recovery recorded (epoch {head.epoch}); every purpose's remaining budget is closed at what the node "
          "has recorded as spent: re-apply lost consent withdrawals, then raise budgets deliberately if you must")
    return 0


def _add_node_federation(node: argparse._SubParsersAction) -> None:
    enrol = node.add_parser("enrol", help="write the federation manifest (hospitals' signing keys) into node dirs")
    enrol.add_argument("dirs", nargs="+", metavar="NODE_DIR",
                       help="node directories to enrol together (all at hand, as in a simulation)")
    enrol.add_argument("--install", metavar="MANIFEST",
                       help="instead, install this federation_manifest.json received from the federation")
    enrol.set_defaults(handler=_cmd_node_enrol)
    key = node.add_parser("signing-key", help="print this node's public signing key, for enrolment")
    key.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    key.set_defaults(handler=_cmd_node_signing_key)
    anchor = node.add_parser("anchor", help="recover a node found behind its anchored ledger head")
    anchor_commands = anchor.add_subparsers(dest="anchor_command", required=True)
    accept = anchor_commands.add_parser("accept", help="accept the rollback: new epoch, budgets closed, audited")
    accept.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    accept.set_defaults(handler=_cmd_node_anchor_accept)
    _add_node_keys(node)


def _cmd_node_erase(args: argparse.Namespace) -> int:
    import getpass

    from clients.erasure import erase_patient
    from clients.node_state import NodeState

    try:
        by = args.by or getpass.getuser()
    except (KeyError, OSError):
        by = "unknown"
    from clients.keys import adopt_record

    state = NodeState.load(Path(args.dir))
    if str(args.record_key).strip() in set(state.record_keys()):
        adopt_record(state, str(args.record_key).strip())  # its grants kept under a retired key are revoked too
    report = erase_patient(state, args.record_key, reason=args.reason, by=by)
    print("\n".join(report.lines()))
    return 0


def _cmd_node_purge(args: argparse.Namespace) -> int:
    from clients.erasure import purge_node
    from clients.node_state import NodeState
    from clients.policy import NodePolicy

    state = NodeState.load(Path(args.dir))
    days = NodePolicy.load(state.directory).grant_retention_days
    count = purge_node(state, dry_run=args.dry_run)
    verb = "would be" if args.dry_run else "were"
    print(f"{state.hospital}: {count} grant(s) that ended over {days} days ago (policy grant_retention_days) {verb} "
          "unlinked from their patients; the grants' ids, banks, dates and uses stay for the audit trail")
    return 0


def _cmd_backup_key(args: argparse.Namespace) -> int:
    from clients.backup import create_key

    print(f"backup key (mode 0600): {create_key(Path(args.out))}; keep it apart from the backups: without it they "
          "cannot be opened, with it they can")
    return 0


def _cmd_backup_create(args: argparse.Namespace) -> int:
    from clients.backup import backup_node, load_key

    info = backup_node(Path(args.dir), Path(args.out), load_key(Path(args.key_file) if args.key_file else None))
    print(f"{info.hospital}: {info.files} files backed up, encrypted (AES-256-GCM), to {args.out} at {info.created} "
          f"({info.audit_entries} audit entries)")
    return 0


def _cmd_backup_restore(args: argparse.Namespace) -> int:
    from clients.backup import load_key, restore_node

    info = restore_node(Path(args.source), Path(args.dir), load_key(Path(args.key_file) if args.key_file else None))
    print(f"{info.hospital}: {info.files} files restored to {args.dir} from the backup of {info.created}. If this "
          "node has done anything since, it is now behind the head the other hospitals anchored and refuses to run "
          "until `fedrisk node anchor accept --dir ...` (which closes every remaining budget)")
    return 0


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `fedrisk node` and its sub-commands; returns its sub-parsers (for `cli.scoring`)."""
    node = commands.add_parser("node", help="hospital node: init, check, budget, consent").add_subparsers(
        dest="node_command", required=True)
    node_init = node.add_parser("init", help="create a node directory: schema check, keys, ledger, audit log")
    node_init.add_argument("--dir", required=True, help="the node's state directory (back it up)")
    node_init.add_argument("--hospital", required=True, help="this hospital's name in the federation")
    node_init.add_argument("--data", required=True, help="the hospital's export (Parquet or CSV)")
    node_init.add_argument("--schema", help="export schema YAML (default: the synthetic export's)")
    node_init.add_argument("--key-file", "--key", dest="key", required=True,
                           help="the federation's hospital CKKS context (hospital.ckks from `fedrisk keys init`)")
    node_init.add_argument("--budget", action="append", default=[], metavar="PURPOSE=EPSILON",
                           help="total epsilon for a purpose (repeatable)")
    node_init.add_argument("--delta", type=float, default=1e-5, help="delta of every budget (default 1e-5)")
    node_init.set_defaults(handler=_cmd_node_init)
    node_provision = node.add_parser("provision", help="simulation: one node per hospital file in a directory")
    node_provision.add_argument("--data", required=True, help="directory of hospital_*.parquet|csv files")
    node_provision.add_argument("--key-file", "--key", dest="key", required=True,
                                help="the federation's hospital CKKS context (hospital.ckks from `fedrisk keys init`)")
    node_provision.add_argument("--out", required=True, help="directory to hold the node directories")
    node_provision.add_argument("--schema", help="export schema YAML (default: the synthetic export's)")
    node_provision.add_argument("--budget", action="append", default=[], metavar="PURPOSE=EPSILON",
                                help="total epsilon for a purpose at every node (repeatable)")
    node_provision.add_argument("--delta", type=float, default=1e-5, help="delta of every budget (default 1e-5)")
    node_provision.set_defaults(handler=_cmd_node_provision)
    node_check = node.add_parser("check", help="validate an export against its schema, or (--dir) make every check "
                                 "a run would make at a node; writes nothing")
    node_check.add_argument("file", nargs="?", help="the hospital's export (Parquet or CSV)")
    node_check.add_argument("--schema", help="export schema YAML (default: the synthetic export's)")
    node_check.add_argument("--dir", help="a node directory: check it for a run with the settings below instead")
    defaults = RunConfig()
    node_check.add_argument("--purpose", help=f"the run's purpose (default {defaults.purpose})")
    node_check.add_argument("--epsilon", type=float, default=defaults.target_epsilon,
                            help=f"the run's target epsilon (default {defaults.target_epsilon:g})")
    node_check.add_argument("--delta", type=float, default=defaults.delta, help=f"the run's delta (default {defaults.delta:g})")
    node_check.add_argument("--rounds", type=int, default=defaults.rounds, help=f"rounds (default {defaults.rounds})")
    node_check.add_argument("--model", default=defaults.model, help=f"model (default {defaults.model})")
    node_check.add_argument("--sample-rate", type=float, default=defaults.sample_rate,
                            help=f"DP-SGD sampling rate q (default {defaults.sample_rate:g})")
    node_check.add_argument("--features", choices=("standard", "schema"), default=defaults.features,
                            help="the standard 40-input contract or the schema's own inputs (default standard)")
    node_check.add_argument("--min-contributors", type=int, default=2, help="the run's min-contributors (default 2)")
    node_check.set_defaults(handler=_cmd_node_check)
    node_budget = node.add_parser("budget", help="privacy budget: spent, left, history")
    node_budget.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    node_budget.add_argument("--purpose", help="show one purpose only (default: every purpose)")
    node_budget.set_defaults(handler=_cmd_node_budget)
    node_revoke = node.add_parser("revoke", help="withdraw a patient's consent for a purpose")
    node_revoke.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    node_revoke.add_argument("--record-key", required=True, help="the patient's record key in the export")
    node_revoke.add_argument("--purpose", required=True, help="the purpose the consent is withdrawn for")
    node_revoke.set_defaults(handler=_cmd_node_revoke)
    node_restore = node.add_parser("restore", help="undo a withdrawal of consent (recorded by mistake, or consent "
                                   "given again); both stay on record and in the audit log")
    node_restore.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    node_restore.add_argument("--record-key", required=True, help="the patient's record key in the export")
    node_restore.add_argument("--purpose", required=True, help="the purpose whose withdrawal is undone")
    node_restore.add_argument("--reason", required=True, help="why, in one line (audited; no names)")
    node_restore.set_defaults(handler=_cmd_node_restore)
    node_revocations = node.add_parser("revocations", help="every consent withdrawal recorded at this node "
                                       "(pseudonym prefix, purpose, when); writes nothing")
    node_revocations.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    node_revocations.add_argument("--record-key", help="only this patient's withdrawals (looked up by pseudonym)")
    node_revocations.add_argument("--purpose", help="only withdrawals for this purpose")
    node_revocations.set_defaults(handler=_cmd_node_revocations)
    node_usage = node.add_parser("usage", help="a patient's access request: every run, query, evaluation, audit and "
                                 "scoring that used their record, when, for which purpose, at what epsilon; from this "
                                 "node's own records (writes only its usage.report audit entry)")
    node_usage.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    node_usage.add_argument("--record-key", required=True, help="the patient's record key in the export (looked up by "
                            "pseudonym; never printed or logged)")
    node_usage.add_argument("--purpose", help="only uses for this purpose (default: every purpose)")
    node_usage.add_argument("--csv", metavar="FILE", help="also write the rows as CSV to FILE ('-': only CSV, on stdout)")
    node_usage.set_defaults(handler=_cmd_node_usage)
    node_erase = node.add_parser("erase", help="carry out a patient's erasure request: excluded from every purpose "
                                 "for good, grants revoked and unlinked; reports what cannot be recalled")
    node_erase.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    node_erase.add_argument("--record-key", required=True, help="the patient's record key in the export")
    node_erase.add_argument("--reason", required=True, help="the basis of the request, in one line (audited; no names)")
    node_erase.add_argument("--by", help="who carries it out (default: the login name)")
    node_erase.set_defaults(handler=_cmd_node_erase)
    node_purge = node.add_parser("purge", help="enforce the policy's retention: unlink ended grants from patients")
    node_purge.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    node_purge.add_argument("--dry-run", action="store_true", help="only count what would be purged")
    node_purge.set_defaults(handler=_cmd_node_purge)
    backup = node.add_parser("backup", help="encrypted backups of the node directory (AES-256-GCM)").add_subparsers(
        dest="backup_command", required=True)
    backup_key = backup.add_parser("key", help="make a backup key (keep it apart from the backups)")
    backup_key.add_argument("--out", required=True, help="the key file to create (mode 0600, never overwritten)")
    backup_key.set_defaults(handler=_cmd_backup_key)
    backup_create = backup.add_parser("create", help="write an encrypted backup of the node directory")
    backup_create.add_argument("--dir", required=True, help=NODE_DIR_HELP)
    backup_create.add_argument("--out", required=True, help="the backup file to create (never overwritten)")
    backup_create.add_argument("--key-file", help="the backup key (default: $FEDRISK_BACKUP_KEY)")
    backup_create.set_defaults(handler=_cmd_backup_create)
    backup_restore = backup.add_parser("restore", help="restore a backup into a new node directory; a restored node "
                                       "refuses to run until `node anchor accept` if it is behind its anchored head")
    backup_restore.add_argument("--from", dest="source", required=True, help="the backup file")
    backup_restore.add_argument("--dir", required=True, help="the new node directory (absent or empty)")
    backup_restore.add_argument("--key-file", help="the backup key (default: $FEDRISK_BACKUP_KEY)")
    backup_restore.set_defaults(handler=_cmd_backup_restore)
    schema = node.add_parser("schema", help="export schemas: draft one from an export").add_subparsers(
        dest="schema_command", required=True)
    schema_init = schema.add_parser("init", help="draft a schema from an export (or several) for a person to review")
    schema_init.add_argument("--data", action="append", required=True, metavar="FILE",
                             help="the export (CSV or Parquet); repeat to draft one schema for several hospitals' files")
    schema_init.add_argument("--label", required=True, help="the column the model predicts (0/1)")
    schema_init.add_argument("--record-key", help="the column that identifies a record (default: guessed)")
    schema_init.add_argument("--purpose", help="the purpose a lone consent_* column stands for")
    schema_init.add_argument("--out", required=True, help="where to write the draft (never overwritten)")
    schema_init.set_defaults(handler=_cmd_node_schema_init)
    _add_node_policy(node)  # fedrisk node policy show|set
    _add_node_federation(node)  # fedrisk node enrol | signing-key | anchor accept
    return node
