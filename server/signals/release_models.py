"""Response bodies for releases. The certificate and model card are published with the very
dataclasses `server.releases.certificates` defines (pydantic reads their type hints), so the OpenAPI
schema cannot drift from what the registry stores."""

from __future__ import annotations

from pydantic import BaseModel, Field

from server.releases.certificates import ModelCard, PrivacyCertificate

Certificate = PrivacyCertificate
ModelCardView = ModelCard


class ReleaseSummary(BaseModel):
    """One release in a listing: what it is, its guarantee, and how well it scores."""

    release_id: str
    status: str = Field(description="active, or withdrawn (never served to banks)")
    model_sha256: str
    model_kind: str
    purpose: str
    data_cutoff: str
    issued: str
    hospitals: int
    epsilon_max: float = Field(description="per-patient epsilon of the release (max over hospitals)")
    delta: float
    federated_auc: float | None
    federated_brier: float | None
    withdrawn_reason: str | None = Field(default=None, description="why it was withdrawn (not shown to banks)")
    at_hospitals: dict[str, str] = Field(default_factory=dict, description=(
        "each registered hospital's state of the release, as its node reports it (asked at most every 30 s): "
        "active, withdrawn, not-installed or unreachable"))
    scorable: bool = Field(default=False, description="whether any registered hospital can score with it now")


class ReleaseDetail(ReleaseSummary):
    """A release with its full privacy certificate and model card."""

    certificate: Certificate
    model_card: ModelCardView
