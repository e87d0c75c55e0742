"""The `fedrisk` command line.

Every user-caused problem ends as one line on stderr (`fedrisk: error: ...`) and exit code 2;
a traceback means a bug. Sub-commands import their machinery lazily so `fedrisk --help` is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cli import alerts as cli_alerts, bank as cli_bank, incident as cli_incident, node as cli_node, release as cli_release, scoring as cli_scoring, serve as cli_serve
from cli import workspace as ws
from cli.progress import Working
from federation.config import RunConfig
from federation.errors import ConfigError, FedriskError

EXIT_USER_ERROR = 2
CONVENTIONS = """flag conventions, the same in every command:
  --out DIR        a directory the command creates or writes (`fedrisk run --out` also answers to --run-dir)
  --run-dir DIR    an existing run directory the command reads (what `fedrisk run --out` made)
  --dir DIR        one hospital node's directory;  --nodes DIR  a directory of node directories
  --keys DIR       the directory `fedrisk keys init` wrote;  --key-file FILE  one key file in it
  --*-file FILE    always one file (--token-hash-file: the node's hash; --token-file: the token itself)
  --hospitals N    a count (certs init also takes comma-separated names)
  ids              positional or by flag: release show r3 = release show --release-id r3
every tracked command uses the workspace's MLflow store: --workspace DIR, $FEDRISK_WORKSPACE or the current directory
"""


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


def _input_count(args: argparse.Namespace) -> int:
    """--n-features of a schema run: derived from the schema; a typed value must agree with it."""
    if args.features != "schema":
        return args.n_features
    from engines.provisioning import schema_input_count

    derived = schema_input_count(args.purpose, schema_file=Path(args.schema) if args.schema else None,
                                 nodes_dir=Path(args.nodes) if args.nodes else None, count=args.hospitals)
    if args.n_features and args.n_features != derived:
        raise ConfigError(f"--n-features {args.n_features} disagrees with the schema, whose inputs number {derived} "
                          "(leave --n-features out: it is derived)")
    return derived


def _run_config(args: argparse.Namespace) -> RunConfig:
    if not args.data and not args.nodes:
        raise ConfigError("give --nodes (initialised hospital nodes) or --data (provision them for a simulation)")
    return RunConfig(data_dir=args.data or "", nodes_dir=args.nodes or "", keys_dir=args.keys, run_dir=args.out,
                     num_hospitals=args.hospitals, rounds=args.rounds, local_epochs=args.local_epochs,
                     sample_rate=args.sample_rate, clip_norm=args.clip_norm,
                     learning_rate=args.learning_rate, server_momentum=args.server_momentum,
                     server_learning_rate=args.server_learning_rate, target_epsilon=args.epsilon, delta=args.delta,
                     model=args.model, seed=args.seed, purpose=args.purpose,
                     tracking_uri=ws.tracking_uri(args), min_contributors=args.min_contributors,
                     features=args.features, n_features=_input_count(args), schema_file=args.schema or "")


def _cmd_run(args: argparse.Namespace) -> int:
    from engines.simulation import simulate

    config = _run_config(args)
    with Working(f"training at {config.num_hospitals} hospitals", config.rounds) as working:
        result = simulate(config, progress=working.callback, verbose=args.verbose)
    print(f"release: {result.release_dir}  sha256 {result.digest}")
    from server.plots import PLOTS_DIR, TRAINING_PLOT

    plot = Path(config.run_dir) / PLOTS_DIR / TRAINING_PLOT
    if plot.is_file():
        print(f"plot: {plot} (AUC and epsilon by round; also in the MLflow run)")
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
    with Working(f"query {query.name} at {args.hospitals} hospitals"):
        result = run_query(query, nodes_dir=args.nodes or "", data_dir=args.data or "", keys_dir=args.keys,
                           run_dir=args.out, num_hospitals=args.hospitals, run_id=args.run_id,
                           tracking_uri=ws.tracking_uri(args), provision_budget=args.budget, verbose=args.verbose)
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
                          tracking_uri=ws.tracking_uri(args), overheads=not args.no_overheads),
             working=lambda what, rounds: Working(what, rounds, announce=False))
    return 0


def _cmd_privacy_verify(args: argparse.Namespace) -> int:
    from privacy.accounting import ACCOUNTANT, EPSILON_TOLERANCE, cross_check, recompute_report

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
    except ValueError as error:
        if "accountant" in str(error):
            raise ConfigError(f"{path}: {error}") from None
        raise ConfigError(f"{path} is not a fedrisk privacy report") from None
    except (KeyError, TypeError):
        raise ConfigError(f"{path} is not a fedrisk privacy report") from None
    crossed = cross_check(checks)
    for name, h in sorted(report["hospitals"].items()):
        accountant = next(c.accountant for c in checks if c.hospital == name)
        print(f"{name}: q={h['sample_rate']:g} sigma={h['noise_multiplier']:.4f} steps={h['steps']} delta={h['delta']:g}"
              f" ({'pld' if accountant == ACCOUNTANT else 'rdp, as logged before PLD'})")
        for c in (c for c in crossed if c.check.hospital == name):
            print(f"  {c.check.key} {c.check.recomputed:.4f} (reported {c.check.logged:.4f}); "
                  f"pld {c.pld:.4f}, rdp {c.rdp:.4f}, independent prv {c.prv.estimate:.4f} "
                  f"[{c.prv.lower:.4f}, {c.prv.upper:.4f}]")
    print(f"accountant: {checks[0].accountant if len({c.accountant for c in checks}) == 1 else 'per hospital, above'}; "
          "cross-checks: rdp (opacus.accountants.analysis.rdp), prv (opacus.accountants.PRVAccountant, independent)")
    worst = max((abs(c.logged - c.recomputed) for c in checks), default=0.0)
    if worst > EPSILON_TOLERANCE:
        raise ConfigError(f"{path}: a reported epsilon differs from its recomputation by {worst:.3g}")
    under = [c for c in crossed if c.below_prv]
    if under:
        c = under[0]
        raise ConfigError(f"{path}: {c.check.hospital}'s {c.check.key} {c.check.logged:.4f} is below the independent "
                          f"PRV accountant's lower bound {c.prv.lower:.4f}: it under-counts")
    print("every epsilon recomputes from its logged parameters by the accountant it names, "
          "and none is below the independent PRV accountant's lower bound")
    return 0


def _audit_path(value: str) -> Path:
    path = Path(value)
    if path.is_dir():
        from federation.run_dir import NODE_AUDIT_FILE, SERVER_AUDIT_FILE

        path = path / NODE_AUDIT_FILE if (path / NODE_AUDIT_FILE).exists() else path / SERVER_AUDIT_FILE
    if not path.is_file():
        raise ConfigError(f"audit log not found: {path}")
    return path


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from privacy.audit import AuditLog, format_verification

    path = _audit_path(args.log)
    result = AuditLog(path, role="auditor", identity="fedrisk-cli").verify()
    print(format_verification(result))
    if not result.ok:
        from privacy.alerts import Alert, AlertMonitor, drain_deliveries, now_utc

        monitor = AlertMonitor.beside(path, "fedrisk-cli")
        if monitor is not None:
            monitor.fire(Alert("audit-verify", "critical", f"{path.name} does not verify: {len(result.problems)} "
                               "problem(s); `fedrisk audit verify` says where", "fedrisk-cli", now_utc()), path.name)
            drain_deliveries()
    return 0 if result.ok else 1


def _when(value: str | None, flag: str) -> str | None:
    """An ISO date or date-time, normalised to compare with the log's UTC timestamps."""
    if not value:
        return None
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{flag} takes a date or date-time such as 2026-12-01 or 2026-12-01T09:30, "
                          f"got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat()


def _cmd_audit_show(args: argparse.Namespace) -> int:
    import csv

    from privacy.audit import AuditLog

    log = AuditLog(_audit_path(args.log), role="auditor", identity="fedrisk-cli")
    verification = log.verify()
    since, until = _when(args.since, "--since"), _when(args.until, "--until")
    entries = log.entries()
    rows = [e for e in entries
            if (not args.action or e.action in args.action) and (not args.purpose or e.purpose == args.purpose)
            and (since is None or e.ts >= since) and (until is None or e.ts < until)]
    if args.limit:
        rows = rows[-args.limit:]
    header = ("seq", "time_utc", "actor", "action", "purpose", "epsilon", "details")

    def record(e) -> tuple:
        return (e.seq, e.ts[:19].replace("T", " "), f"{e.role}:{e.identity}", e.action, e.purpose or "",
                "" if e.epsilon is None else f"{e.epsilon:.4f}", e.details_json)

    if args.csv:
        handle = sys.stdout if args.csv == "-" else open(args.csv, "w", newline="", encoding="utf-8")
        try:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(record(e) for e in rows)
        finally:
            if handle is not sys.stdout:
                handle.close()
        if args.csv != "-":
            print(f"{len(rows)} entries written to {args.csv}")
    else:
        print(("chain verified: " if verification.ok else "WARNING, the chain does NOT verify (`fedrisk audit "
               "verify` says where): ") + f"{len(entries)} entries; showing {len(rows)}")
        for e in rows:
            seq, ts, actor, action, purpose, eps, details = record(e)
            extra = " ".join(x for x in (purpose, f"epsilon {eps}" if eps else "", details if details != "{}" else "") if x)
            print(f"{seq:>6}  {ts}  {actor:<28} {action:<22} {extra}")
    return 0 if verification.ok else 1


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


def _cmd_certs_renew(args: argparse.Namespace) -> int:
    from engines.credentials import renew_credentials

    creds = renew_credentials(Path(args.dir), days=args.days, new_ca=args.new_ca)
    print(f"renewed the SuperLink's and {len(creds.hospitals)} SuperNode(s)' TLS keys and certificates in "
          f"{creds.directory}, valid until {creds.not_valid_after:%Y-%m-%d %H:%M} UTC; SuperNode auth keys kept "
          "(no hospital registers again). Restart the SuperLink and the SuperNodes to load them")
    if args.new_ca:
        print(f"new test CA {creds.ca_certificate} (sha256 {creds.ca_sha256_fingerprint}): give it to every party "
              "before the restart; the old CA is no longer trusted by anyone who takes the new ca.crt")
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
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: the workspace's mlflow.db)")
    if demo:
        return
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs,
                        help=f"DP-SGD epochs per hospital per round (default {defaults.local_epochs})")
    parser.add_argument("--sample-rate", type=float, default=defaults.sample_rate,
                        help="Poisson sampling rate q, 1/k (default 0.01)")
    parser.add_argument("--clip-norm", type=float, default=defaults.clip_norm,
                        help=f"per-sample gradient L2 clip C (default {defaults.clip_norm:g})")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                        help=f"local Adam step size (default {defaults.learning_rate:g})")
    parser.add_argument("--server-momentum", type=float, default=defaults.server_momentum,
                        help="FedAvgM momentum on the decrypted round aggregates, replayed at every hospital "
                             f"(post-processing, no budget; default {defaults.server_momentum:g})")
    parser.add_argument("--server-learning-rate", type=float, default=defaults.server_learning_rate,
                        help=f"FedAvgM step size (default {defaults.server_learning_rate:g})")
    parser.add_argument("--purpose", default=defaults.purpose,
                        help=f"the consent purpose the run's records must consent to (default {defaults.purpose})")
    parser.add_argument("--min-contributors", type=int, default=2,
                        help="fewest hospitals whose updates make a round (default 2)")
    parser.add_argument("--features", choices=("standard", "schema"), default="standard",
                        help="model inputs: the standard 40-input contract, or encoded from the schema")
    parser.add_argument("--n-features", type=int, default=0,
                        help="optional check: the model inputs of a --features schema run are derived from the "
                             "schema (`fedrisk node check --dir NODE --features schema` lists them)")
    parser.add_argument("--schema", help="export schema for nodes provisioned from --data")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="fedrisk", description=(
        "Federated credit-risk models from hospital data: Flower + Opacus DP-SGD + TenSEAL CKKS."),
        epilog=CONVENTIONS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", metavar="DIR", help=ws.WORKSPACE_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job: synthesise, train (DP + HE), compare")
    demo.add_argument("--out", help="output directory (default runs/<timestamp>/)")
    demo.add_argument("--hospitals", type=int, default=8, help="synthetic hospitals (default 8)")
    demo.add_argument("--patients", type=int, default=200_000, help="synthetic patients across them (default 200,000)")
    demo.add_argument("--no-overheads", action="store_true", help="skip the overhead measurements")
    _add_training_options(demo, demo=True)
    demo.set_defaults(handler=_cmd_demo)

    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic hospital exports")
    synth.add_argument("--hospitals", type=int, required=True, help="how many hospital export files to write")
    synth.add_argument("--patients", type=int, required=True, help="patients across all hospitals")
    synth.add_argument("--out", required=True, help="directory for the exports and the ground-truth file")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.set_defaults(handler=_cmd_data_synth)

    cancer = data.add_parser("breast-cancer", help="scikit-learn's breast-cancer data as hospital exports")
    cancer.add_argument("--out", required=True, help="directory for the exports and their schema")
    cancer.add_argument("--hospitals", type=int, default=3, help="hospitals to split the 569 patients over (default 3)")
    cancer.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
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
    run.add_argument("--out", "--run-dir", dest="out", required=True, help="run directory (checkpoint, release files; tracked in the workspace)")
    run.add_argument("--hospitals", type=int, default=3, help="hospitals that take part; the run waits for this many "
                     "nodes (default 3)")
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
    analytics_run.add_argument("--out", "--run-dir", dest="out", required=True, help="run directory (tables under queries/; tracked in the workspace)")
    analytics_run.add_argument("--hospitals", type=int, default=3, help="hospitals that answer (default 3)")
    analytics_run.add_argument("--run-id", default="", help="name of this query run (default: name and digest of the "
                               "query; the same run on the same records repeats its answer at no new cost)")
    analytics_run.add_argument("--table", help="also write the table here (.csv or .parquet)")
    analytics_run.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: the workspace's "
                               "mlflow.db)")
    analytics_run.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    analytics_run.set_defaults(handler=_cmd_analytics_run)
    analytics_check = analytics.add_parser("check", help="validate a query and show its noise; touches no data")
    analytics_check.add_argument("query", help="query file (YAML; format in federation/query.py)")
    analytics_check.add_argument("--hospitals", type=int, default=3,
                                 help="hospitals whose noise the shown standard errors sum (default 3)")
    analytics_check.set_defaults(handler=_cmd_analytics_check)

    node = cli_node.register(commands)  # fedrisk node init|provision|check|budget|revoke|policy|enrol|anchor

    audit = commands.add_parser("audit", help="audit logs").add_subparsers(dest="audit_command", required=True)
    audit_verify = audit.add_parser("verify", help="check a hash-chained audit log; exit 1 if tampered")
    audit_verify.add_argument("log", help="audit.sqlite, server_audit.sqlite, or a node/run directory")
    audit_verify.set_defaults(handler=_cmd_audit_verify)
    audit_show = audit.add_parser("show", help="read an audit log: filter, print or export as CSV; writes nothing "
                                  "to the log (exit 1 if its chain does not verify)")
    audit_show.add_argument("log", help="audit.sqlite, server_audit.sqlite, or a node/run directory")
    audit_show.add_argument("--action", action="append", metavar="ACTION",
                            help="only entries of this action, e.g. consent.revoke (repeatable)")
    audit_show.add_argument("--purpose", help="only entries of this purpose")
    audit_show.add_argument("--since", metavar="WHEN", help="only entries at or after this UTC date or date-time")
    audit_show.add_argument("--until", metavar="WHEN", help="only entries before this UTC date or date-time")
    audit_show.add_argument("--limit", type=int, default=0, help="only the last N matching entries")
    audit_show.add_argument("--csv", metavar="FILE", help="write the matching entries as CSV to FILE ('-': stdout)")
    audit_show.set_defaults(handler=_cmd_audit_show)

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
    certs_renew = certs_commands.add_parser(
        "renew", help="rotate the TLS keys and certificates made by `certs init` (auth keys kept)")
    certs_renew.add_argument("--dir", required=True, help="the credentials directory `certs init --out` made")
    certs_renew.add_argument("--days", type=int, default=30, help="validity of the new certificates (default 30)")
    certs_renew.add_argument("--new-ca", action="store_true", help="replace the test CA too (every party needs the "
                             "new ca.crt)")
    certs_renew.set_defaults(handler=_cmd_certs_renew)
    certs_node_key = certs_commands.add_parser(
        "node-key", help="one hospital's SuperNode auth key pair, made on its own machine")
    certs_node_key.add_argument("--out", required=True, help="directory to create (must be absent or empty)")
    certs_node_key.add_argument("--name", required=True, help="the hospital's name (goes in the public key's comment)")
    certs_node_key.add_argument("--force", action="store_true", help="replace a key pair made earlier in --out")
    certs_node_key.set_defaults(handler=_cmd_certs_node_key)

    cli_scoring.register(node)  # fedrisk node grant|serve|release
    cli_release.register(commands)  # fedrisk release
    cli_serve.register(commands)  # fedrisk serve
    cli_bank.register(commands)  # fedrisk bank score
    cli_alerts.register(commands)  # fedrisk alerts init|test|list
    cli_incident.register(commands)  # fedrisk incident scope|contain

    privacy = commands.add_parser("privacy", help="privacy reports").add_subparsers(dest="privacy_command", required=True)
    verify = privacy.add_parser("verify", help="recompute every epsilon of a privacy report")
    verify.add_argument("report", help="a release's privacy_report.json")
    verify.set_defaults(handler=_cmd_privacy_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedrisk` command."""
    args = build_parser().parse_args(argv)
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # a reader gone at the final flush is a closed pipe too, not an exit-time error
        return code
    except FedriskError as exc:
        print(f"fedrisk: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedrisk: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`fedrisk ... | head`): stop quietly, as Unix tools do. Python
        # would otherwise fail again flushing stdout at exit, so point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
