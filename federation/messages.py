"""The wire contract between the server and hospitals: message actions and record keys.

Every key lives here so neither side scatters strings. Ciphertexts travel as signed
contributions (`federation.contributions`) in ConfigRecords; the only plaintext numbers a
hospital sends are privacy accounting values (epsilon, steps, noise multipliers), which are
public by design, and the flooded values of an aggregate it agreed to reveal.
"""

from __future__ import annotations

# Message types (Flower "category.action").
CENSUS = "query.census"
TRAIN = "train"
EVALUATE = "evaluate"
RELEASE = "query.release"
REVEAL = "query.reveal"
QUERY_CHECK = "query.check"      # analytics, phase 1: can every hospital answer and afford it?
QUERY_ANSWER = "query.answer"    # analytics, phase 2: charge, compute, noise, encrypt

# Record names inside a message's RecordDict.
CONFIG = "config"
CENSUS_RECORD = "census"  # server -> hospital: every hospital's signed census contribution
ROUND_RECORD = "round-{:03d}"  # server -> hospital: the signed updates of one completed round
REVEAL_RECORD = "reveal"  # server -> key holder: the signed contributions whose sum it may reveal
ANCHORS = "anchors"      # server -> hospital: the newest signed state heads it relays (clients.anchoring)
REPLY = "reply"          # hospital -> server: a signed contribution, a release or revealed values
CONTRIBUTION = "contribution"  # hospital -> server: its signed contribution (one-element list)
METRICS = "metrics"      # hospital -> server: public accounting values
RELEASED_MODEL = "released-model"

# Keys in CONFIG.
ROUND = "round"
KEY_ID = "key-id"
PARAMS_ID = "params-id"
RUN_CONFIG = "run-config"  # JSON of the RunConfig for nodes started without one
RUN_ID = "run-id"          # the run's name: what hospitals' ledgers charge rounds to
STEP = "step"                    # a REVEAL request: "evaluate" or "answer"
KIND = "kind"                    # a REVEAL request: "evaluation" or "answer:<query digest>"
FEDERATION = "federation"        # the federation the coordinator runs (its CKKS key id)
QUERY = "query"                  # a cohort query, canonical JSON (federation.query)
QUERY_RUN = "query-run"          # the query run's id: what hospitals' ledgers charge it to
HOSPITALS = "hospitals"          # how many answers the server will sum
QUERY_MODEL = "query-model"      # server -> hospital: the weights a risk_score query scores with (ArrayRecord)

# Keys in REPLY (beside the contribution's own keys, federation.contributions.to_record).
ERROR = "error"          # a hospital's one-line refusal, in place of a result
HOSPITAL = "hospital"
WEIGHTS = "weights"
SHA256 = "sha256"
VALUES = "values"

SPEND = "spend"          # the run's privacy spend at the hospital: privacy.accounting.HospitalSpend, one JSON value

# Keys in METRICS (a cohort answer's public accounting values).
QUERY_EPSILON = "query-epsilon"
NOISE_MULTIPLIER = "noise-multiplier"

CENSUS_LENGTH = 2  # [n_k * 2^-24, contributor]
EVAL_UNIT = 2.0 ** -21  # one record in a DP evaluation histogram, as encrypted
