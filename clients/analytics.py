"""A hospital's side of a federated cohort query: check, charge, compute, noise, encrypt.

The hospital re-validates the query itself (it never relies on the server's reading), checks
that its schema releases every field the query reads for the query's purpose, and that its
ledger can afford the query, all before a record is read (`check`). On the second message
(`answer`) it charges the ledger, then reads its consented records, clamps each contribution to
the query's bounds, computes its cell statistics, adds Gaussian noise calibrated so that this
hospital's release alone is (epsilon, delta)-DP; the node encrypts and signs the noised vector.
What leaves the node: a signed contribution and the public noise multiplier.

The noise is drawn from a seed derived from the node's secret, the run, the query and a digest
of the records used: answering the same query run on the same records again repeats the same
answer (nothing new is released, nothing is charged twice); a new run id or changed records draw
fresh noise under a new charge.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from clients import encoding
from clients.data import LoadCache
from clients.deidentify import PSEUDONYM
from clients.node_state import NodeState, test_split
from federation import features as fx
from federation.errors import DataError, FedriskError, PrivacyBudgetError, ProtocolError
from federation.he_codec import CONTRIBUTOR_UNIT, HospitalKey
from federation.model import weights_digest
from federation.query import FIELDS, MEMBERSHIP_SCORE, RISK_SCORE, SCORED_FIELDS, SPLIT, SPLITS, CohortQuery
from privacy.audit import ANALYTICS_ANSWER, Digest
from privacy.consent import ConsentError
from privacy.ledger import GaussianMechanism



@dataclass(frozen=True)
class QueryAnswer:
    """What a hospital sends for one query: the noised, scaled vector (to be encrypted and signed)
    and public accounting values."""

    vector: np.ndarray
    noise_multiplier: float
    epsilon: float


def local_statistics(table: pd.DataFrame, query: CohortQuery) -> np.ndarray:
    """The hospital's exact, clamped cell statistics, flattened in `query.layout()` order.

    A record in no cell (a group value missing or outside the query's groups) and, for measures
    over a field, a record whose field is missing contribute nothing. Values are clamped into
    the query's bounds (sum, mean, rate) or its outer bins (histogram, quantiles)."""
    layout = query.layout()
    keep = np.ones(len(table), dtype=bool)
    cell = np.zeros(len(table), dtype=np.int64)
    for group in query.group_by:
        labels = FIELDS[group.field].labels(table[group.field].to_numpy())
        index = {g: i for i, g in enumerate(group.groups)}
        position = np.array([index.get(label, -1) for label in labels], dtype=np.int64)
        keep &= position >= 0
        cell = cell * len(group.groups) + np.maximum(position, 0)
    values = np.zeros(len(table))
    if query.field is not None:
        raw = table[query.field]
        values = pd.to_numeric(raw.astype("object").map(lambda v: float(v) if isinstance(v, bool) else v),
                               errors="coerce").to_numpy(dtype=float)
        keep &= ~np.isnan(values)
    cell, values = cell[keep], values[keep]
    cells = len(layout.cells)
    if query.paired:
        low, high = query.bounds  # type: ignore[misc]
        counts = np.bincount(cell, minlength=cells).astype(float)
        sums = np.bincount(cell, weights=np.clip(values, low, high) - query.centre, minlength=cells)
        return np.column_stack([counts, sums]).ravel()
    if query.bins is not None:
        edges = np.asarray(query.bins)
        bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
        flat = cell * (len(edges) - 1) + bins
        return np.bincount(flat, minlength=cells * (len(edges) - 1)).astype(float)
    return np.bincount(cell, minlength=cells).astype(float)


def model_input_count(query: CohortQuery, schema: Any) -> int:
    """How many inputs the query's model has at this hospital."""
    if query.model_features == "schema":
        from clients import encoding

        return len(encoding.feature_names(schema, query.purpose))
    return len(fx.FEATURE_NAMES)


def scored_records(query: CohortQuery, used: pd.DataFrame, model: Any, schema: Any = None) -> pd.DataFrame:
    """The records a scored query reads, each with its score under `model` (the query's, checked).

    risk_score: the held-out test split only (records no training round used), scored with the
    model's probability of delinquency. membership_score: every consented record, the training
    split and the held-out split as training drew them (`test_split`, a hash of the pseudonym,
    so each record's split is a function of the record alone), each with `split` and p(y | x),
    the probability the model gives the record's true label."""
    from federation.model import predict_proba

    held_out = test_split(used[PSEUDONYM])
    if query.field == RISK_SCORE:
        scored = used.loc[held_out].reset_index(drop=True)
        x, y = encoding.model_inputs(scored, schema, query.purpose, query.model_features)
        return scored.assign(**{RISK_SCORE: predict_proba(model, x).astype(float), fx.LABEL: y.astype(int)})
    x, y = encoding.model_inputs(used, schema, query.purpose, query.model_features)
    probability = predict_proba(model, x).astype(float)
    label = y.astype(float)
    return used.assign(**{SPLIT: np.where(held_out, SPLITS[1], SPLITS[0]), fx.LABEL: y.astype(int),
                          MEMBERSHIP_SCORE: np.where(label == 1.0, probability, 1.0 - probability)})


_USABLE_CACHE: LoadCache[tuple[pd.DataFrame, dict[str, int]]] = LoadCache()


def consented_records(state: NodeState, purpose: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """The de-identified records `purpose` may use, and exclusion counts by reason. Cached
    while the export, schema and consent withdrawals are unchanged (a withdrawal takes effect
    on the next query), so a series of queries validates the export once."""
    key = (str(state.directory), purpose, *state.inputs_stamp())

    def load() -> tuple[pd.DataFrame, dict[str, int]]:
        table, mask, excluded = state.usable(purpose)
        return table.loc[mask].reset_index(drop=True), excluded

    return _USABLE_CACHE.get(key, load)


def _data_digest(table: pd.DataFrame, query: CohortQuery) -> str:
    columns = [PSEUDONYM, *(g.field for g in query.group_by), *([query.field] if query.field else [])]
    hashed = pd.util.hash_pandas_object(table[columns].astype(str), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()[:16]


class HospitalAnalytics:
    """One hospital answering cohort queries from its node state and its copy of the CKKS key."""

    def __init__(self, state: NodeState, key: HospitalKey) -> None:
        self.state = state
        self.key = key
        self.name = state.hospital

    def _refuse(self, error: FedriskError, purpose: str) -> None:
        self.state.audit().refusal(error, purpose=purpose)
        error.audited = True  # type: ignore[attr-defined]
        raise error

    def _mechanism(self, query: CohortQuery) -> GaussianMechanism:
        return GaussianMechanism.gaussian_release(noise_multiplier=query.noise_multiplier())

    def _query_model(self, query: CohortQuery, weights: np.ndarray | None) -> Any:
        """The model a scored query names, from the weights sent with it: refused (audited) unless
        they are of the named kind's size and hash to the query's SHA-256."""
        from federation.model import load_model, num_parameters

        sha256, kind = query.model  # type: ignore[misc]
        inputs = model_input_count(query, self.state.schema())
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32).ravel()
            if weights.size != num_parameters(kind, inputs):
                self._refuse(ProtocolError(f"{self.name}: the model sent with query {query.name!r} has the wrong "
                                           "number of weights"), query.purpose)
        if weights is None or weights_digest(weights) != sha256:
            self._refuse(ProtocolError(f"{self.name}: the model sent with query {query.name!r} does not match "
                                       f"its SHA-256 {sha256[:12]}"), query.purpose)
        return load_model(kind, np.asarray(weights, dtype=np.float32), inputs)

    def _check_fields(self, query: CohortQuery) -> None:
        """Refuse a query for a purpose no consent covers, or that reads a field this hospital's
        schema withholds from the purpose (or groups ages more finely than it keeps them)."""
        schema = self.state.schema()
        if query.purpose not in schema.consent_policy().fields:
            self._refuse(ConsentError(f"{self.name}: no consent recorded in this hospital's export covers purpose "
                                      f"{query.purpose!r}, so no record may be used for it"), query.purpose)
        released = {c.target for c in schema.columns
                    if c.role in ("feature", "quasi-identifier", "label") and c.allowed_for(query.purpose)}
        needed = [g.field for g in query.group_by] + ([query.field] if query.field else [])
        if query.field in SCORED_FIELDS and query.model_features == "schema":
            # the model reads the schema's own inputs for the purpose (their release was checked
            # when the schema was loaded) and its label, which the contract's label field then names
            from clients import encoding

            try:
                encoding.input_columns(schema, query.purpose)
            except DataError as error:
                self._refuse(error, query.purpose)
            if schema.releases_label(query.purpose):  # a withheld label stays withheld
                released.add(fx.LABEL)
            elif query.field == MEMBERSHIP_SCORE:  # p(y | x) reads the label
                self._refuse(DataError(f"{self.name}: the label is not released for purpose {query.purpose!r} by "
                                       "this hospital's schema"), query.purpose)
            needed = [f for f in needed if f not in (query.field, SPLIT)]
        elif query.field in SCORED_FIELDS:  # the model reads every standard input (and p(y | x) the label)
            needed = [f for f in needed if f not in (query.field, SPLIT)] + list(fx.RAW_FEATURE_COLUMNS)
            if query.field == MEMBERSHIP_SCORE:
                needed.append(fx.LABEL)
        for field in needed:
            if field not in released:
                self._refuse(DataError(f"{self.name}: field {field!r} is not released for purpose "
                                       f"{query.purpose!r} by this hospital's schema"), query.purpose)
        age = next((c for c in schema.columns if c.target == "age"), None)
        if any(g.field == "age" for g in query.group_by) and age is not None and age.generalisation is not None \
                and age.generalisation.kind == "age-band" and 10 % (age.generalisation.size or 10):
            self._refuse(DataError(f"{self.name}: ages are generalised to {age.generalisation.size}-year bands, "
                                   "coarser than the query's 10-year bands"), query.purpose)

    def check(self, query: CohortQuery, run_id: str) -> float:
        """Before any record is read: refuse a query that reads a field this hospital's schema
        withholds from the purpose, or that its ledger cannot afford. Returns the noise
        multiplier the answer will use. Writes nothing but a refusal to the audit log."""
        self._check_fields(query)
        mechanism = self._mechanism(query)
        with self.state.ledger() as ledger:
            try:
                already = any(c.run_id == run_id and c.kind == "analytics" for c in ledger.history(query.purpose))
                after = ledger.would_spend(query.purpose, mechanism)
                budget = ledger.budget(query.purpose)
                spent = ledger.spent(query.purpose)
            except FedriskError as error:
                self._refuse(error, query.purpose)
        if after > budget.epsilon_total and not already:
            self._refuse(PrivacyBudgetError(
                f"{self.name}: query would bring purpose {query.purpose!r} to epsilon {after:.3f}, over its "
                f"budget of {budget.epsilon_total:g} (spent {spent:.3f}); refused, nothing charged"), query.purpose)
        return mechanism.noise_multiplier

    def answer(self, query: CohortQuery, run_id: str, hospitals: int,
               model_weights: np.ndarray | None = None, policy: Any = None) -> QueryAnswer:
        """Charge, compute, noise and encrypt this hospital's answer (see the module docstring).
        `hospitals` is how many answers can be summed: the federation's size from this node's own
        manifest, never the coordinator's word; each cell's statistic is clamped so that that
        many fit the slot range (a data-independent bound, so nothing about the data shows in a
        refusal). `model_weights` are the model a `risk_score` query scores with (checked against
        its digest); a `membership_score` query reads the training split too. `policy` (the node's `NodePolicy`) caps delta at 1/(10 n) and the query run's
        composed epsilon. The budget is enforced by the ledger's atomic charge."""
        self._check_fields(query)
        used, excluded = consented_records(self.state, query.purpose)
        if query.field in SCORED_FIELDS:
            used = scored_records(query, used, self._query_model(query, model_weights), self.state.schema())
        if policy is not None:
            try:
                policy.check_records(delta=query.delta, records=len(used))
            except FedriskError as error:
                self._refuse(error, query.purpose)
        mechanism = self._mechanism(query)
        digest = _data_digest(used, query)
        slot = f"query-{query.digest()}:{digest}"
        with self.state.ledger() as ledger:
            try:
                if policy is not None:
                    run_after = ledger.run_would_spend(query.purpose, run_id, mechanism, slot=slot)
                    if run_after > policy.max_epsilon_per_run + 1e-9:
                        raise PrivacyBudgetError(
                            f"{self.name}: query run {run_id} would spend epsilon {run_after:.3f} at this hospital, "
                            f"over its policy's max_epsilon_per_run {policy.max_epsilon_per_run:g}")
                charge = ledger.charge(query.purpose, mechanism, run_id=run_id, kind="analytics", actor=self.name,
                                       slot=slot, identity=slot)
            except FedriskError as error:
                self._refuse(error, query.purpose)
        layout = query.layout()
        bound = 0.5 / max(int(hospitals), 1) * layout.units  # per position, in the statistic's own units
        exact = np.clip(local_statistics(used, query), -bound, bound)
        seed = self.state.pseudonym_key().derive_seed("analytics", run_id, query.digest(), digest)
        noise = np.random.default_rng(seed).standard_normal(exact.shape) * layout.noise_scales * mechanism.noise_multiplier
        vector = np.concatenate([(exact + noise) / layout.units, [CONTRIBUTOR_UNIT]])
        epsilon = mechanism.epsilon(query.delta)
        self.state.audit().append(ANALYTICS_ANSWER, purpose=query.purpose, epsilon=charge.epsilon_after, details={
            "run": run_id, "query": query.name, "digest": Digest(query.digest()), "measure": query.measure,
            "field": query.field or "", "cells": len(layout.cells), "records-used": len(used),
            "records-excluded": excluded, "query-epsilon": round(epsilon, 6), "noise-multiplier": mechanism.noise_multiplier})
        return QueryAnswer(vector, mechanism.noise_multiplier, epsilon)
