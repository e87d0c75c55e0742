#!/usr/bin/env bash
# fedrisk on Flower 1.41's deployment engine, on loopback, end to end:
#   test CA + server cert -> SuperLink (TLS, --enable-supernode-auth, sqlite state)
#   -> enroll 3 SuperNode public keys with `flwr supernode register`
#   -> (negative checks: unenrolled key, plain/insecure client are refused)
#   -> 3 SuperNodes (TLS to the SuperLink, auth key, TLS on their own Runtime API)
#   -> `flwr run <repo> <connection> --stream --run-config ...` (3 hospitals, 2 rounds)
#   -> stop every process this script started; exit 0 iff D/run/release/model.npz exists.
#
# Verified by hand on flwr 1.41 (see flower-1.41-notes.md); automated tests come with the
# deployment issue. Run from anywhere: `bash docs/deployment/run_local_tls.sh` (after `make install`).
# Env knobs: WORK (default <repo>/runs/deploy, wiped at start unless KEEP_WORK=1),
# LINK_PORT (28000), NODE_PORT0 (29094; nodes use NODE_PORT0..+2), ROUNDS (2),
# NEGATIVE_CHECKS (1), RUN_TIMEOUT (1500 s).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
APP_DIR="$(cd "$HERE/../.." && pwd)"
VENV_BIN="$APP_DIR/.venv/bin"
WORK="${WORK:-$APP_DIR/runs/deploy}"
LINK_PORT="${LINK_PORT:-28000}"
NODE_PORT0="${NODE_PORT0:-29094}"
ROUNDS="${ROUNDS:-2}"
N=3
NEGATIVE_CHECKS="${NEGATIVE_CHECKS:-1}"
RUN_TIMEOUT="${RUN_TIMEOUT:-1500}"

case "$WORK" in */runs/deploy|*/runs/deploy/*) ;; *) echo "WORK must be a runs/deploy directory (it is wiped)" >&2; exit 2;; esac
[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
D="$WORK/D"; CREDS="$WORK/creds"; LOGS="$WORK/logs"; STATE="$WORK/state"
mkdir -p "$LOGS" "$STATE"

# --- environment: every Flower process inherits this ------------------------------------
export PATH="$VENV_BIN:$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # read by flower-superlink only
export FLWR_TELEMETRY_ENABLED=0                         # no outbound telemetry (loopback only)
export FLWR_DISABLE_UPDATE_CHECK=1                      # no PyPI version check
# One FLWR_HOME per party, as on separate machines: CLI config / SuperLink / each SuperNode.
HOMES="$WORK/flwr-home"
mkdir -p "$HOMES/cli" "$HOMES/superlink"; for i in $(seq 0 $((N-1))); do mkdir -p "$HOMES/supernode_$i"; done
cli() { FLWR_HOME="$HOMES/cli" flwr "$@"; }

ts() { date +%H:%M:%S; }
say() { echo "[$(ts)] $*"; }

# --- process bookkeeping: kill exactly the trees we started -------------------------------
PIDS=()
descendants() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
stop_tree() {  # TERM one started process and its descendants (SuperExec, flwr-*app), KILL after 15 s
  local all=("$1") p alive
  all+=($(descendants "$1"))
  kill -TERM "${all[@]}" 2>/dev/null || true
  for _ in $(seq 1 30); do
    alive=0; for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0; sleep 0.5
  done
  say "  still alive after 15 s, sending KILL: ${all[*]}"
  for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true; done
}
cleanup() {
  local rc=$? i
  # Reverse start order: SuperNodes first (a graceful SuperNode stop deactivates its node in
  # the SuperLink database; a node left "online" by a SuperLink that died first is refused
  # re-activation [code 2004] for up to 2 x 30 s heartbeat), then the SuperLink.
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do
    [ -n "${PIDS[$i]}" ] || continue
    say "stopping pid ${PIDS[$i]} and its descendants"
    stop_tree "${PIDS[$i]}"
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! ss -ltnH "( sport = :$1 )" 2>/dev/null | grep -q .; }
for p in "$LINK_PORT" $(seq "$NODE_PORT0" $((NODE_PORT0+N))); do
  port_free "$p" || { echo "port $p is in use; set LINK_PORT / NODE_PORT0" >&2; exit 2; }
done

T0=$(date +%s)
# --- 1. data, keys, hospital nodes -----------------------------------------------------------
say "preparing data, CKKS keys and $N hospital nodes under $D"
fedrisk data synth --hospitals $N --patients 9000 --out "$D/data" > "$LOGS/prepare.log"
fedrisk keys init --out "$D/keys" >> "$LOGS/prepare.log"
fedrisk node provision --data "$D/data" --key-file "$D/keys/hospital.ckks" --out "$D/nodes" \
    --budget credit-risk-research=10 >> "$LOGS/prepare.log"
mapfile -t NODE_DIRS < <(ls -d "$D"/nodes/*/ | sed 's:/$::' | sort)
[ "${#NODE_DIRS[@]}" -eq $N ] || { echo "expected $N node dirs, got ${#NODE_DIRS[@]}" >&2; exit 1; }

# --- 2. TLS: test CA, SuperLink cert (SAN 127.0.0.1, localhost, ::1), per-hospital auth key (P-384)
#        and Runtime API cert; plus one key pair that is never enrolled, for the negative check.
#        With KEEP_WORK=1 the credentials (and the SuperLink's enrolment of them) are reused.
HOSPITALS=$(for dir in "${NODE_DIRS[@]}"; do basename "$dir"; done | paste -sd,)
if [ -f "$CREDS/credentials.json" ]; then
  say "reusing the credentials in $CREDS"
else
  say "generating test CA, SuperLink certificate and SuperNode credentials for $HOSPITALS"
  fedrisk certs init --out "$CREDS" --hospitals "$HOSPITALS" > "$LOGS/certs.log"
fi
[ -f "$CREDS/rogue/auth.key" ] || fedrisk certs node-key --out "$CREDS/rogue" --name rogue >> "$LOGS/certs.log"

# --- 3. flwr CLI connection (FLWR_HOME/config.toml) --------------------------------------------
cat > "$HOMES/cli/config.toml" <<EOF
[superlink]
default = "fedrisk-tls"

[superlink.fedrisk-tls]
address = "127.0.0.1:$LINK_PORT"
root-certificates = "$CREDS/ca.crt"

# Only used by the negative check: a plain-HTTP client against the TLS SuperLink.
[superlink.fedrisk-plain]
address = "127.0.0.1:$LINK_PORT"
insecure = true
EOF

# --- 4. SuperLink ---------------------------------------------------------------------------
say "starting SuperLink on https://127.0.0.1:$LINK_PORT (TLS, supernode auth, state $STATE/superlink.db)"
( cd "$WORK" && FLWR_HOME="$HOMES/superlink" exec flower-superlink \
    --ssl-ca-certfile "$CREDS/ca.crt" --ssl-certfile "$CREDS/superlink.crt" --ssl-keyfile "$CREDS/superlink.key" \
    --enable-supernode-auth \
    --database "$STATE/superlink.db" \
    --host 127.0.0.1 --port "$LINK_PORT" \
    --disable-runtime-dependency-installation \
    > "$LOGS/superlink.log" 2>&1 ) &
PIDS+=($!)
for _ in $(seq 1 60); do
  cli supernode list fedrisk-tls > /dev/null 2>&1 && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { echo "SuperLink died:"; tail -20 "$LOGS/superlink.log"; exit 1; }
  sleep 1
done

# --- 5. enroll the SuperNodes' public keys -----------------------------------------------------
for i in $(seq 0 $((N-1))); do
  name=$(basename "${NODE_DIRS[$i]}")
  if out=$(cli supernode register "$CREDS/hospitals/$name/auth.pub" fedrisk-tls --name "$name" 2>&1); then
    say "enrolled $name: $(echo "$out" | grep -o 'SuperNode [0-9]* registered' || true)"
  elif echo "$out" | grep -q "Public key already in use"; then
    say "$name already enrolled (persistent SuperLink database)"
  else
    echo "$out" >&2; exit 1
  fi
done

# --- 6. negative checks: must be refused -------------------------------------------------------
if [ "$NEGATIVE_CHECKS" = 1 ]; then
  say "negative check 1: SuperNode with an unenrolled key"
  if FLWR_HOME="$HOMES/supernode_0" timeout 60 flower-supernode --superlink "127.0.0.1:$LINK_PORT" \
      --root-certificates "$CREDS/ca.crt" --auth-supernode-private-key "$CREDS/rogue/auth.key" \
      --host 127.0.0.1 --port $((NODE_PORT0+N)) --max-retries 0 \
      --node-config "node-dir='${NODE_DIRS[0]}'" > "$LOGS/neg_unenrolled.log" 2>&1; then
    echo "FAIL: unenrolled SuperNode was accepted" >&2; exit 1
  fi
  say "  refused: $(grep -m1 -o '\[code: [0-9]*\][^.]*' "$LOGS/neg_unenrolled.log" || tail -1 "$LOGS/neg_unenrolled.log")"
  say "negative check 2: SuperNode without TLS (--insecure) and without a key"
  if FLWR_HOME="$HOMES/supernode_0" timeout 60 flower-supernode --superlink "127.0.0.1:$LINK_PORT" --insecure \
      --host 127.0.0.1 --port $((NODE_PORT0+N)) --max-retries 0 \
      --node-config "node-dir='${NODE_DIRS[0]}'" > "$LOGS/neg_insecure.log" 2>&1; then
    echo "FAIL: plain-HTTP SuperNode was accepted" >&2; exit 1
  fi
  say "  refused: $(grep -m1 -E 'Server disconnected|code:' "$LOGS/neg_insecure.log" || tail -1 "$LOGS/neg_insecure.log")"
  say "negative check 3: flwr CLI over plain HTTP"
  if cli supernode list fedrisk-plain > "$LOGS/neg_cli_plain.log" 2>&1; then
    echo "FAIL: plain-HTTP CLI was accepted" >&2; exit 1
  fi
  say "  refused: $(grep -m1 -o 'Connection to the SuperLink is unavailable' "$LOGS/neg_cli_plain.log" || tail -1 "$LOGS/neg_cli_plain.log")"
fi

# --- 7. SuperNodes --------------------------------------------------------------------------
for i in $(seq 0 $((N-1))); do
  port=$((NODE_PORT0+i)); name=$(basename "${NODE_DIRS[$i]}")
  say "starting SuperNode $i ($name), Runtime API https://127.0.0.1:$port"
  ( cd "$WORK" && FLWR_HOME="$HOMES/supernode_$i" exec flower-supernode \
      --superlink "127.0.0.1:$LINK_PORT" --root-certificates "$CREDS/ca.crt" \
      --auth-supernode-private-key "$CREDS/hospitals/$name/auth.key" \
      --ssl-certfile "$CREDS/hospitals/$name/node.crt" --ssl-keyfile "$CREDS/hospitals/$name/node.key" \
      --ssl-ca-certfile "$CREDS/ca.crt" \
      --host 127.0.0.1 --port "$port" \
      --node-config "node-dir='${NODE_DIRS[$i]}'" \
      > "$LOGS/supernode_$i.log" 2>&1 ) &
  PIDS+=($!)
done
for _ in $(seq 1 90); do
  online=$(cli supernode list fedrisk-tls 2>/dev/null | grep -c " online " || true)
  [ "$online" -ge $N ] && break
  sleep 1
done
[ "$online" -ge $N ] || { echo "only $online of $N SuperNodes online" >&2; cli supernode list fedrisk-tls; exit 1; }
say "$online SuperNodes online"

# --- 8. submit the run ----------------------------------------------------------------------
RUN_CONFIG="keys-dir='$D/keys' run-dir='$D/run' num-hospitals=$N rounds=$ROUNDS"
say "flwr run $APP_DIR fedrisk-tls --stream --run-config \"$RUN_CONFIG\""
T1=$(date +%s)
set +e
( cd "$WORK" && FLWR_HOME="$HOMES/cli" timeout "$RUN_TIMEOUT" flwr run "$APP_DIR" fedrisk-tls --stream \
    --run-config "$RUN_CONFIG" ) 2>&1 | tee "$LOGS/flwr_run.log"
RUN_RC=${PIPESTATUS[0]}
set -e
T2=$(date +%s)
cli ls fedrisk-tls --format json > "$LOGS/runs.json" 2>/dev/null || true

# --- 9. verdict -----------------------------------------------------------------------------
say "flwr run exit code $RUN_RC; run took $((T2-T1)) s; whole script $((T2-T0)) s"
RUN_ID=$(grep -o 'Successfully started run [0-9]*' "$LOGS/flwr_run.log" | grep -o '[0-9]*$' || true)
# `flwr run --stream` exits 0 even when the ServerApp raised: ask the SuperLink for the status.
STATUS=$(python - "$LOGS/runs.json" "$RUN_ID" <<'EOF' || true
import json, sys
runs = {r["run-id"]: r for r in json.load(open(sys.argv[1]))["runs"]}
r = runs.get(sys.argv[2], {})
print(r.get("status", "unknown"), "|", r.get("status-details", ""))
EOF
)
say "run $RUN_ID status: $STATUS"
if [ -f "$D/run/release/model.npz" ]; then
  say "OK: $D/run/release/model.npz ($(cat "$D/run/release/model.sha256" 2>/dev/null | cut -c1-16)...)"
  python - "$D/run/release/run_summary.json" <<'EOF' || true
import json, sys
s = json.load(open(sys.argv[1]))
for r, m in s["rounds"].items():
    print(f"  round {r}: auc={m['auc']:.4f} eps-max={m['epsilon-max']:.3f} round-seconds={m['round-seconds']:.1f}")
EOF
  exit 0
fi
echo "FAIL: no $D/run/release/model.npz" >&2
exit 1
