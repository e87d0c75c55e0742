"""The bank-facing signals service (FastAPI): released DP models with their privacy certificates,
approved DP cohort tables and consented applicant scores, each role seeing only its share.

    auth.py       principals, roles, hashed API keys, per-principal rate limits
    app.py        `make_app(ServiceSettings)`: routes, role checks, per-request audit
    catalogue.py  releases from `server.releases.ReleaseRegistry` (banks: active ones only)
    cohorts.py    approved DP cohort tables (from `server.analytics.write_result`)
    hospitals.py  hospitals' scoring endpoints, grant keys and service-token files
    scores.py     grant checks and forwarding to a hospital over HTTP
    trail.py      the service's hash-chained request audit log
    dashboard.py  the HTML dashboard; charts.py its inline SVG charts
    models.py, release_models.py  request and response bodies (the OpenAPI schema)

Trust boundary: nothing here imports `clients/`; hospitals are reached over HTTP only.
"""
