# shellcheck shell=bash
# Shared by run.sh and profile.sh (sourced, not run): the sink, filterhost and the helpers that
# start, wait for and stop them. Expects BENCH (this directory), ROOT, WORK and PY to be set.

SINK_PORT=${SINK_PORT:-26025}     # smtp-sink, the next hop of every relay
FRONT_PORT=${FRONT_PORT:-26026}   # the server under test
FH_HOSTNAME=filterhost-bench.localdomain
# smtp-source's message: 1 recipient, generated From/To/Date/Message-Id, then -l bytes of body.
SRC_ARGS=(-M bench.test -f sender@example.test -t rcpt@example.test)
export PATH="$PATH:/usr/sbin:/sbin"

SINK_PID=""
FH_PID=""

log() { echo "[$(date +%T)] $*" >&2; }

# Wait (at most 10 s) until something accepts connections on 127.0.0.1:$1.
wait_port() {
  local _
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "bench: nothing listens on port $1 after 10 s" >&2
  return 1
}

# Stop one process we started: SIGTERM, then SIGKILL after 10 s. Works for non-children too
# (clamd daemonizes), which `wait` cannot reap, hence the kill -0 polling.
stop_pid() {
  local pid=$1 _
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# smtp-sink counts messages (-c: its "mesg=" counter on stdout) and discards them; -u drops root.
start_sink() {
  : > "$WORK/sink.out"
  smtp-sink -c -u nobody "127.0.0.1:$SINK_PORT" 1024 > "$WORK/sink.out" 2>> "$WORK/sink.err" &
  SINK_PID=$!
  wait_port "$SINK_PORT"
}
stop_sink() { stop_pid "$SINK_PID"; SINK_PID=""; }

# write_fh_conf CONFDIR [CLAMD_SOCKET | chain]: filterhost relaying everything to the sink, spool
# in WORK (a real disk, so its fsyncs cost what they cost in production); the clamav plugin when
# a socket is given, the shipped default chain minus clamav (attachments, headers, routing, each
# configured to work on every bench message: see below) for `chain`, no plugin otherwise.
write_fh_conf() {
  local conf=$1 clamd_socket=${2:-}
  mkdir -p "$conf"
  cat > "$conf/00-bench.toml" <<EOF
[server]
listen = ["127.0.0.1:$FRONT_PORT"]
hostname = "$FH_HOSTNAME"
mynetworks = ["127.0.0.0/8"]
# Every bench client comes from 127.0.0.1: the per-client limit must allow the idle-sessions
# probe (IDLE_SESS connections at once) and the load generator's sessions.
max_connections = 5000
max_connections_per_client = 5000
EOF
  # FH_WORKERS: worker processes (the [server] workers key); unset: filterhost's default.
  [ -z "${FH_WORKERS:-}" ] || echo "workers = $FH_WORKERS" >> "$conf/00-bench.toml"
  cat >> "$conf/00-bench.toml" <<EOF

[spool]
directory = "$WORK/filterhost-spool"

[relay]
mode = "smarthost"
smarthost = "127.0.0.1:$SINK_PORT"
smarthost_tls_policy = "none"
EOF
  # FH_DELIVERY_PROCESS: true or false (the [relay] delivery_process key); unset: the default.
  [ -z "${FH_DELIVERY_PROCESS:-}" ] || echo "delivery_process = $FH_DELIVERY_PROCESS" >> "$conf/00-bench.toml"
  if [ "$clamd_socket" = chain ]; then
    # headers: the bench client (127.0.0.1) is internal, so filterhost's own Received loses its
    # "from" part, and smtp-source's sender@example.test becomes sender@example.net in the
    # envelope and in From. routing: one transport entry the bench traffic (rcpt@example.test)
    # does not match, so every recipient is looked up and still goes to [relay] smarthost.
    cat >> "$conf/00-bench.toml" <<EOF

[plugins]
order = ["attachments", "headers", "routing"]

[plugins.headers]
strip_topology = true
internal_networks = ["127.0.0.0/8"]
sender_rewrite = { "@example.test" = "@example.net" }

[plugins.routing]
transport = { "partner.example" = "hold" }
EOF
  elif [ -n "$clamd_socket" ]; then
    cat >> "$conf/00-bench.toml" <<EOF

[plugins]
order = ["clamav"]

[plugins.clamav]
servers = ["unix:$clamd_socket"]
# clamd runs on the test signatures of tests/components/clamd.sh only.
official_signatures = false
EOF
  else
    printf '\n[plugins]\norder = []\n' >> "$conf/00-bench.toml"
  fi
  # FH_EXTRA_TOML: more configuration, as a later file overrides key by key (for A/B runs,
  # e.g. FH_EXTRA_TOML=$'[relay]\nconnection_reuse_time = "0s"').
  [ -z "${FH_EXTRA_TOML:-}" ] || printf '%s\n' "$FH_EXTRA_TOML" > "$conf/99-extra.toml"
}

# start_fh CONFDIR LOGFILE [WRAPPER...]: serve at WARNING so that logging is not what is measured
# (FH_LOG_LEVEL=INFO for a look at each message's timing in OUT/logs/, not for figures).
start_fh() {
  local conf=$1 logfile=$2
  shift 2
  (cd "$WORK" && exec "$@" "$PY" -m filterhost -c "$conf" --log-level "${FH_LOG_LEVEL:-WARNING}") > "$logfile" 2>&1 &
  FH_PID=$!
  if ! wait_port "$FRONT_PORT"; then
    tail -20 "$logfile" >&2
    return 1
  fi
}
stop_fh() { stop_pid "$FH_PID"; FH_PID=""; }

# warm_up PORT N: N messages through the server (imports, first connections), not recorded;
# returns once the sink has counted them (at most 60 s).
warm_up() {
  local base
  base=$("$PY" "$BENCH/benchlib.py" count "$WORK/sink.out")
  timeout 60 smtp-source -s 5 -m "$2" -l 5000 "${SRC_ARGS[@]}" "127.0.0.1:$1" >/dev/null 2>&1 || true
  "$PY" "$BENCH/benchlib.py" wait "$WORK/sink.out" $((base + $2)) 60 >/dev/null
}
