"""The wire contract between the server and hospitals: message actions and record keys.

Every key lives here so neither side scatters strings. Ciphertexts travel as lists of bytes in
ConfigRecords; the only plaintext numbers a hospital sends are privacy accounting values
(epsilon, steps, noise multiplier), which are public by design.
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
STATE = "state"          # server -> hospital: the chain of encrypted aggregates (ArrayRecord)
CENSUS_RECORD = "census"  # server -> hospital: the encrypted census total
AGGREGATE_RECORD = "aggregate"  # server -> key holder: an encrypted metric sum to reveal
REPLY = "reply"          # hospital -> server: ciphertexts, release
METRICS = "metrics"      # hospital -> server: public accounting values
RELEASED_MODEL = "released-model"

# Keys in CONFIG.
ROUND = "round"
KEY_ID = "key-id"
PARAMS_ID = "params-id"
RUN_CONFIG = "run-config"  # JSON of the RunConfig for nodes started without one
RUN_ID = "run-id"          # the run's name: what hospitals' ledgers charge rounds to
VECTOR_LENGTH = "vector-length"  # a REVEAL request: how many values the aggregate holds
QUERY = "query"                  # a cohort query, canonical JSON (federation.query)
QUERY_RUN = "query-run"          # the query run's id: what hospitals' ledgers charge it to
HOSPITALS = "hospitals"          # how many answers the server will sum
QUERY_MODEL = "query-model"      # server -> hospital: the weights a risk_score query scores with (ArrayRecord)

# Keys in CENSUS_RECORD / AGGREGATE_RECORD.
CENSUS_TOTAL = "census-total"
AGGREGATE = "aggregate"    # a REVEAL request: the encrypted sum to decrypt

# Keys in REPLY.
ERROR = "error"          # a hospital's one-line refusal, in place of a result
CIPHERTEXTS = "ciphertexts"
HOSPITAL = "hospital"
WEIGHTS = "weights"
SHA256 = "sha256"
VALUES = "values"

# Keys in METRICS.
EPSILON = "epsilon"
STEPS = "steps"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
QUERY_EPSILON = "query-epsilon"
TRAIN_SECONDS = "train-seconds"
HE_SECONDS = "he-seconds"

# Layout of the evaluation vector (each entry weighted by n_eval / N_hat before encryption).
EVAL_FIELDS = ("auc", "brier", "log-loss")
EVAL_LENGTH = 6  # [w_auc*auc, w_auc, w*brier, w*log-loss, w, contributor]
CENSUS_LENGTH = 2  # [n_k * 2^-24, contributor]
