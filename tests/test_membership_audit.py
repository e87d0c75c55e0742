"""The empirical privacy audit: the attack's figures on tables whose truth is known, the query
contract of `membership_score` and `split`, the hospitals' real answer over both splits, and the
audit on the certificate through `fedrisk release create --audit` and `release show`.

The hospitals' answers run their real code path (consented records, the training split as
training drew it, charge, noise, CKKS) without Flower's transport, as tests/test_analytics.py does;
the releases are of hand-built runs in a real MLflow store, as in tests/test_releases.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from clients.analytics import consented_records
from experiments.signals_local import approve
from server.releases import ReleaseRegistry
from clients.deidentify import PSEUDONYM
from clients.node_state import NodeState
from clients.node_state import test_split as held_out_mask
from cli.main import EXIT_USER_ERROR, main
from engines.analytics import answer_in_process
from engines.membership_audit import audit_query
from engines.provisioning import provision_nodes
from federation import features as fx
from federation.errors import ProtocolError
from federation.he_codec import HospitalKey, ServerContext
from federation.model import initial_weights, load_model, predict_proba, weights_digest
from federation.query import CohortQuery, QueryError
from server.analytics import QueryResult, estimate, write_result
from server.releases.membership import MEMBERSHIP_BINS, NOT_AUDITED, audit_from_table
from test_releases import APPROVER, HandBuiltStore, _evaluation_files, _honest_report

PURPOSE = "credit-risk-research"
DELTA = 1e-6


def _table(members, non_members, se: float = 1e-9, edges=(0.0, 0.5, 1.0)) -> pd.DataFrame:
    """An audit table of given per-bin counts, as `estimate` lays it out."""
    rows = []
    for split, counts in (("train", members), ("held-out", non_members)):
        rows += [{"split": split, "bin_low": edges[b], "bin_high": edges[b + 1], "count": float(c), "se": se}
                 for b, c in enumerate(counts)]
    return pd.DataFrame(rows)


# --- the attack's figures -------------------------------------------------------------------------

def test_a_known_attack_gives_its_auc_advantage_and_an_epsilon_bound_just_below_its_true_ratio() -> None:
    # Above the threshold 0.5: 75% of members, 25% of non-members: TPR/FPR = 3, so the best bound is log 3.
    audit = audit_from_table(_table([250_000, 750_000], [750_000, 250_000]), delta=DELTA)
    assert audit.auc == pytest.approx(0.75) and audit.advantage == pytest.approx(0.5)
    assert math.log(3) - 0.02 < audit.epsilon_lower_bound < math.log(3)
    assert audit.members == audit.non_members == 1_000_000
    assert audit.roc[0][1:] == (1.0, 1.0) and audit.roc[1] == (0.5, 0.75, 0.25) and audit.roc[-1][1:] == (0.0, 0.0)


def test_a_perfect_attack_is_bounded_by_clopper_pearson_at_the_stated_confidence() -> None:
    audit = audit_from_table(_table([0, 1000], [1000, 0]), delta=DELTA)
    # one threshold, two rates: 5% split in two, half of each for sampling (Clopper-Pearson at 0 or n of n)
    t = (0.05 / 2 / 2) ** (1 / 1000)
    assert audit.auc == 1.0 and audit.advantage == 1.0 and audit.confidence == 0.95
    assert audit.epsilon_lower_bound == pytest.approx(math.log((t - DELTA) / (1 - t)), rel=1e-6)


def test_an_attack_that_cannot_tell_members_from_non_members_bounds_nothing() -> None:
    rng = np.random.default_rng(1)
    counts = rng.multinomial(40_000, np.full(17, 1 / 17))
    noise = rng.normal(0.0, 15.0, (2, 17))
    audit = audit_from_table(_table(counts + noise[0], counts * 0.25 + noise[1], se=15.0, edges=MEMBERSHIP_BINS),
                             delta=DELTA)
    assert abs(audit.auc - 0.5) < 3 * audit.auc_se and audit.epsilon_lower_bound == 0.0
    assert audit.advantage < 0.02 and audit.auc_se > 0 and audit.auc_sampling_se > 0


def test_noised_counts_below_zero_are_clipped_for_the_roc_and_the_bound_widens_with_the_noise() -> None:
    members, non_members = [100.0, -30.0, 5000.0, 40000.0], [400.0, 250.0, 3000.0, 6000.0]
    edges = (0.0, 0.9, 0.99, 0.999, 1.0)
    quiet = audit_from_table(_table(members, non_members, se=1e-9, edges=edges), delta=DELTA)
    noisy = audit_from_table(_table(members, non_members, se=40.0, edges=edges), delta=DELTA)
    tpr = [r[1] for r in quiet.roc]
    assert all(0.0 <= v <= 1.0 for v in tpr) and tpr == sorted(tpr, reverse=True)
    assert quiet.roc[1][1] == pytest.approx(45000 / 45100)  # the -30 bin counts as empty
    assert 0.0 < noisy.epsilon_lower_bound < quiet.epsilon_lower_bound
    assert noisy.auc_se > 10 * quiet.auc_se


def test_the_auc_se_is_the_scatter_of_the_auc_under_the_dp_noise() -> None:
    rng = np.random.default_rng(3)
    members = 6000 * stats.expon(scale=0.05).pdf(np.linspace(0, 1, 17)) / 20
    non_members = members[::-1] * 0.3 + 60
    truth = audit_from_table(_table(members, non_members, edges=MEMBERSHIP_BINS), delta=DELTA)
    draws = [audit_from_table(_table(members + rng.normal(0, 12.0, 17), non_members + rng.normal(0, 12.0, 17),
                                     se=12.0, edges=MEMBERSHIP_BINS), delta=DELTA) for _ in range(60)]
    spread = np.std([d.auc for d in draws])
    assert 0.7 < np.mean([d.auc_se for d in draws]) / spread < 1.4
    assert abs(np.mean([d.auc for d in draws]) - truth.auc) < 3 * spread / np.sqrt(60) + 1e-3


# --- the query contract ------------------------------------------------------------------------

MODEL = {"sha256": "a" * 64, "kind": "logreg"}
BASE = {"name": "q", "purpose": PURPOSE, "epsilon": 0.5}


def test_the_audit_query_is_a_histogram_of_membership_score_by_split() -> None:
    query = audit_query("a" * 64, "logreg")
    assert query.field == "membership_score" and query.measure == "histogram" and query.bins == MEMBERSHIP_BINS
    assert [(g.field, g.groups) for g in query.group_by] == [("split", ("train", "held-out"))]
    assert query.model == ("a" * 64, "logreg") and query.layout().length == 2 * 17 + 1
    assert CohortQuery.from_mapping(json.loads(query.to_json())) == query  # what a hospital re-reads


@pytest.mark.parametrize(("fields", "message"), [
    ({"measure": "count", "group-by": ["split"]}, "group-by 'split' applies only to field 'membership_score'"),
    ({"measure": "histogram", "field": "risk_score", "bins": [0, 1], "model": MODEL, "group-by": ["split"]},
     "group-by 'split' applies only to field 'membership_score'"),
    ({"measure": "rate", "field": "split"}, "field 'split' is the training or held-out split"),
    ({"measure": "histogram", "field": "membership_score", "bins": [0, 1], "group-by": ["split"]},
     "field 'membership_score' needs 'model: {sha256"),
    ({"measure": "mean", "field": "age", "bounds": [0, 99], "model": MODEL},
     "'model' applies only to fields 'risk_score' and 'membership_score'"),
    ({"measure": "count", "group-by": [{"split": ["train", "canaries"]}]}, "group 'canaries' of 'split' is not in"),
])
def test_split_and_membership_score_are_refused_where_they_mean_nothing(fields, message) -> None:
    with pytest.raises(QueryError, match="^query: " + message.replace("(", r"\(").replace("{", r"\{")) as refused:
        CohortQuery.from_mapping({**BASE, **fields})
    assert "\n" not in str(refused.value)


# --- the hospitals' answer -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nodes(federation_data, keys, tmp_path_factory) -> list[NodeState]:
    return provision_nodes(federation_data.files[0].parent, keys.hospital_context,
                           tmp_path_factory.mktemp("membership") / "nodes", purposes={PURPOSE: (100.0, 1e-6)})


def test_hospitals_answer_over_both_splits_as_training_drew_them_with_p_of_the_true_label(nodes, keys) -> None:
    weights = initial_weights("logreg", 5, 40)
    query = audit_query(weights_digest(weights), "logreg", epsilon=1.0)
    table = answer_in_process(nodes, HospitalKey.load(keys.hospital_context),
                              ServerContext.load(keys.server_context.parent), query, "audit", weights)
    records = pd.concat([consented_records(node, PURPOSE)[0] for node in nodes], ignore_index=True)
    held_out = held_out_mask(records[PSEUDONYM])
    p = predict_proba(load_model("logreg", weights, 40), fx.encode_features(records)).astype(float)
    truth = np.where(fx.encode_labels(records) == 1, p, 1 - p)
    for split, mask in (("train", ~held_out), ("held-out", held_out)):
        rows = table[table["split"] == split]
        exact = np.histogram(np.clip(truth[mask], 0, 1), bins=MEMBERSHIP_BINS)[0]
        assert (np.abs(rows["count"].to_numpy() - exact) <= 5 * rows["se"].to_numpy()).all(), split
    assert abs(table.loc[table["split"] == "train", "count"].sum() - (~held_out).sum()) < 0.02 * len(records)
    other = initial_weights("logreg", 6, 40)
    with pytest.raises(ProtocolError, match="does not match its SHA-256"):
        answer_in_process(nodes, HospitalKey.load(keys.hospital_context),
                          ServerContext.load(keys.server_context.parent), query, "audit-other", other)


# --- the certificate -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> HandBuiltStore:
    return HandBuiltStore(tmp_path_factory.mktemp("audited") / "run")


def _audit_file(directory: Path, digest: str, *, separation: float, members: int = 8000, non_members: int = 2000,
                run_id: str = "membership-audit-1a2b") -> Path:
    """An audit table and its query JSON as `fedrisk release audit` writes them: the exact
    histogram of a sample of p(y | x), members' losses `separation` times the non-members', plus
    the Gaussian noise `estimate` declares (3 hospitals at the query's noise multiplier)."""
    rng = np.random.default_rng(11)
    query = audit_query(digest, "logreg", epsilon=0.5)
    z = query.noise_multiplier()
    loss = {"train": rng.exponential(0.1 * separation, members), "held-out": rng.exponential(0.1, non_members)}
    exact = np.concatenate([np.histogram(np.exp(-loss[s]), bins=MEMBERSHIP_BINS)[0] for s in ("train", "held-out")])
    table = estimate(query, exact + rng.normal(0.0, z * np.sqrt(3), exact.shape), z, 3)
    result = QueryResult(query, run_id, table, ["h0", "h1", "h2"], z, query.epsilon)
    return Path(write_result(result, directory / f"{run_id}.csv")[0])


def test_the_audit_appears_on_the_certificate_beside_the_accounted_epsilon(store: HandBuiltStore, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_id, registry = store.run(_honest_report()), str(tmp_path / "registry")
    create = ["release", "create", run_id, "--run-dir", str(store.run_dir), "--registry", registry,
              "--approved-by", APPROVER, *_evaluation_files(tmp_path / "evaluation", store.digest)]
    approve(ReleaseRegistry(store.tracking_uri, Path(registry)), run_id)
    assert main(create) == EXIT_USER_ERROR  # neither an audit nor a reason to go without one
    assert "a release needs an empirical privacy audit of its model" in capsys.readouterr().err
    other = _audit_file(tmp_path / "other", "b" * 64, separation=0.95)
    assert main([*create, "--audit", str(other)]) == EXIT_USER_ERROR
    assert "the privacy audit scored model bbbbbbbbbbbb" in capsys.readouterr().err

    table = _audit_file(tmp_path / "audit", store.digest, separation=0.9)
    assert main([*create, "--audit", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "privacy audit (membership inference, cohort query membership-audit-1a2b" in printed
    assert main(["release", "show", "r1", "--registry", registry]) == 0
    section = json.loads(capsys.readouterr().out)["certificate"]["privacy_audit"]
    figures = audit_from_table(pd.read_csv(table), delta=_honest_report()["delta"])
    assert section["audited"] is True and section["attack"].startswith("loss threshold")
    assert section["auc"] == pytest.approx(figures.auc) and 0.5 < section["auc"] < 0.6 and section["auc_se"] > 0
    assert section["advantage"] == pytest.approx(figures.advantage)
    assert section["epsilon_lower_bound"] == pytest.approx(figures.epsilon_lower_bound)
    assert section["epsilon_lower_bound"] < section["accounted_epsilon"] == _honest_report()["epsilon_max"]
    assert section["confidence"] == 0.95 and section["query_epsilon"] == 0.5 and section["charged"] is True
    assert section["accounted_epsilon"] < section["epsilon_with_audit"] < section["accounted_epsilon"] + 0.5
    assert "average-case lower bound, not a guarantee" in section["statement"]
    assert f"against the accounted epsilon {section['accounted_epsilon']:.3f}" in section["statement"]


def test_a_release_without_an_audit_says_so_and_why_and_an_impossible_audit_is_refused(
        store: HandBuiltStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = str(tmp_path / "registry")
    evaluation = _evaluation_files(tmp_path / "evaluation", store.digest)
    # members' losses a tenth of the non-members' over many records: a bound above any epsilon the run accounts
    leaky = _audit_file(tmp_path / "leaky", store.digest, separation=0.05, members=200_000, non_members=50_000)
    run_id = store.run(_honest_report())
    create = ["release", "create", run_id, "--run-dir", str(store.run_dir), "--registry", registry,
              "--approved-by", APPROVER, *evaluation]
    approve(ReleaseRegistry(store.tracking_uri, Path(registry)), run_id)
    assert main([*create, "--audit", str(leaky)]) == EXIT_USER_ERROR
    assert "exceeds the accounted epsilon" in capsys.readouterr().err
    assert main([*create, "--audit", str(leaky), "--no-audit", "pilot"]) == EXIT_USER_ERROR
    assert "not both" in capsys.readouterr().err
    assert main([*create, "--no-audit", "pilot release for one bank"]) == 0
    assert f"privacy audit: {NOT_AUDITED}" in capsys.readouterr().out
    assert main(["release", "show", "r1", "--registry", registry]) == 0
    section = json.loads(capsys.readouterr().out)["certificate"]["privacy_audit"]
    assert section == {"audited": False, "statement": NOT_AUDITED, "reason": "pilot release for one bank",
                       "by": APPROVER}
