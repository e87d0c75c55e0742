"""Releases: the registry (`registry`), privacy certificates and model cards (`certificates`), a
release's DP evaluation (`dp_evaluation`) and a finished run's release artifacts (`run_artifacts`).

The registry's names are re-exported here, so `from server.releases import ReleaseRegistry` reads
as it always has."""

from server.releases.registry import (
    RELEASE_AUDIT_FILE,
    STATUS_ACTIVE,
    STATUS_WITHDRAWN,
    Release,
    ReleaseError,
    ReleaseNotFound,
    ReleaseRefused,
    ReleaseRegistry,
    release_id_of,
)

__all__ = ["RELEASE_AUDIT_FILE", "STATUS_ACTIVE", "STATUS_WITHDRAWN", "Release", "ReleaseError", "ReleaseNotFound",
           "ReleaseRefused", "ReleaseRegistry", "release_id_of"]
