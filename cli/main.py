"""The `fedrisk` command line.

Every user-caused problem ends as one line on stderr (`fedrisk: error: ...`) and exit code 2;
a traceback means a bug. Sub-commands import their machinery lazily so `fedrisk --help` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cli import release as cli_release, scoring as cli_scoring, serve as cli_serve
from federation.config import RunConfig
from federation.errors import ConfigError, FedriskError

EXIT_USER_ERROR = 2


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from experiments.synthetic import synthesize

    report = synthesize(args.hospitals, args.patients, Path(args.out), seed=args.seed)
    for path, rows, kind in zip(report.files, report.rows_by_hospital, report.hospital_types):
        print(f"{path}  {rows:>8,} patients  {kind}")
    print(f"ground truth (not for training): {report.truth_path}")
    print(f"oracle AUC: {report.oracle_auc:.4f}")
    return 0


def _cmd_data_breast_cancer(args: argparse.Namespace) -> int:
    from experiments.breast_cancer import export_breast_cancer

    files, schema = export_breast_cancer(Path(args.out), hospitals=args.hospitals, seed=args.seed)
    for path in files:
        print(path)
    print(f"schema: {schema}")
    return 0


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from federation.he_codec import init_keys

    keys = init_keys(Path(args.out), overwrite=args.force)
    print(f"hospital secret context (mode 0600): {keys.hospital_context}")
    print(f"server parameters-only context:      {keys.server_context}")
    print(f"key id {keys.key_id}, parameters {keys.params_id}: {keys.federation_file}")
    return 0


def _run_config(args: argparse.Namespace) -> RunConfig:
    if not args.data and not args.nodes:
        raise ConfigError("give --nodes (initialised hospital nodes) or --data (provision them for a simulation)")
    return RunConfig(data_dir=args.data or "", nodes_dir=args.nodes or "", keys_dir=args.keys, run_dir=args.out,
                     num_hospitals=args.hospitals, rounds=args.rounds, local_epochs=args.local_epochs,
                     sample_rate=args.sample_rate, clip_norm=args.clip_norm,
                     learning_rate=args.learning_rate, target_epsilon=args.epsilon, delta=args.delta,
                     model=args.model, seed=args.seed, purpose=args.purpose,
                     tracking_uri=args.tracking_uri or "", min_contributors=args.min_contributors,
                     features=args.features, n_features=args.n_features, schema_file=args.schema or "")


def _cmd_run(args: argparse.Namespace) -> int:
    from experiments.demo import _progress
    from engines.simulation import simulate

    config = _run_config(args)
    result = simulate(config, progress=_progress(sys.stdout), verbose=args.verbose)
    print(f"release: {result.release_dir}  sha256 {result.digest}")
    print(f"epsilon max {result.privacy['epsilon_max']:.3f} at delta {config.delta:g}; MLflow run {result.run_id}")
    return 0


def _cmd_analytics_check(args: argparse.Namespace) -> int:
    from federation.query import load_query

    query = load_query(args.query)
    layout, z = query.layout(), query.noise_multiplier()
    print(f"{query.name}: {query.describe()}")
    print(f"{len(layout.cells)} cell(s) x {layout.per_cell} statistic(s); noise multiplier {z:.4f} "
          f"at delta {query.delta:g}")
    print(f"standard error of a cell's record count with {args.hospitals} hospitals: "
          f"{(args.hospitals ** 0.5) * z * layout.noise_scales[0]:.1f}; cells below {query.suppress_below:g} "
          "noised records are suppressed")
    return 0


def _cmd_analytics_run(args: argparse.Namespace) -> int:
    import pandas as pd

    from engines.analytics import run_query
    from federation.query import load_query
    from server.analytics import write_result

    if not args.data and not args.nodes:
        raise ConfigError("give --nodes (initialised hospital nodes) or --data (provision them for a simulation)")
    query = load_query(args.query)
    result = run_query(query, nodes_dir=args.nodes or "", data_dir=args.data or "", keys_dir=args.keys,
                       run_dir=args.out, num_hospitals=args.hospitals, run_id=args.run_id,
                       tracking_uri=args.tracking_uri or "", provision_budget=args.budget, verbose=args.verbose)
    files = result.files + ([str(p) for p in write_result(result, Path(args.table))] if args.table else [])
    print(f"{query.name} ({result.run_id}): {query.describe()}; noise multiplier {result.noise_multiplier:.4f}, "
          f"{len(result.hospitals)} hospitals")
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:,.4g}".format):
        print(result.table.to_string(index=False))
    print(f"written: {', '.join(files)}; MLflow run {result.mlflow_run_id}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from experiments.demo import DemoSettings, run_demo

    run_demo(DemoSettings(out=Path(args.out) if args.out else None, hospitals=args.hospitals,
                          patients=args.patients, rounds=args.rounds, epsilon=args.epsilon,
                          delta=args.delta, model=args.model, seed=args.seed,
                          tracking_uri=args.tracking_uri or "", overheads=not args.no_overheads))
    return 0


def _cmd_privacy_verify(args: argparse.Namespace) -> int:
    from privacy.accounting import recompute_report

    path = Path(args.report)
    try:
        report = json.loads(path.read_text())
        checks = recompute_report(report)
    except FileNotFoundError:
        raise ConfigError(f"privacy report not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give its release/privacy_report.json") from None
    except FedriskError as error:
        raise ConfigError(f"{path}: {error}") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a fedrisk privacy report") from None
    for name, h in sorted(report["hospitals"].items()):
        print(f"{name}: q={h['sample_rate']:g} sigma={h['noise_multiplier']:.4f} steps={h['steps']} delta={h['delta']:g}")
        for check in (c for c in checks if c.hospital == name):
            print(f"  {check.key} {check.recomputed:.4f} (reported {check.logged:.4f})")
    worst = max((abs(c.logged - c.recomputed) for c in checks), default=0.0)
    if worst > 1e-6:
        raise ConfigError(f"{path}: a reported epsilon differs from its recomputation by {worst:.3g}")
    print("every epsilon recomputes from its logged parameters")
    return 0


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


def _cmd_node_check(args: argparse.Namespace) -> int:
    from clients.schema import SHIPPED_SYNTHETIC_SCHEMA, ExportSchema
    from clients.validation import validate_export

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
            for charge in ledger.history(purpose):
                print(f"  {charge.charged_at}  {charge.kind:<10} run {charge.run_id} {charge.slot}  "
                      f"{charge.mechanism.describe()}  -> epsilon {charge.epsilon_after:.4f}")
    return 0


def _cmd_node_revoke(args: argparse.Namespace) -> int:
    import pandas as pd

    from clients.node_state import NodeState
    from privacy.audit import Digest

    state = NodeState.load(Path(args.dir))
    pseudonym = state.pseudonym_key().pseudonymise(pd.Series([args.record_key])).iloc[0]
    state.revocations().revoke(pseudonym, args.purpose)
    state.audit().append("consent.revoke", purpose=args.purpose, details={"pseudonym": Digest(pseudonym)})
    print(f"consent for {args.purpose} withdrawn for one record: excluded from the next run or query, "
          "and from applicant scoring at once")
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
    from clients.policy import POLICY_FILE, POLICY_SET, NodePolicy, parse_assignments, write_atomically
    from privacy.audit import Digest

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
    show.add_argument("--dir", required=True)
    show.set_defaults(handler=_cmd_node_policy_show)
    change = commands.add_parser("set", help="change policy fields (validated; audited as policy.set)")
    change.add_argument("--dir", required=True)
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
            state.audit().append("node.enrol", details={"hospitals": sorted(manifest.hospitals)})
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
    key.add_argument("--dir", required=True)
    key.set_defaults(handler=_cmd_node_signing_key)
    anchor = node.add_parser("anchor", help="recover a node found behind its anchored ledger head")
    anchor_commands = anchor.add_subparsers(dest="anchor_command", required=True)
    accept = anchor_commands.add_parser("accept", help="accept the rollback: new epoch, budgets closed, audited")
    accept.add_argument("--dir", required=True)
    accept.set_defaults(handler=_cmd_node_anchor_accept)


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from privacy.audit import AuditLog, format_verification

    path = Path(args.log)
    if path.is_dir():
        from federation.run_dir import NODE_AUDIT_FILE, SERVER_AUDIT_FILE

        path = path / NODE_AUDIT_FILE if (path / NODE_AUDIT_FILE).exists() else path / SERVER_AUDIT_FILE
    if not path.is_file():
        raise ConfigError(f"audit log not found: {path}")
    result = AuditLog(path, role="auditor", identity="fedrisk-cli").verify()
    print(format_verification(result))
    return 0 if result.ok else 1


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from engines.credentials import LOOPBACK_HOSTS, hospital_names, init_credentials

    creds = init_credentials(Path(args.out), hospital_names(args.hospitals), args.host or list(LOOPBACK_HOSTS),
                             days=args.days, force=args.force)
    print(f"credentials in {creds.directory}, valid until {creds.not_valid_after:%Y-%m-%d %H:%M} UTC")
    print(f"  test CA (every party trusts it):    {creds.ca_certificate}")
    print(f"    sha256 {creds.ca_sha256_fingerprint}")
    print(f"  CA key (mode 0600, keep it private): {creds.ca_key}")
    print(f"  SuperLink certificate and key:       {creds.superlink_certificate}  {creds.superlink_key}")
    print(f"    valid for {', '.join(creds.hosts)}")
    for hospital in creds.hospitals.values():
        print(f"  {hospital.name}: auth key {hospital.auth_private_key} (+ .pub), "
              f"Runtime API certificate {hospital.node_certificate} (+ node.key)")
    print(f"manifest: {creds.manifest}")
    print("enrol each hospital's SuperNode (<connection>: the SuperLink connection in the flwr CLI's config.toml):")
    for hospital in creds.hospitals.values():
        print(f"  flwr supernode register {hospital.auth_public_key} <connection> --name {hospital.name}")
    return 0


def _cmd_certs_node_key(args: argparse.Namespace) -> int:
    from engines.credentials import new_node_key

    private_key, public_key = new_node_key(Path(args.out), args.name, force=args.force)
    print(f"SuperNode auth key (mode 0600, stays on this machine): {private_key}")
    print(f"public key, send it to the coordinator:               {public_key}")
    print(f"the coordinator runs: flwr supernode register {public_key.name} <connection> --name {args.name}")
    return 0


def _add_training_options(parser: argparse.ArgumentParser, *, demo: bool) -> None:
    defaults = RunConfig()
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    parser.add_argument("--epsilon", type=float, default=defaults.target_epsilon,
                        help="target epsilon per hospital for the whole run (default 1.0)")
    delta = 1e-6 if demo else defaults.delta  # the demo's hospitals hold up to ~50,000 training records
    parser.add_argument("--delta", type=float, default=delta,
                        help=f"delta (default {delta:g}); each hospital's policy caps it at 1/(10 n) for its n records")
    parser.add_argument("--model", default="mlp", help="mlp (40-64-32-1), mlp:W1,W2,... or logreg (default mlp)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, init and sampling (default 0)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: SQLite under --out)")
    if demo:
        return
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    parser.add_argument("--sample-rate", type=float, default=defaults.sample_rate,
                        help="Poisson sampling rate q, 1/k (default 0.01)")
    parser.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--purpose", default=defaults.purpose)
    parser.add_argument("--min-contributors", type=int, default=2)
    parser.add_argument("--features", choices=("standard", "schema"), default="standard",
                        help="model inputs: the standard 40-input contract, or encoded from the schema")
    parser.add_argument("--n-features", type=int, default=0, help="model inputs of a --features schema run")
    parser.add_argument("--schema", help="export schema for nodes provisioned from --data")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="fedrisk", description=(
        "Federated credit-risk models from hospital data: Flower + Opacus DP-SGD + TenSEAL CKKS."))
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job: synthesise, train (DP + HE), compare")
    demo.add_argument("--out", help="output directory (default runs/<timestamp>/)")
    demo.add_argument("--hospitals", type=int, default=8)
    demo.add_argument("--patients", type=int, default=200_000)
    demo.add_argument("--no-overheads", action="store_true", help="skip the overhead measurements")
    _add_training_options(demo, demo=True)
    demo.set_defaults(handler=_cmd_demo)

    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic hospital exports")
    synth.add_argument("--hospitals", type=int, required=True)
    synth.add_argument("--patients", type=int, required=True)
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_cmd_data_synth)

    cancer = data.add_parser("breast-cancer", help="scikit-learn's breast-cancer data as hospital exports")
    cancer.add_argument("--out", required=True)
    cancer.add_argument("--hospitals", type=int, default=3)
    cancer.add_argument("--seed", type=int, default=0)
    cancer.set_defaults(handler=_cmd_data_breast_cancer)

    keys = commands.add_parser("keys", help="CKKS key material").add_subparsers(dest="keys_command", required=True)
    init = keys.add_parser("init", help="create the hospitals' secret context and the server's public one")
    init.add_argument("--out", required=True, help="directory for the key material")
    init.add_argument("--force", action="store_true", help="replace an existing key")
    init.set_defaults(handler=_cmd_keys_init)

    run = commands.add_parser("run", help="federated training in Flower's simulation engine")
    run.add_argument("--nodes", help="directory of hospital node directories (`fedrisk node init`)")
    run.add_argument("--data", help="directory of hospital_*.parquet|csv files: provision nodes for a simulation")
    run.add_argument("--keys", required=True, help="directory written by `fedrisk keys init`")
    run.add_argument("--out", required=True, help="run directory (MLflow store, release)")
    run.add_argument("--hospitals", type=int, default=3)
    run.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    _add_training_options(run, demo=False)
    run.set_defaults(handler=_cmd_run)

    analytics = commands.add_parser("analytics", help="federated DP cohort statistics").add_subparsers(
        dest="analytics_command", required=True)
    analytics_run = analytics.add_parser("run", help="answer a cohort query across the hospitals (simulation engine)")
    analytics_run.add_argument("query", help="query file (YAML; format in federation/query.py)")
    analytics_run.add_argument("--nodes", help="directory of hospital node directories (`fedrisk node init`)")
    analytics_run.add_argument("--data", help="directory of hospital_*.parquet|csv files: provision nodes for a simulation")
    analytics_run.add_argument("--budget", type=float, default=10.0,
                               help="with --data: epsilon budget of provisioned nodes for the query's purpose")
    analytics_run.add_argument("--keys", required=True, help="directory written by `fedrisk keys init`")
    analytics_run.add_argument("--out", required=True, help="run directory (tables under queries/, MLflow store)")
    analytics_run.add_argument("--hospitals", type=int, default=3)
    analytics_run.add_argument("--run-id", default="", help="name of this query run (default: name and digest of the "
                               "query; the same run on the same records repeats its answer at no new cost)")
    analytics_run.add_argument("--table", help="also write the table here (.csv or .parquet)")
    analytics_run.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: SQLite under --out)")
    analytics_run.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    analytics_run.set_defaults(handler=_cmd_analytics_run)
    analytics_check = analytics.add_parser("check", help="validate a query and show its noise; touches no data")
    analytics_check.add_argument("query")
    analytics_check.add_argument("--hospitals", type=int, default=3)
    analytics_check.set_defaults(handler=_cmd_analytics_check)

    node = commands.add_parser("node", help="hospital node: init, check, budget, consent").add_subparsers(
        dest="node_command", required=True)
    node_init = node.add_parser("init", help="create a node directory: schema check, keys, ledger, audit log")
    node_init.add_argument("--dir", required=True, help="the node's state directory (back it up)")
    node_init.add_argument("--hospital", required=True, help="this hospital's name in the federation")
    node_init.add_argument("--data", required=True, help="the hospital's export (Parquet or CSV)")
    node_init.add_argument("--schema", help="export schema YAML (default: the synthetic export's)")
    node_init.add_argument("--key", required=True, help="the federation's hospital CKKS context")
    node_init.add_argument("--budget", action="append", default=[], metavar="PURPOSE=EPSILON",
                           help="total epsilon for a purpose (repeatable)")
    node_init.add_argument("--delta", type=float, default=1e-5, help="delta of every budget (default 1e-5)")
    node_init.set_defaults(handler=_cmd_node_init)
    node_provision = node.add_parser("provision", help="simulation: one node per hospital file in a directory")
    node_provision.add_argument("--data", required=True, help="directory of hospital_*.parquet|csv files")
    node_provision.add_argument("--key", required=True, help="the federation's hospital CKKS context")
    node_provision.add_argument("--out", required=True, help="directory to hold the node directories")
    node_provision.add_argument("--schema", help="export schema YAML (default: the synthetic export's)")
    node_provision.add_argument("--budget", action="append", default=[], metavar="PURPOSE=EPSILON")
    node_provision.add_argument("--delta", type=float, default=1e-5)
    node_provision.set_defaults(handler=_cmd_node_provision)
    node_check = node.add_parser("check", help="validate an export against its schema; writes nothing")
    node_check.add_argument("file")
    node_check.add_argument("--schema", help="export schema YAML (default: the synthetic export's)")
    node_check.set_defaults(handler=_cmd_node_check)
    node_budget = node.add_parser("budget", help="privacy budget: spent, left, history")
    node_budget.add_argument("--dir", required=True)
    node_budget.add_argument("--purpose")
    node_budget.set_defaults(handler=_cmd_node_budget)
    node_revoke = node.add_parser("revoke", help="withdraw a patient's consent for a purpose")
    node_revoke.add_argument("--dir", required=True)
    node_revoke.add_argument("--record-key", required=True, help="the patient's record key in the export")
    node_revoke.add_argument("--purpose", required=True)
    node_revoke.set_defaults(handler=_cmd_node_revoke)
    _add_node_policy(node)  # fedrisk node policy show|set
    _add_node_federation(node)  # fedrisk node enrol | signing-key | anchor accept

    audit = commands.add_parser("audit", help="audit logs").add_subparsers(dest="audit_command", required=True)
    audit_verify = audit.add_parser("verify", help="check a hash-chained audit log; exit 1 if tampered")
    audit_verify.add_argument("log", help="audit.sqlite, server_audit.sqlite, or a node/run directory")
    audit_verify.set_defaults(handler=_cmd_audit_verify)

    certs = commands.add_parser("certs", help="TLS and SuperNode credentials for Flower's deployment engine")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    certs_init = certs_commands.add_parser(
        "init", help="test CA, SuperLink certificate, and every hospital's auth key and Runtime API certificate")
    certs_init.add_argument("--out", required=True, help="directory to create (must be absent or empty)")
    certs_init.add_argument("--hospitals", default="3",
                            help="a number N (hospital_00 .. hospital_{N-1}) or comma-separated names (default 3)")
    certs_init.add_argument("--host", action="append", metavar="HOST",
                            help="name or IP address the SuperLink is reached at (repeatable; "
                                 "default 127.0.0.1, localhost, ::1)")
    certs_init.add_argument("--days", type=int, default=30, help="validity of the certificates in days (default 30)")
    certs_init.add_argument("--force", action="store_true", help="replace credentials made earlier in --out")
    certs_init.set_defaults(handler=_cmd_certs_init)
    certs_node_key = certs_commands.add_parser(
        "node-key", help="one hospital's SuperNode auth key pair, made on its own machine")
    certs_node_key.add_argument("--out", required=True, help="directory to create (must be absent or empty)")
    certs_node_key.add_argument("--name", required=True, help="the hospital's name (goes in the public key's comment)")
    certs_node_key.add_argument("--force", action="store_true", help="replace a key pair made earlier in --out")
    certs_node_key.set_defaults(handler=_cmd_certs_node_key)

    cli_scoring.register(node)  # fedrisk node grant|serve|release
    cli_release.register(commands)  # fedrisk release
    cli_serve.register(commands)  # fedrisk serve

    privacy = commands.add_parser("privacy", help="privacy reports").add_subparsers(dest="privacy_command", required=True)
    verify = privacy.add_parser("verify", help="recompute every epsilon of a privacy report")
    verify.add_argument("report")
    verify.set_defaults(handler=_cmd_privacy_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedrisk` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except FedriskError as exc:
        print(f"fedrisk: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedrisk: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
