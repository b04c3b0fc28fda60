#!/usr/bin/env bash
# `make bench`: filterhost against a private Postfix relay and against the ceiling (smtp-source
# straight into smtp-sink), same load, same run, same machine (DESIGN.md section 5, issue 7).
#
#   bench/run.sh                                  everything, 3 runs of each (the standard run)
#   RUNS=1 N_5K=500 N_5K_1S=200 N_1M=20 bench/run.sh                  a quick smoke run
#   SYSTEMS="postfix filterhost" SCENARIOS="5k_s20:2000:20:5000" bench/run.sh
#
# Knobs (environment):
#   SYSTEMS    limit postfix filterhost filterhost_agent filterhost_chain filterhost_clamav clamd
#              (positional arguments also work); filterhost_agent is filterhost with
#              [relay] delivery_process = true; filterhost_chain is the shipped default chain minus clamav
#              (attachments, headers, routing), configured by write_fh_conf in common.sh
#   SCENARIOS  default: "5k_s$SESS:$N_5K:$SESS:5000 5k_s1:$N_5K_1S:1:5000
#              1m_s$SESS:$N_1M:$SESS:1000000 idle:$IDLE_SESS inflight:$INFLIGHT:1000000"
#              NAME:N:SESSIONS:BYTES is a throughput scenario (every system);
#              idle:S and inflight:N:BYTES are memory probes (filterhost only)
#   RUNS (3) SESS (20) N_5K (10000) N_5K_1S (2000) N_1M (200) IDLE_SESS (1000) INFLIGHT (20)
#   WARMUP (200 messages per system)  E2E_TIMEOUT (300 s per run)
#   BENCH_OUT (bench/): where RESULTS.md, runs.jsonl, env.json and logs/ go
#   BENCH_DISK_TMP (/var/tmp): parent of the work dir; must be a real disk, not tmpfs
#
# Runs as root (Postfix's master and smtp-sink -u need it) inside a private network namespace
# (scripts/netns-run: only lo, so no packet leaves the machine and no port clashes with the
# host's). Everything it starts is stopped by PID on exit; the work dir is removed.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
export LC_ALL=C   # `time` and printf write decimal points, whatever the user's locale
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")

if [ -z "${BENCH_IN_NETNS:-}" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bench: run as root (Postfix's master and smtp-sink -u need it)" >&2
    exit 1
  fi
  # Taken before anything starts: how busy the machine was without us.
  LOADAVG_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
  export LOADAVG_BEFORE BENCH_IN_NETNS=1
  exec "$ROOT/scripts/netns-run" bash "$0" "$@"
fi

SYSTEMS=${*:-${SYSTEMS:-limit postfix filterhost filterhost_agent filterhost_chain filterhost_clamav clamd}}
RUNS=${RUNS:-3}
SESS=${SESS:-20}
N_5K=${N_5K:-10000}
N_5K_1S=${N_5K_1S:-2000}
N_1M=${N_1M:-200}
IDLE_SESS=${IDLE_SESS:-1000}
INFLIGHT=${INFLIGHT:-20}
WARMUP=${WARMUP:-200}
E2E_TIMEOUT=${E2E_TIMEOUT:-300}
SCENARIOS=${SCENARIOS:-"5k_s$SESS:$N_5K:$SESS:5000 5k_s1:$N_5K_1S:1:5000 1m_s$SESS:$N_1M:$SESS:1000000 idle:$IDLE_SESS inflight:$INFLIGHT:1000000"}
OUT=${BENCH_OUT:-$BENCH}
PY=$ROOT/.venv/bin/python

for tool in smtp-source smtp-sink postfix; do
  command -v "$tool" >/dev/null 2>&1 || command -v "/usr/sbin/$tool" >/dev/null 2>&1 || {
    echo "bench: $tool not found: run scripts/install-test-deps.sh (make bench does)" >&2; exit 1; }
done
[ -x "$PY" ] || { echo "bench: no $PY: run make venv" >&2; exit 1; }
for sys in $SYSTEMS; do
  case "$sys" in
  limit | postfix | filterhost | filterhost_agent | filterhost_chain | filterhost_clamav | clamd) ;;
  *) echo "bench: unknown system '$sys'" \
       "(limit postfix filterhost filterhost_agent filterhost_chain filterhost_clamav clamd)" >&2
     exit 2 ;;
  esac
done

mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
JSONL=$OUT/runs.jsonl
: > "$JSONL"
rm -f "$OUT"/logs/*
WORK=$(mktemp -d "${BENCH_DISK_TMP:-/var/tmp}/filterhost-bench.XXXXXX")
chmod 755 "$WORK"   # smtp-sink (nobody), postfix and clamav users must reach their subdirs
ulimit -n 20000     # the idle-sessions probe holds IDLE_SESS sockets on each side

# shellcheck source=common.sh
source "$BENCH/common.sh"

PF_DIR=""; CLAMD_PID=""; CLAMD_SOCKET=""; MON_GROUPS=(); FRONT=""; MON_PID=""; WAITER_PID=""

start_clamd() {
  local vars
  mkdir -p "$WORK/clamd"
  # StreamMaxLength above the plugin's max_size (25 MiB), or --check-config warns that
  # large messages would fail at clamd.
  vars=$(CLAMD_DIR="$WORK/clamd" CLAMD_STREAM_MAX=30M bash "$ROOT/tests/components/clamd.sh" --daemon \
         2>>"$OUT/logs/clamd-start.log") || { cat "$OUT/logs/clamd-start.log" >&2; return 1; }
  CLAMD_SOCKET=$(sed -n 's/.*CLAMD_SOCKET=\([^ ]*\).*/\1/p' <<< "$vars")
  CLAMD_PID=$(cat "$WORK/clamd/clamd.pid")
}
stop_clamd() { stop_pid "$CLAMD_PID"; CLAMD_PID=""; }

stop_postfix() {
  [ -n "$PF_DIR" ] || return 0
  local master
  master=$("$BENCH/postfix_instance.sh" pid "$PF_DIR" 2>/dev/null || true)
  "$BENCH/postfix_instance.sh" stop "$PF_DIR" >/dev/null 2>&1 || true
  # `postfix stop` returns before master is gone; a master still alive is stopped by its PID.
  [ -z "$master" ] || stop_pid "$master"
  gzip -c "$PF_DIR/maillog" > "$OUT/logs/postfix-maillog.gz" 2>/dev/null || true
  PF_DIR=""
}

# start_system SYSTEM: sets FRONT (the port the load goes to) and MON_GROUPS (what procmon watches).
start_system() {
  MON_GROUPS=("sink=$SINK_PID")
  case "$1" in
  limit) FRONT=$SINK_PORT ;;
  postfix)
    PF_DIR=$WORK/postfix
    "$BENCH/postfix_instance.sh" create "$PF_DIR" "$FRONT_PORT" "$SINK_PORT" >/dev/null
    "$BENCH/postfix_instance.sh" start "$PF_DIR" 2>>"$OUT/logs/postfix-start.log"
    FRONT=$FRONT_PORT
    wait_port "$FRONT"
    MON_GROUPS+=("server=$("$BENCH/postfix_instance.sh" pid "$PF_DIR")")
    ;;
  filterhost)
    rm -rf "$WORK/conf.d" "$WORK/filterhost-spool"
    write_fh_conf "$WORK/conf.d"
    start_fh "$WORK/conf.d" "$OUT/logs/filterhost.log"
    FRONT=$FRONT_PORT
    MON_GROUPS+=("server=$FH_PID")
    ;;
  filterhost_agent)
    rm -rf "$WORK/conf.d" "$WORK/filterhost-spool"
    FH_DELIVERY_PROCESS=true write_fh_conf "$WORK/conf.d"
    start_fh "$WORK/conf.d" "$OUT/logs/filterhost_agent.log"
    FRONT=$FRONT_PORT
    MON_GROUPS+=("server=$FH_PID")
    ;;
  filterhost_chain)
    rm -rf "$WORK/conf.d" "$WORK/filterhost-spool"
    write_fh_conf "$WORK/conf.d" chain
    start_fh "$WORK/conf.d" "$OUT/logs/filterhost_chain.log"
    FRONT=$FRONT_PORT
    MON_GROUPS+=("server=$FH_PID")
    ;;
  filterhost_clamav)
    start_clamd
    rm -rf "$WORK/conf.d" "$WORK/filterhost-spool"
    write_fh_conf "$WORK/conf.d" "$CLAMD_SOCKET"
    start_fh "$WORK/conf.d" "$OUT/logs/filterhost_clamav.log"
    FRONT=$FRONT_PORT
    MON_GROUPS+=("server=$FH_PID" "clamd=$CLAMD_PID")
    ;;
  clamd)
    start_clamd
    FRONT=""
    MON_GROUPS=("clamd=$CLAMD_PID")
    ;;
  esac
}
stop_system() { stop_fh; stop_postfix; stop_clamd; }

cleanup() {
  local rc=$?
  stop_pid "$MON_PID"
  stop_pid "$WAITER_PID"
  stop_system
  stop_sink
  cp "$WORK"/clamd/clamd.log "$OUT/logs/" 2>/dev/null || true
  cp "$WORK"/sink.err "$OUT/logs/" 2>/dev/null || true
  rm -rf "$WORK"
  if [ "$rc" -ne 0 ] && [ -s "$JSONL" ]; then  # a stopped or failed run still shows what it got
    "$PY" "$BENCH/report.py" "$OUT/env.json" "$JSONL" --incomplete > "$OUT/RESULTS.md" || true
    log "run failed or stopped (exit $rc): partial results in $OUT/RESULTS.md, logs in $OUT/logs"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# monitor_start: procmon in the background, returns once its baseline sample is taken.
monitor_start() {
  rm -f "$WORK/ready" "$WORK/mon.json"
  "$PY" "$BENCH/procmon.py" "$WORK/mon.json" "$WORK/ready" "${MON_GROUPS[@]}" &
  MON_PID=$!
  local _
  for _ in $(seq 1 250); do [ -f "$WORK/ready" ] && break; sleep 0.02; done
  sleep 0.2
}
monitor_stop() { kill "$MON_PID" 2>/dev/null || true; wait "$MON_PID" 2>/dev/null || true; MON_PID=""; }

# run_load SYSTEM SCENARIO RUN N SESSIONS BYTES: one measured smtp-source run.
run_load() {
  local sys=$1 scen=$2 run=$3 n=$4 s=$5 len=$6
  local base t0 t1 t2 rc=0 e2e_rc=0 times
  base=$("$PY" "$BENCH/benchlib.py" count "$WORK/sink.out")
  monitor_start
  # The waiter starts before t0, so its own start-up is not in the end-to-end time.
  "$PY" "$BENCH/benchlib.py" wait "$WORK/sink.out" $((base + n)) "$E2E_TIMEOUT" > "$WORK/e2e.out" &
  WAITER_PID=$!
  sleep 0.2
  t0=$EPOCHREALTIME
  # bash's `time` reports wall, user and sys seconds of smtp-source (the load generator's CPU).
  { TIMEFORMAT='%R %U %S'; time timeout "$E2E_TIMEOUT" smtp-source -s "$s" -m "$n" -l "$len" \
      "${SRC_ARGS[@]}" "127.0.0.1:$FRONT" > /dev/null 2> "$WORK/src.err"; } 2> "$WORK/src.time" || rc=$?
  t1=$EPOCHREALTIME
  # A failed load never reaches the target count: stop waiting for it.
  [ "$rc" -eq 0 ] || kill "$WAITER_PID" 2>/dev/null || true
  wait "$WAITER_PID" || e2e_rc=$?
  WAITER_PID=""
  t2=$(cat "$WORK/e2e.out" 2>/dev/null || true)
  monitor_stop
  local got src_user src_sys
  got=$(( $("$PY" "$BENCH/benchlib.py" count "$WORK/sink.out") - base ))
  read -r _ src_user src_sys < <(tail -1 "$WORK/src.time")
  if [ -s "$WORK/src.err" ]; then
    { echo "== $sys $scen run $run"; head -5 "$WORK/src.err"; } >> "$OUT/logs/smtp-source-errors.txt"
  fi
  times=$("$PY" -c '
import sys
t0, t1, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[4])
try:
    e2e = float(sys.argv[3]) - t0
except ValueError:
    e2e = -1.0
front = t1 - t0
print(f"{front:.3f} {e2e:.3f} {n / front:.1f} {n / e2e if e2e > 0 else -1:.1f}")' "$t0" "$t1" "${t2:-x}" "$n")
  local front e2e front_rate e2e_rate
  read -r front e2e front_rate e2e_rate <<< "$times"
  "$PY" "$BENCH/benchlib.py" record "$JSONL" kind=throughput system="$sys" scenario="$scen" \
    run="$run" n="$n" sessions="$s" size="$len" front_s="$front" e2e_s="$e2e" \
    front_rate="$front_rate" e2e_rate="$e2e_rate" delivered="$got" e2e_timeout="$e2e_rc" \
    source_rc="$rc" source_err_lines="$(grep -c . "$WORK/src.err" || true)" \
    source_cpu_s="$("$PY" -c 'import sys; print(float(sys.argv[1]) + float(sys.argv[2]))' \
                    "${src_user:-0}" "${src_sys:-0}")" mon=@"$WORK/mon.json"
  log "$sys $scen run $run: n=$n front ${front}s (${front_rate}/s) e2e ${e2e}s (${e2e_rate}/s)" \
      "delivered=$got source_rc=$rc"
  if [ "$sys" = postfix ]; then  # the next run starts with an empty queue (at most 30 s)
    for _ in $(seq 1 300); do
      [ "$("$BENCH/postfix_instance.sh" qsize "$PF_DIR")" = 0 ] && break
      sleep 0.1
    done
  fi
}

# run_clamd SCENARIO RUN N CLIENTS BYTES: clamd's own INSTREAM rate for the same scenario.
run_clamd() {
  local scen=$1 run=$2 n=$3 c=$4 len=$5 rc=0
  monitor_start
  "$PY" "$BENCH/clamd_rate.py" "$CLAMD_SOCKET" "$n" "$c" "$len" "$E2E_TIMEOUT" \
    > "$WORK/clamd.json" || rc=$?
  monitor_stop
  "$PY" "$BENCH/benchlib.py" record "$JSONL" kind=instream system=clamd scenario="$scen" \
    run="$run" n="$n" sessions="$c" size="$len" result=@"$WORK/clamd.json" rc="$rc" \
    mon=@"$WORK/mon.json"
  log "clamd $scen run $run: $(cat "$WORK/clamd.json")"
}

# run_memory SYSTEM RUN idle SESSIONS | SYSTEM RUN inflight N BYTES: a fresh filterhost (so that
# earlier loads do not inflate its memory), a short warm-up so that lazily imported code is
# loaded, the probe.
run_memory() {
  local sys=$1 run=$2 probe=$3 scen rc=0
  shift
  stop_fh
  start_system "$sys"
  warm_up "$FRONT" 20 || log "warm-up incomplete before $probe"
  if [ "$probe" = idle ]; then
    scen="idle_$3"
    "$PY" "$BENCH/memprobe.py" idle "$FRONT" "$3" "$FH_PID" "$WORK/mem.json" \
      > "$WORK/mem.log" 2>&1 || rc=$?
  else
    scen="inflight_${3}x$4"
    "$PY" "$BENCH/memprobe.py" inflight "$FRONT" "$3" "$4" "$FH_PID" "$WORK/sink.out" \
      "$WORK/mem.json" > "$WORK/mem.log" 2>&1 || rc=$?
  fi
  [ "$rc" -eq 0 ] || tail -5 "$WORK/mem.log" >&2
  "$PY" "$BENCH/benchlib.py" record "$JSONL" kind=memory system="$sys" scenario="$scen" \
    run="$run" result=@"$WORK/mem.json" rc="$rc"
  log "$sys $scen run $run: rc=$rc"
}

"$PY" "$BENCH/benchlib.py" env "$OUT/env.json" "$ROOT" loadavg_before="$LOADAVG_BEFORE" \
  systems="$SYSTEMS" scenarios="$SCENARIOS" runs="$RUNS" sess="$SESS" n_5k="$N_5K" \
  n_5k_1s="$N_5K_1S" n_1m="$N_1M" idle_sess="$IDLE_SESS" inflight="$INFLIGHT" \
  warmup="$WARMUP" work_dir="$WORK"
log "systems: $SYSTEMS; runs: $RUNS; results -> $OUT; work dir $WORK"

# Round-robin: run 1 of every system, then run 2 of every system, and so on. This shared
# machine drifts by a fifth within minutes; measuring each system's runs in the same
# stretches of time keeps that drift out of the ratios (one system after the other put
# minutes between Postfix's runs and filterhost's).
for run in $(seq 1 "$RUNS"); do
  for sys in $SYSTEMS; do
    start_sink
    start_system "$sys"
    [ "$sys" = clamd ] || warm_up "$FRONT" "$WARMUP" || log "warm-up incomplete for $sys"
    for sc in $SCENARIOS; do
      IFS=: read -r name a b c <<< "$sc"
      case "$sys:$name" in
      filterhost:idle | filterhost_agent:idle) run_memory "$sys" "$run" idle "$a" ;;
      filterhost:inflight | filterhost_agent:inflight) run_memory "$sys" "$run" inflight "$a" "$b" ;;
      *:idle | *:inflight) ;;   # memory probes are for filterhost only
      clamd:*) run_clamd "$name" "$run" "$a" "$b" "$c" ;;
      *) run_load "$sys" "$name" "$run" "$a" "$b" "$c" ;;
      esac
    done
    stop_system
    stop_sink
  done
done

"$PY" "$BENCH/report.py" "$OUT/env.json" "$JSONL" > "$OUT/RESULTS.md"
log "done: $OUT/RESULTS.md"
