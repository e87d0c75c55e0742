"""`fedrisk release`: create, withdraw, list and show releases (registered by cli.main.build_parser).

After `fedrisk run --out runs/x` (tracked in the workspace's MLflow store, `federation.workspace`;
run id printed at the end), a data scientist releases the run with

    fedrisk release evaluate --run-dir runs/x --nodes runs/x/nodes --keys keys   # DP calibration/fairness
    fedrisk release audit --run-dir runs/x --nodes runs/x/nodes --keys keys      # DP membership-inference audit
    fedrisk release create <MLflow run id> --evaluation ... --audit ...

The `--evaluation` tables are required: a release rests on a DP evaluation of its model. So is the
`--audit` table, unless `--no-audit REASON` says why not (the reason goes on the certificate).

The run is looked up in the workspace's store; `--tracking-uri` names any other MLflow store (a
tracking server), and `--run-dir` a run directory made before workspaces, which held its own
mlflow.db. The registry directory (default `<workspace>/releases/`) holds the release audit log
and local copies of the models; its Model Registry is the workspace's store. Every sub-command but
`create` needs only the registry.
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path

from federation.errors import ConfigError
from server.calibration import CALIBRATION_TOLERANCE

from cli import workspace as ws
from federation.run_dir import MLFLOW_DB as LEGACY_RUN_STORE  # what `fedrisk run --out DIR` wrote before workspaces


def _registry(args: argparse.Namespace, tracking_uri: str = "", *, read_only: bool = False):
    """The registry of --registry (a server.releases.ReleaseRegistry); `read_only` commands refuse
    a registry that does not exist instead of creating it."""
    from server.releases import ReleaseRegistry

    return ReleaseRegistry(tracking_uri, ws.registry_dir(args), ws.registry_uri(args), must_exist=read_only)


def _run_store(args: argparse.Namespace) -> str:
    """The store holding the run to release: --tracking-uri, else the own mlflow.db of a pre-workspace
    --run-dir, else the workspace's."""
    if args.tracking_uri:
        return args.tracking_uri
    if args.run_dir:
        if not Path(args.run_dir).is_dir():
            raise ConfigError(f"--run-dir {args.run_dir}: no such directory")
        legacy = Path(args.run_dir).resolve() / LEGACY_RUN_STORE
        if legacy.is_file():
            return f"sqlite:///{legacy}"
    store = ws.workspace(args)
    if not store.exists():
        raise ConfigError(f"no MLflow store in the workspace {store.root} (no {store.store.name}): run this where "
                          f"`fedrisk run` ran, or give --workspace, ${ws.WORKSPACE_ENV} or --tracking-uri")
    return store.tracking_uri


def _positional_or_flag(parser: argparse.ArgumentParser, dest: str, flag: str, metavar: str, text: str) -> None:
    """An id given either positionally (`release show r3`) or by flag (`release show --release-id r3`),
    as the node commands take it."""
    parser.add_argument(dest, nargs="?", metavar=metavar, help=f"{text} (or {flag})")
    parser.add_argument(flag, dest=f"{dest}_flag", metavar=metavar, help=f"the same as the positional {metavar}")


def _chosen(args: argparse.Namespace, dest: str, flag: str, metavar: str) -> str:
    """The id of `_positional_or_flag`: exactly one of the two, or both the same."""
    positional, given = getattr(args, dest), getattr(args, f"{dest}_flag")
    if positional and given and positional != given:
        raise ConfigError(f"{metavar} {positional} and {flag} {given} disagree; give one of them")
    if not (positional or given):
        raise ConfigError(f"give the {metavar} (as the argument, or {flag})")
    return str(positional or given)


def _cmd_create(args: argparse.Namespace) -> int:
    from server.releases.dp_evaluation import load_evaluation
    from server.releases.membership import describe, load_audit

    evaluation = load_evaluation([Path(p) for p in args.evaluation]) if args.evaluation else None
    audit = load_audit(Path(args.audit)) if args.audit else None
    run_id = _chosen(args, "run_id", "--run-id", "RUN_ID")
    release = _registry(args, _run_store(args)).create(run_id, args.approved_by, args.cutoff, evaluation,
                                                          args.accept_miscalibration or "", audit=audit,
                                                          unaudited=args.no_audit or "")
    cert, card = release.certificate, release.card
    print(f"released {release.release_id} ({release.status}): run {release.run_id}, sha256 {release.sha256}")
    print(f"  epsilon max {cert.epsilon_max:.4f} at delta {cert.delta:g} per patient ({cert.neighbouring}) over "
          f"{cert.hospitals} hospitals assumed to hold disjoint patients; data cut-off {cert.data_cutoff}")
    if cert.patient_epsilon_statement:
        print(f"  {cert.patient_epsilon_statement}")
    for name, h in cert.per_hospital.items():  # a new certificate has every per-hospital field
        assert h.evaluation is not None and h.run_epsilon is not None and h.ledger_epsilon is not None
        print(f"  {name}: run epsilon {h.run_epsilon:.4f} (DP-SGD {h.epsilon:.4f}, {h.evaluation.count} DP "
              f"evaluations {h.evaluation.epsilon:.4f}); ledger epsilon for {cert.purpose} after the run "
              f"{h.ledger_epsilon:.4f}")
    print(f"  DP federated evaluation, last round: pooled DP AUC {_number(card.federated_auc)}, "
          f"Brier {_number(card.federated_brier)}; calibration and fairness: {card.calibration['source']}")
    offset = card.fairness["overall"].get("calibration_offset") if isinstance(card.fairness, dict) else None
    if card.recalibration:
        print(f"  recalibrated ({card.recalibration['method'].split(' ')[0]}: slope {card.recalibration['slope']:.3f}, "
              f"intercept {card.recalibration['intercept']:+.3f}) on {card.recalibration['source']}")
    print(f"  calibration check on the DP evaluation: observed minus predicted rate "
          f"{'n/a' if offset is None else format(offset, '+.4f')} (tolerance {CALIBRATION_TOLERANCE:g}); bands: "
          + ", ".join(f"{b['band']} observed {'n/a' if b['observed_rate'] is None else format(b['observed_rate'], '.3f')}"
                      for b in card.bands or []))
    if cert.calibration_override:
        print(f"  RELEASED DESPITE: {'; '.join(cert.calibration_override['problems'])} "
              f"(accepted by {cert.calibration_override['by']}: {cert.calibration_override['reason']})")
    print(f"  {describe(cert.privacy_audit)}")
    print("  approved by " + "; ".join(f"{a['by']} ({a['role']}{', ' + a['hospital'] if a['hospital'] else ''})"
                                       for a in cert.approvals))
    print(f"  model files: {release.model_dir}")
    print(f"each hospital installs it: fedrisk node release install --dir NODE --release-dir {release.model_dir} "
          f"--release-id {release.release_id}")
    return 0


def _cmd_approve(args: argparse.Namespace) -> int:
    run_id = _chosen(args, "run_id", "--run-id", "RUN_ID")
    approval = _registry(args, _run_store(args)).approve(run_id, args.role, args.by, args.hospital or "")
    print(f"approved run {approval.run_id} (model {approval.sha256[:12]}...) as {approval.role}"
          f"{' for ' + approval.hospital if approval.hospital else ''}: {approval.by}, {approval.at[:16]} UTC; a release "
          "needs a data scientist's and a hospital operator's approval, by two people")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from engines.model_evaluation import evaluate_model

    model_file = Path(args.run_dir) / "release" / "model.npz"
    if not model_file.is_file():
        raise ConfigError(f"no released model at {model_file}: give the directory of a finished `fedrisk run`")
    from cli.progress import Working

    with Working(f"DP evaluation of {model_file} at {args.hospitals} hospitals"):
        result, _ = evaluate_model(model_file, nodes_dir=Path(args.nodes), keys_dir=Path(args.keys),
                                   run_dir=Path(args.out or Path(args.run_dir) / "evaluation"),
                                   num_hospitals=args.hospitals, epsilon=args.epsilon, purpose=args.purpose or "",
                                   tracking_uri=ws.tracking_uri(args))
    table = Path(result.files[0])
    tables = sorted(table.parent.glob(f"{table.stem}.by-*.csv"))
    print(f"DP evaluation of {model_file} on {len(result.hospitals)} hospitals' held-out records: "
          f"epsilon {result.epsilon:.3f} charged to each hospital's ledger (purpose {result.query.purpose})")
    from server.plots import PLOTS_DIR

    plots = sorted((Path(args.out or Path(args.run_dir) / "evaluation") / PLOTS_DIR).glob("*.png"))
    if plots:
        print(f"plots (also in the MLflow run {result.mlflow_run_id}): {', '.join(str(p) for p in plots)}")
    print("release it with: " + " ".join(f"--evaluation {p}" for p in tables))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from engines.membership_audit import audit_model
    from server.releases.membership import certificate_section, epsilon_with_audit, load_audit

    release_dir = Path(args.run_dir) / "release"
    model_file, report_file = release_dir / "model.npz", release_dir / "privacy_report.json"
    if not model_file.is_file() or not report_file.is_file():
        raise ConfigError(f"no released model at {model_file}: give the directory of a finished `fedrisk run`")
    try:
        report = json.loads(report_file.read_text())
        accounted, delta = float(report["epsilon_max"]), float(report["delta"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{report_file}: not a fedrisk privacy report") from None
    from cli.progress import Working

    with Working(f"DP membership audit of {model_file} at {args.hospitals} hospitals"):
        result = audit_model(model_file, nodes_dir=Path(args.nodes), keys_dir=Path(args.keys),
                             run_dir=Path(args.out or Path(args.run_dir) / "audit"), num_hospitals=args.hospitals,
                             epsilon=args.epsilon, purpose=args.purpose or "", tracking_uri=ws.tracking_uri(args))
    table = Path(result.files[0])
    audit = load_audit(table)
    section = certificate_section(audit, accounted_epsilon=accounted, delta=delta,
                                  with_audit=epsilon_with_audit(report, audit))
    auc = "n/a" if section["auc"] is None else f"{section['auc']:.3f}"
    se = f" ± {section['auc_se']:.3f}" if section["auc_se"] is not None else ""
    print(f"DP membership-inference audit of {model_file} on {len(result.hospitals)} hospitals' training and "
          f"held-out records: epsilon {result.epsilon:.3f} charged to each hospital's ledger (purpose "
          f"{result.query.purpose})")
    print(f"  loss-threshold attack AUC {auc}{se} (DP noise; chance is 0.5), advantage {section['advantage']:.3f}, "
          f"empirical epsilon lower bound {section['epsilon_lower_bound']:.3f} ({section['confidence']:.0%}) beside "
          f"the run's accounted epsilon {accounted:.3f} at delta {delta:g} ({section['epsilon_with_audit']:.3f} with "
          "the audit composed)")
    print(f"release it with: --audit {table}")
    return 0


def _cmd_withdraw(args: argparse.Namespace) -> int:
    release = _registry(args, read_only=True).withdraw(_chosen(args, "release_id", "--release-id", "RELEASE_ID"),
                                                       args.by, args.reason)
    print(f"withdrew {release.release_id} (run {release.run_id}): {release.withdrawn_reason}")
    print(f"each hospital node stops scoring with it: fedrisk node release withdraw --dir NODE "
          f"--release-id {release.release_id}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    releases = _registry(args, read_only=True).list()
    if args.json:
        print(json.dumps([r.to_dict() for r in releases], indent=2))
        return 0
    if not releases:
        print(f"no releases in {ws.registry_dir(args)}")
    for r in releases:
        print(f"{r.release_id:<5} {r.status:<9} {r.created[:10]}  run {r.run_id}  sha256 {r.sha256[:12]}  "
              f"{r.card.model_kind}  epsilon {r.certificate.epsilon_max:.3f}  AUC {_number(r.card.federated_auc)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    release_id = _chosen(args, "release_id", "--release-id", "RELEASE_ID")
    print(json.dumps(_registry(args, read_only=True).get(release_id).to_dict(), indent=2))
    return 0


def _login_name() -> str:
    """The login name, the default approver; "" when the system cannot tell (then it must be given)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _scored_query_options(parser: argparse.ArgumentParser, verb: str, noun: str) -> None:
    """The flags `release evaluate` and `release audit` share: both run one DP query of a run's model."""
    parser.add_argument("--run-dir", required=True, help="the run directory (`fedrisk run --out`)")
    parser.add_argument("--nodes", required=True, help="directory of hospital node directories")
    parser.add_argument("--keys", required=True, help="directory written by `fedrisk keys init`")
    parser.add_argument("--hospitals", type=int, default=3, help=f"hospitals that {verb} (default 3)")
    parser.add_argument("--epsilon", type=float, default=0.5,
                        help=f"epsilon each hospital spends on the {noun} (default 0.5)")
    parser.add_argument("--purpose", help="the consent purpose the hospitals answer under (default: the run's)")
    parser.add_argument("--out", help=f"where the {noun} run writes (default RUN_DIR/{noun})")
    parser.add_argument("--tracking-uri", default="", help=f"MLflow store the {noun} is tracked in (default: the "
                                                           "workspace's)")


def _cmd_purge(args: argparse.Namespace) -> int:
    from server.releases.retention import purge_runs

    store = args.tracking_uri or ws.workspace(args).tracking_uri
    if not args.tracking_uri and not ws.workspace(args).exists():
        raise ConfigError(f"no MLflow store in the workspace {ws.workspace(args).root}: nothing to purge (give "
                          f"--workspace, ${ws.WORKSPACE_ENV} or --tracking-uri)")
    report = purge_runs(_registry(args, store), store, args.runs_older_than_days, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(report.purged)} run(s) that ended before {report.cutoff} with "
          f"{report.artifact_bytes:,} bytes of artifacts; kept {len(report.kept_released)} behind releases and "
          f"{len(report.kept_running)} still running")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `fedrisk release evaluate|audit|create|withdraw|list|show` to the `fedrisk` parser."""
    release = commands.add_parser("release", help="released models: evaluate, audit, create, withdraw, list, show, "
                                                    "purge").add_subparsers(
        dest="release_command", required=True)
    user = _login_name()

    def with_registry(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--registry", help="registry directory: release audit log and model copies "
                                               "(default <workspace>/releases/)")
        return parser

    create = with_registry(release.add_parser("create", help="release a finished training run"))
    _positional_or_flag(create, "run_id", "--run-id", "RUN_ID", "the MLflow run id `fedrisk run` printed")
    store = create.add_mutually_exclusive_group()
    store.add_argument("--run-dir", help="a run directory made before workspaces, whose own mlflow.db holds the run "
                                         "(default: the run is in the workspace's store)")
    store.add_argument("--tracking-uri", help="the MLflow tracking URI holding the run (default: the workspace's store)")
    create.add_argument("--cutoff", help="data cut-off date YYYY-MM-DD (default: the day the run started, UTC)")
    create.add_argument("--approved-by", default=user, help=f"who approves the release (default: the login name, {user or 'unknown'})")
    create.add_argument("--evaluation", action="append", default=[], metavar="TABLE",
                        help="a DP evaluation table of the model (CSV or Parquet from `fedrisk release evaluate`, "
                             "one per group field, its query JSON beside it); required, repeatable")
    create.add_argument("--accept-miscalibration", metavar="REASON",
                        help="release although the calibration check fails (not recalibrated, offset beyond "
                             "tolerance, a band observing a rate outside it); the reason goes on the certificate")
    create.add_argument("--audit", metavar="TABLE",
                        help="the membership-inference audit table of the model (from `fedrisk release audit`, its "
                             "query JSON beside it); required unless --no-audit gives the reason")
    create.add_argument("--no-audit", metavar="REASON",
                        help="release without a privacy audit; the reason goes on the certificate")
    create.set_defaults(handler=_cmd_create)

    approve = with_registry(release.add_parser("approve", help="record one of the two approvals a release needs "
                                                "(a data scientist's and a hospital operator's, by two people)"))
    _positional_or_flag(approve, "run_id", "--run-id", "RUN_ID", "the MLflow run id `fedrisk run` printed")
    approve.add_argument("--role", required=True, choices=("data-scientist", "hospital-operator"),
                         help="the approver's role")
    approve.add_argument("--by", default=user, help=f"who approves (default: the login name, {user or 'unknown'})")
    approve.add_argument("--hospital", help="for a hospital operator: the hospital they approve for")
    approve_store = approve.add_mutually_exclusive_group()
    approve_store.add_argument("--run-dir", help="a run directory made before workspaces (its own mlflow.db)")
    approve_store.add_argument("--tracking-uri", help="the MLflow tracking URI holding the run (default: the "
                                                      "workspace's store)")
    approve.set_defaults(handler=_cmd_approve)

    evaluate = release.add_parser("evaluate", help="DP evaluation of a run's model across the hospitals "
                                  "(simulation engine): calibration and fairness tables for its model card")
    _scored_query_options(evaluate, "evaluate", "evaluation")
    evaluate.set_defaults(handler=_cmd_evaluate)

    audit = release.add_parser("audit", help="DP membership-inference audit of a run's model across the hospitals "
                               "(simulation engine): the attack's AUC and an empirical epsilon lower bound for its "
                               "certificate")
    _scored_query_options(audit, "audit", "audit")
    audit.set_defaults(handler=_cmd_audit)

    withdraw = with_registry(release.add_parser("withdraw", help="withdraw a release: it must not be used any more"))
    _positional_or_flag(withdraw, "release_id", "--release-id", "RELEASE_ID", "e.g. r3")
    withdraw.add_argument("--reason", required=True, help="why, in one line (recorded and audited)")
    withdraw.add_argument("--by", default=user, help=f"who withdraws it (default: the login name, {user or 'unknown'})")
    withdraw.set_defaults(handler=_cmd_withdraw)

    listing = with_registry(release.add_parser("list", help="every release, withdrawn ones included"))
    listing.add_argument("--json", action="store_true", help="print the releases as JSON")
    listing.set_defaults(handler=_cmd_list)

    show = with_registry(release.add_parser("show", help="a release's privacy certificate and model card (JSON)"))
    _positional_or_flag(show, "release_id", "--release-id", "RELEASE_ID", "e.g. r3 (from `fedrisk release list`)")
    show.set_defaults(handler=_cmd_show)

    purge = with_registry(release.add_parser("purge", help="retention: delete the workspace's runs (and their "
                                             "artifacts) older than N days, except those behind releases"))
    purge.add_argument("--runs-older-than-days", type=int, required=True,
                       help="delete the runs that ended more than this many days ago")
    purge.add_argument("--tracking-uri", default="", help="the MLflow store to purge (default: the workspace's)")
    purge.add_argument("--dry-run", action="store_true", help="list what would be deleted; change nothing")
    purge.set_defaults(handler=_cmd_purge)
