"""An example bank client of the fedrisk signals service, using only the HTTP API.

What a bank's own system does with fedrisk: find an active release, read what its certificate
and model card promise, then score consenting applicants with the grant tokens they bring. It
needs Python 3.9+ and httpx (or swap in any HTTP client); it does not import fedrisk.

    export FEDRISK_API_KEY=...            # a bank-analyst key (`fedrisk serve keys add --role bank-analyst`)
    python docs/examples/bank_client.py --service https://signals.example --grant-file grants.txt

grants.txt holds one grant token per line (each applicant gets theirs from the hospital that
holds their records). Output: one JSON line per grant, the score or why there is none.

How a score may be used: as one input to a credit decision for the applicant who granted it, for
the release's stated purpose only; never as the sole basis of an adverse decision, never to infer
the applicant's medical condition, never shared beyond that purpose. A probability describes
applicants like this one, not a diagnosis; a band is a range of that probability.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx

API_KEY_HEADER = "X-API-Key"  # the service's header; a `Authorization: Bearer` header gets 401
MAX_RETRIES = 3


class ServiceError(RuntimeError):
    """The service refused or failed a request; the message is its one-line reason."""


def _request(client: httpx.Client, method: str, path: str, **kwargs: object) -> httpx.Response:
    """One request, waiting as the service asks when rate-limited (429 with Retry-After)."""
    for _ in range(MAX_RETRIES):
        response = client.request(method, path, **kwargs)
        if response.status_code != 429:
            return response
        time.sleep(float(response.headers.get("Retry-After", "1")))
    return response


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text


def active_release(client: httpx.Client, wanted: str = "") -> dict:
    """The release to score with: `wanted`, or the newest active one."""
    response = _request(client, "GET", "/v1/releases")
    if response.status_code != 200:
        raise ServiceError(f"listing releases: HTTP {response.status_code}: {_detail(response)}")
    releases = [r for r in response.json() if not wanted or r["release_id"] == wanted]
    if not releases:
        raise ServiceError(f"no active release {wanted}" if wanted else "no active release")
    return releases[-1]


def what_it_promises(client: httpx.Client, release_id: str) -> dict:
    """The release's privacy guarantee and intended use, as its certificate and card state them."""
    certificate = _request(client, "GET", f"/v1/releases/{release_id}/certificate")
    card = _request(client, "GET", f"/v1/releases/{release_id}/model-card")
    for response in (certificate, card):
        if response.status_code != 200:
            raise ServiceError(f"release {release_id}: HTTP {response.status_code}: {_detail(response)}")
    cert, model_card = certificate.json(), card.json()
    return {"release": release_id, "epsilon": cert["epsilon_max"], "delta": cert["delta"],
            "purpose": cert["purpose"], "intended_use": model_card.get("intended_use", "")}


def score(client: httpx.Client, grant: str, release_id: str) -> dict:
    """One applicant's score, or the reason there is none (spent or revoked grant, withdrawn
    consent or release, hospital unreachable): never raises for a refusal."""
    response = _request(client, "POST", "/v1/scores", json={"grant": grant, "release": release_id})
    if response.status_code == 200:
        body = response.json()
        return {"ok": True, "probability": body["probability"], "band": body["band"],
                "reasons": [r["phrase"] for r in body["reasons"]], "release": body["release"]}
    return {"ok": False, "status": response.status_code, "reason": _detail(response)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", required=True, help="the signals service's base URL")
    parser.add_argument("--grant-file", required=True, help="one grant token per line")
    parser.add_argument("--release-id", default="", help="score with this release (default: the newest active)")
    parser.add_argument("--ca", default=None, help="CA bundle to verify the service's TLS certificate with")
    args = parser.parse_args(argv)
    key = os.environ.get("FEDRISK_API_KEY", "")
    if not key:
        print("set FEDRISK_API_KEY to a bank-analyst API key", file=sys.stderr)
        return 2
    with open(args.grant_file, encoding="utf-8") as handle:
        grants = [line.strip() for line in handle if line.strip()]
    with httpx.Client(base_url=args.service, headers={API_KEY_HEADER: key}, timeout=30.0,
                      verify=args.ca or True) as client:
        try:
            release = active_release(client, args.release_id)
            print(json.dumps({"promises": what_it_promises(client, release["release_id"])}))
        except ServiceError as error:
            print(f"bank_client: {error}", file=sys.stderr)
            return 1
        for number, grant in enumerate(grants, start=1):
            print(json.dumps({"row": number, **score(client, grant, release["release_id"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
