"""The empirical privacy audit of a released model across the hospitals, for its certificate.

One cohort query does it: a histogram of the model's `membership_score` (p(y | x), the
probability of each record's true label) over `MEMBERSHIP_BINS`, grouped by `split` (training or
held-out), at every hospital. It is a DP histogram like any other, charged once to every
hospital's ledger before it is computed. The attack's AUC, advantage and empirical epsilon lower
bound are post-processing of that one DP table (`server.releases.membership`).

    .venv/bin/fedrisk release audit --run-dir runs/x --nodes runs/x/nodes --keys runs/x/keys --epsilon 0.5
"""

from __future__ import annotations

from pathlib import Path


from engines.analytics import run_query
from federation.query import MEMBERSHIP_SCORE, SPLIT, CohortQuery
from server.analytics import QueryResult
from server.releases.membership import MEMBERSHIP_BINS

DEFAULT_AUDIT_EPSILON = 0.5


def audit_query(sha256: str, kind: str, *, epsilon: float = DEFAULT_AUDIT_EPSILON,
                purpose: str = "credit-risk-research", name: str = "membership-audit",
                features: str = "standard") -> CohortQuery:
    """The membership audit query for the model with this SHA-256 and kind."""
    return CohortQuery.from_mapping({
        "name": name, "purpose": purpose, "epsilon": epsilon, "measure": "histogram", "field": MEMBERSHIP_SCORE,
        "bins": list(MEMBERSHIP_BINS), "model": {"sha256": sha256, "kind": kind, "features": features},
        "suppress-below": 0, "group-by": [SPLIT]}, source=name)


def audit_model(model_file: Path, *, nodes_dir: Path, keys_dir: Path, run_dir: Path, num_hospitals: int,
                epsilon: float = DEFAULT_AUDIT_EPSILON, kind: str = "mlp", tracking_uri: str = "",
                purpose: str = "") -> QueryResult:
    """Run the audit query for `model_file` (a release's model.npz) in the simulation engine; its
    table is `result.files[0]` (its query JSON beside it), what `release create --audit` takes."""
    from engines.model_evaluation import ReleasedModel

    model = ReleasedModel.load(model_file, kind)
    query = audit_query(model.sha256, model.kind, epsilon=epsilon, purpose=purpose or model.purpose,
                        features=model.features)
    return run_query(query, nodes_dir=nodes_dir, keys_dir=keys_dir, run_dir=run_dir, num_hospitals=num_hospitals,
                     tracking_uri=tracking_uri, model_file=model_file)
