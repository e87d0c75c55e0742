"""Releases as the signals service serves them, read from `server.releases.ReleaseRegistry`.

The registry is the record (MLflow Model Registry plus its release audit); this module decides
who sees what: a bank sees active releases only, and a withdrawn one is gone for it at once (left
out of listings, 410 by id, scores refused). Other readers see every release with its status.

Reading a release from MLflow costs a few milliseconds, which every score request would pay, so
views are cached; the cache is keyed on the registry's audit anchor (`release_audit.sqlite.head`).
The registry appends to that log on every create and withdrawal, and each append replaces the
anchor file, so one `stat` per request notices any change made by any process (the CLI included)
and the next request reads the registry afresh.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.releases.certificates import ModelCard, PrivacyCertificate
from server.releases import RELEASE_AUDIT_FILE, STATUS_ACTIVE
from server.signals.release_models import ReleaseDetail, ReleaseSummary

if TYPE_CHECKING:
    from server.releases import Release

ANCHOR_SUFFIX = ".head"  # privacy.audit: the anchor file an AuditLog replaces on every append


class ReleaseNotFound(LookupError):
    """No release with that id."""


class ReleaseGone(LookupError):
    """The release was withdrawn: not served to banks, not withdrawable again."""


@dataclass(frozen=True)
class ReleaseView:
    """A release's id, status, certificate and card, as the API shows them."""

    release_id: str
    status: str
    certificate: PrivacyCertificate
    card: ModelCard
    withdrawn_reason: str | None = None

    def summary(self) -> ReleaseSummary:
        c, card = self.certificate, self.card
        return ReleaseSummary(
            release_id=self.release_id, status=self.status, model_sha256=c.model_sha256, model_kind=card.model_kind,
            purpose=c.purpose, data_cutoff=c.data_cutoff, issued=c.issued, hospitals=c.hospitals,
            epsilon_max=c.epsilon_max, delta=c.delta, federated_auc=card.federated_auc,
            federated_brier=card.federated_brier, withdrawn_reason=self.withdrawn_reason)

    def detail(self) -> ReleaseDetail:
        return ReleaseDetail(**self.summary().model_dump(), certificate=self.certificate, model_card=self.card)


class ReleaseCatalogue:
    """Read and withdraw releases of the registry at `registry_dir` / `tracking_uri` / `registry_uri`.

    The registry (and MLflow) is opened on first use; `make_app` does that at start-up."""

    def __init__(self, registry_dir: Path, tracking_uri: str = "", registry_uri: str = "") -> None:
        self.registry_dir, self.tracking_uri, self.registry_uri = Path(registry_dir), tracking_uri, registry_uri
        self._registry: Any = None
        self._lock = threading.Lock()  # opening the registry
        self._cache_lock = threading.Lock()  # a view is cached under the anchor it was read after
        self._stamp: tuple[int, int, int] | None = None
        self._views: dict[str, ReleaseView] = {}
        self._listing: list[ReleaseView] | None = None

    @property
    def registry(self) -> Any:
        with self._lock:
            if self._registry is None:
                from server.releases import ReleaseRegistry  # MLflow: slow to import

                self._registry = ReleaseRegistry(self.tracking_uri, self.registry_dir, self.registry_uri)
            return self._registry

    def list(self, *, for_bank: bool) -> list[ReleaseView]:
        """Every release (active ones only for a bank), oldest first."""
        with self._cache_lock:
            self._refresh()
            if self._listing is None:
                self._listing = [_view(r) for r in self.registry.list()]
            return [v for v in self._listing if v.status == STATUS_ACTIVE or not for_bank]

    def get(self, release_id: str, *, for_bank: bool) -> ReleaseView:
        """One release; ReleaseNotFound, or ReleaseGone for a bank asking for a withdrawn one."""
        view = self._get(release_id)
        if for_bank and view.status != STATUS_ACTIVE:
            raise ReleaseGone(release_id)
        return view

    def withdraw(self, release_id: str, *, by: str, reason: str) -> ReleaseView:
        """Withdraw an active release (ReleaseGone if it already is); the registry audits it."""
        if self._get(release_id).status != STATUS_ACTIVE:
            raise ReleaseGone(release_id)
        try:
            return _view(self.registry.withdraw(release_id, by, reason))
        finally:
            with self._cache_lock:
                self._forget()

    def _get(self, release_id: str) -> ReleaseView:
        from server.releases import ReleaseNotFound as NotInRegistry

        with self._cache_lock:
            self._refresh()
            view = self._views.get(release_id)
            if view is None:
                try:
                    view = self._views[release_id] = _view(self.registry.get(release_id))
                except NotInRegistry:
                    raise ReleaseNotFound(release_id) from None
            return view

    def _refresh(self) -> None:
        """Drop cached views if the registry's audit anchor changed since they were read."""
        try:
            info = os.stat(self.registry_dir / f"{RELEASE_AUDIT_FILE}{ANCHOR_SUFFIX}")
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp or stamp is None:
            self._forget()
            self._stamp = stamp

    def _forget(self) -> None:
        self._views, self._listing, self._stamp = {}, None, None


def _view(release: Release) -> ReleaseView:
    return ReleaseView(release.release_id, release.status, release.certificate, release.card,
                       release.withdrawn_reason or None)
