"""Federated DP cohort statistics: query validation, clamping, noise that matches its declared
standard error, accuracy at epsilon 1, consent, and budgets charged (or refused) everywhere.

The statistical tests drive the hospitals' real code path (charge, read consented records,
clamp, noise, CKKS-encrypt), the server's ciphertext sum and a key holder's decryption, without
Flower's transport; the protocol tests run the same through Flower's simulation engine and the
`fedrisk analytics` command.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.analytics import consented_records, local_statistics
from clients.deidentify import PSEUDONYM
from clients.node_state import NodeState
from clients.node_state import test_split as held_out_mask
from engines.analytics import answer_in_process, run_query
from engines.provisioning import provision_nodes
from cli.main import main
from federation.errors import PrivacyBudgetError, ProtocolError
from federation.features import encode_features
from federation.he_codec import HospitalKey, ServerContext
from federation.model import initial_weights, load_model, predict_proba, weights_digest
from federation.query import FIELDS, CohortQuery, QueryError
from privacy.audit import AuditLog
from privacy.consent import ConsentError

PURPOSE = "credit-risk-research"
BASE = {"name": "q", "purpose": PURPOSE, "epsilon": 1.0}


def _query(**fields: object) -> CohortQuery:
    return CohortQuery.from_mapping({**BASE, **fields})


@pytest.fixture(scope="module")
def nodes(federation_data, keys, tmp_path_factory) -> list[NodeState]:
    """Three hospital nodes with room for many queries; 'marketing' is a purpose no patient consented to."""
    return provision_nodes(federation_data.files[0].parent, keys.hospital_context,
                           tmp_path_factory.mktemp("analytics") / "nodes",
                           purposes={PURPOSE: (1e6, 1e-6), "applicant-scoring": (1e6, 1e-6), "marketing": (100.0, 1e-6)})


def _answer(nodes: list[NodeState], keys, query: CohortQuery, run_id: str,
            weights: np.ndarray | None = None) -> pd.DataFrame:
    return answer_in_process(nodes, HospitalKey.load(keys.hospital_context),
                             ServerContext.load(keys.server_context.parent), query, run_id, weights)


def _truth(nodes: list[NodeState], query: CohortQuery) -> pd.DataFrame:
    """The exact answer, computed independently with pandas from the records each node may use."""
    table = pd.concat([consented_records(node, query.purpose)[0] for node in nodes], ignore_index=True)
    keys = [g.field for g in query.group_by]
    for key in keys:  # the public group labels: "40-49", "yes", ...
        table[key] = FIELDS[key].labels(table[key].to_numpy())
    if query.field is None:
        return table.groupby(keys).size().rename("truth").reset_index()
    values = table[query.field].astype(float)
    if query.bounds is not None:
        values = values.clip(*query.bounds)
    grouped = table.assign(v=values).groupby(keys)["v"]
    return grouped.agg(truth="mean", n="size").reset_index()


# --- malformed queries ----------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "message"), [
    ({"measure": "mean", "field": "blood_type", "bounds": [0, 1]}, "'blood_type' is not a field"),
    ({"measure": "count", "group-by": ["total_charges"]}, "group-by 'total_charges' is numeric, not categorical"),
    ({"measure": "mean", "field": "out_of_pocket"}, "needs 'bounds: [low, high]'"),
    ({"measure": "sum", "field": "out_of_pocket", "bounds": [5, 5]}, "low < high"),
    ({"measure": "count", "epsilon": 0}, "epsilon must be > 0"),
    ({"measure": "count", "epsilon": -1.0}, "epsilon must be > 0"),
    ({"measure": "count", "group-by": ["zip3"]}, "'zip3' is free text with no public domain"),
    ({"measure": "count", "group-by": [{"insurance_type": ["private", "blue cross"]}]},
     "'blue cross' of 'insurance_type' is not in its public domain"),
    ({"measure": "rate", "field": "total_charges"}, "'rate' needs a yes/no field"),
    ({"measure": "count", "group-by": ["national_id"]}, "identifier"),
    ({"measure": "histogram", "field": "bmi", "bins": [30, 20]}, "strictly increasing"),
    ({"measure": "quantiles", "field": "bmi", "bins": [10, 20, 30], "quantiles": [1.5]}, "strictly between 0 and 1"),
    ({"measure": "median"}, "measure must be one of"),
    ({"measure": "count", "where": "age > 50"}, "unknown key 'where'"),
])
def test_a_malformed_query_is_refused_with_a_line_naming_its_mistake(fields, message) -> None:
    with pytest.raises(QueryError, match="^query: ") as caught:
        _query(**fields)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_cli_refuses_a_malformed_query_file_and_leaves_nothing_behind(tmp_path: Path, keys, capsys) -> None:
    query = tmp_path / "bad.yaml"
    query.write_text("name: by-region\npurpose: credit-risk-research\nepsilon: 1\nmeasure: count\ngroup-by: [zip3]\n")
    out = tmp_path / "run"
    code = main(["analytics", "run", str(query), "--data", str(tmp_path), "--keys", str(keys.server_context.parent),
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"fedrisk: error: {query}: group-by 'zip3'") and "\n" not in err
    assert not out.exists()


# --- the mechanism --------------------------------------------------------------------------------

def test_contributions_are_clamped_to_the_declared_bounds_and_bins() -> None:
    table = pd.DataFrame({"sex": ["F", "F", "M", "M", "X"], "out_of_pocket": [100.0, 1e9, -50.0, np.nan, 10.0]})
    mean = _query(measure="mean", field="out_of_pocket", bounds=[0, 1000], **{"group-by": ["sex"]})
    counts_and_sums = local_statistics(table, mean).reshape(2, 2)
    # F: 100 and 1e9 -> 1000; centred on 500. M: -50 -> 0, the missing value is left out. 'X' is in no group.
    assert counts_and_sums.tolist() == [[2, (100 - 500) + (1000 - 500)], [1, 0 - 500]]
    histogram = _query(measure="histogram", field="out_of_pocket", bins=[0, 10, 1000])
    assert local_statistics(table, histogram).tolist() == [1, 3]  # -50 into the first bin, 1e9 into the last


def test_repeated_answers_scatter_as_their_declared_standard_error(nodes, keys) -> None:
    """Counts in 100 cells over 25 independently noised answers: standardised errors have mean 0 and
    standard deviation 1; rates' delta-method errors match and their 95% intervals cover the truth."""
    count = _query(name="counts", measure="count",
                   **{"group-by": ["age", "insurance_type", "sex"], "suppress-below": 0})
    truth = _truth(nodes, count)
    z_counts = []
    for k in range(25):
        table = _answer(nodes, keys, count, f"noise-count-{k}").merge(truth, how="left").fillna({"truth": 0})
        z_counts.append((table["count"] - table["truth"]) / table["se"])
    z = np.concatenate(z_counts)
    assert len(z) == 2500
    assert abs(z.mean()) < 5 / math.sqrt(len(z))
    assert 0.93 < z.std() < 1.07

    rate = _query(name="rates", measure="rate", field="hypertension", **{"group-by": ["age", "sex"]})
    truth = _truth(nodes, rate)
    z_rates, covered = [], []
    for k in range(25):
        table = _answer(nodes, keys, rate, f"noise-rate-{k}").merge(truth)
        table = table[table["n"] >= 300]
        z_rates.append((table["rate"] - table["truth"]) / table["se"])
        covered.append((table["ci95_low"] <= table["truth"]) & (table["truth"] <= table["ci95_high"]))
    z, covered = np.concatenate(z_rates), np.concatenate(covered)
    assert len(z) >= 200
    assert 0.88 < z.std() < 1.12
    assert 0.9 < covered.mean() <= 1.0


def test_a_rate_over_cells_of_a_thousand_records_is_within_five_percent_at_epsilon_one(nodes, keys) -> None:
    query = _query(name="hypertension", measure="rate", field="hypertension", **{"group-by": ["sex", "area_type"]})
    table = _answer(nodes, keys, query, "accuracy").merge(_truth(nodes, query))
    large = table[table["n"] >= 1000]
    assert len(large) >= 4
    relative = (large["rate"] - large["truth"]).abs() / large["truth"]
    assert relative.max() <= 0.05, large
    assert (1.96 * large["se"] / large["rate"]).max() <= 0.05  # and the declared 95% interval says as much


def test_a_query_for_a_purpose_no_patient_consented_to_is_refused_before_any_record_is_read(nodes, keys) -> None:
    query = CohortQuery.from_mapping({**BASE, "name": "marketing-count", "purpose": "marketing", "measure": "count",
                                      "group-by": ["sex"]})
    with pytest.raises(ConsentError, match="hospital_00: no consent recorded in this hospital's export covers "
                                           "purpose 'marketing'"):
        _answer(nodes, keys, query, "marketing")
    node = nodes[0]
    with node.ledger() as ledger:
        assert ledger.history("marketing") == []
    actions = [e.action for e in AuditLog(node.audit_path, role="test", identity="test").entries()
               if e.purpose == "marketing"]
    assert actions == ["refusal"]  # refused and audited; no data.load, no analytics.answer


def test_only_records_consenting_to_the_purpose_are_counted(nodes, keys) -> None:
    query = CohortQuery.from_mapping({**BASE, "name": "scoring-count", "purpose": "applicant-scoring",
                                      "measure": "count", "group-by": ["sex"]})
    table = _answer(nodes, keys, query, "scoring").merge(_truth(nodes, query))
    everyone = sum(len(pd.read_parquet(node.data_file)) for node in nodes)
    assert table["truth"].sum() < 0.8 * everyone  # a real share of patients did not consent to scoring
    assert ((table["count"] - table["truth"]).abs() <= 5 * table["se"]).all()
    used = sum(e.details["records-used"] for node in nodes for e in AuditLog(node.audit_path, role="t", identity="t")
               .entries() if e.action == "analytics.answer" and e.details["run"] == "scoring")
    assert used == table["truth"].sum()


QUERIES = Path(__file__).resolve().parents[1] / "experiments" / "queries"


def test_histograms_and_quantiles_land_on_the_exact_answer(nodes, keys) -> None:
    histogram = CohortQuery.load(QUERIES / "charges_distribution.yaml")
    table = _answer(nodes, keys, histogram, "histogram")
    records = pd.concat([consented_records(node, PURPOSE)[0] for node in nodes], ignore_index=True)
    edges = np.asarray(histogram.bins)
    for sex, rows in table.groupby("sex"):
        values = records.loc[records["sex"] == sex, "total_charges"].clip(edges[0], edges[-1])
        exact = np.histogram(values, bins=edges)[0]
        assert (np.abs(rows["count"].to_numpy() - exact) <= 5 * rows["se"].to_numpy()).all()

    quartiles = CohortQuery.load(QUERIES / "charges_quartiles.yaml")
    table = _answer(nodes, keys, quartiles, "quartiles")
    assert len(table) == 5 * 3 and (table["ci95_low"] <= table["quantile"]).all()
    widths = np.diff(quartiles.bins)
    for row in table.itertuples():
        values = records.loc[records["insurance_type"] == row.insurance_type, "total_charges"]
        exact = float(np.quantile(values.clip(quartiles.bins[0], quartiles.bins[-1]), row.level))
        width = widths[min(np.searchsorted(quartiles.bins, exact, side="right") - 1, len(widths) - 1)]
        # Read off a histogram: exact to within the bin holding it, plus the DP interval.
        assert row.ci95_low - width <= exact <= row.ci95_high + width


def test_a_model_is_evaluated_under_dp_on_held_out_records_only(nodes, keys) -> None:
    weights = initial_weights("logreg", 5, 40)
    bins = [round(0.05 * k, 2) for k in range(21)]
    query = _query(name="evaluation-by-sex", measure="histogram", field="risk_score", bins=bins,
                   model={"sha256": weights_digest(weights), "kind": "logreg"},
                   **{"group-by": ["sex", "delinquent_90d_12m"], "suppress-below": 0})
    table = _answer(nodes, keys, query, "evaluation", weights)
    held_out = pd.concat([(lambda t: t.loc[held_out_mask(t[PSEUDONYM])])(consented_records(node, PURPOSE)[0])
                          for node in nodes], ignore_index=True)
    scores = predict_proba(load_model("logreg", weights, 40), encode_features(held_out))
    for (sex, label), rows in table.groupby(["sex", "delinquent_90d_12m"]):
        mask = (held_out["sex"] == sex).to_numpy() & (held_out["delinquent_90d_12m"] == (label == "yes")).to_numpy()
        exact = np.histogram(scores[mask], bins=bins)[0]
        assert (np.abs(rows["count"].to_numpy() - exact) <= 5 * rows["se"].to_numpy()).all()
    assert abs(table["count"].sum() - len(held_out)) < 5 * np.sqrt((table["se"] ** 2).sum())

    other = initial_weights("logreg", 6, 40)
    with pytest.raises(ProtocolError, match="does not match its SHA-256"):
        _answer(nodes, keys, query, "evaluation-wrong-model", other)


def test_every_shipped_query_file_is_valid() -> None:
    files = sorted(QUERIES.glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert CohortQuery.load(path).name


# --- the protocol, in Flower --------------------------------------------------------------------

def test_an_overspending_query_is_refused_everywhere_and_an_affordable_one_is_charged_everywhere(
        federation_data, keys, tmp_path: Path, capsys) -> None:
    nodes_dir = tmp_path / "nodes"
    states = provision_nodes(federation_data.files[0].parent, keys.hospital_context, nodes_dir,
                             purposes={PURPOSE: (3.0, 1e-6)})
    with states[1].ledger() as ledger:
        ledger.set_budget(PURPOSE, 0.5, 1e-6)
    query = tmp_path / "delinquency.yaml"
    query.write_text("name: delinquency-by-age\npurpose: credit-risk-research\nepsilon: 1.0\nmeasure: rate\n"
                     "field: delinquent_90d_12m\ngroup-by: [age]\n")
    keys_dir = str(keys.server_context.parent)

    with pytest.raises(PrivacyBudgetError, match="hospital_01: query would bring purpose 'credit-risk-research' "
                                                 "to epsilon 1.0[0-9]*, over its budget of 0.5"):
        run_query(query, nodes_dir=nodes_dir, keys_dir=keys_dir, run_dir=tmp_path / "refused")
    for state in states:
        with state.ledger() as ledger:
            assert ledger.history(PURPOSE) == []  # refused for all: nothing charged anywhere
    server_log = AuditLog(tmp_path / "refused" / "server_audit.sqlite", role="t", identity="t").entries()
    assert [e.action for e in server_log] == ["refusal"]

    with states[1].ledger() as ledger:
        ledger.set_budget(PURPOSE, 3.0, 1e-6)
    table_file = tmp_path / "out" / "delinquency.parquet"
    assert main(["analytics", "run", str(query), "--nodes", str(nodes_dir), "--keys", keys_dir,
                 "--out", str(tmp_path / "run"), "--table", str(table_file)]) == 0
    printed = capsys.readouterr().out
    assert "delinquency-by-age" in printed and "90+" in printed and "ci95_low" in printed
    table = pd.read_parquet(table_file)
    assert list(table["age"]) == ["0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80-89", "90+"]
    assert set(table.columns) >= {"rate", "se", "ci95_low", "ci95_high", "records", "suppressed"}
    certificate = json.loads(table_file.with_suffix(".json").read_text())
    assert certificate["privacy"]["epsilon"] == pytest.approx(1.0, abs=0.01)
    spent = []
    for state in states:
        with state.ledger() as ledger:
            history = ledger.history(PURPOSE)
            spent.append(ledger.spent(PURPOSE))
        assert [(c.kind, c.mechanism.noise_multiplier) for c in history] == [
            ("analytics", certificate["privacy"]["noise_multiplier"])]
    assert spent == pytest.approx([1.0] * 3, abs=0.01)

    # The same query run again on the same records repeats its answer (the same DP noise; only the
    # decryption's flooding, a couple of records per cell, differs) and charges nothing more.
    parsed = CohortQuery.load(query)
    again = _answer(states, keys, parsed, parsed.default_run_id())
    # two independent floodings of ~1.5 records per sum (README: flooding's cost to a cohort count):
    # their difference moves a rate by at most ~18 records / the cell's records at 6 sigma
    flooding = 18.0 / table["records"].clip(lower=1)
    assert (((again["rate"] - table["rate"]).abs() < 0.5 * table["se"] + flooding) | table["suppressed"]).all()
    assert (again["suppressed"] == table["suppressed"]).all()
    for state in states:
        with state.ledger() as ledger:
            assert len(ledger.history(PURPOSE)) == 1
