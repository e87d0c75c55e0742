"""Which URLs medical-derived data may travel to: https anywhere, plain http on loopback only."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def unprotected_url(url: str) -> str:
    """Why scores, alerts or tokens may not be sent to `url` ("" when they may): plain http to a
    host off loopback."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return ""
    host = (parts.hostname or "").lower()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in LOOPBACK_NAMES
    if loopback:
        return ""
    return ("plain http:// is allowed only on loopback (what travels is medical-derived data or a credential): "
            "use an https:// URL")
