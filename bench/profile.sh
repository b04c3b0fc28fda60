#!/usr/bin/env bash
# Profile filterhost under one bench load with py-spy (issue 7: "a profile before and after each
# step"). Same setup as run.sh: private network namespace, smtp-source -> filterhost -> smtp-sink,
# spool on the real disk, no plugin, log level WARNING.
#
#   bench/profile.sh                         5 KB x 2,000 in 20 sessions
#   bench/profile.sh 1m_s20:100:20:1000000   any NAME:N:SESSIONS:BYTES scenario (or
#                                            PROFILE_SCENARIO=... make bench-profile)
#   PROFILE_LABEL=before-block-data bench/profile.sh
#
# Knobs: PROFILE_LABEL (default: the git commit, "+dirty" with uncommitted changes),
#   PROFILE_FORMAT raw (default: collapsed stacks, which speedscope.app opens, plus a text
#   summary of the top functions) | flamegraph (SVG) | speedscope (JSON),
#   PROFILE_RATE (100 samples/s), PROFILE_GIL=1 (sample only the thread holding the GIL: Python
#   CPU work, without threads blocked in fsync or waiting for work), PROFILE_CLAMAV=1 (with the clamav plugin on a test clamd),
#   WARMUP (200), E2E_TIMEOUT (300 s), BENCH_PROFILES (bench/profiles),
#   PROFILE_TOOL=perf (Linux perf instead of py-spy: C and kernel time too, per thread, where
#   py-spy sees Python frames; writes LABEL-NAME.perf.txt, a report per thread and symbol).
# Writes BENCH_PROFILES/LABEL-NAME.{txt,svg,json} (+ LABEL-NAME.top.txt for raw).
# py-spy samples the running process from outside (ptrace: root), so filterhost runs unmodified;
# the sampling costs some throughput, so rates printed here are not benchmark figures.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
export LC_ALL=C
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")

if [ -z "${BENCH_IN_NETNS:-}" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "profile: run as root (py-spy attaches with ptrace; smtp-sink -u needs root)" >&2
    exit 1
  fi
  export BENCH_IN_NETNS=1
  exec "$ROOT/scripts/netns-run" bash "$0" "$@"
fi

SCENARIO=${1:-${PROFILE_SCENARIO:-5k_s20:2000:20:5000}}
IFS=: read -r NAME N SESSIONS BYTES <<< "$SCENARIO"
[ -n "${BYTES:-}" ] || { echo "profile: scenario is NAME:N:SESSIONS:BYTES, got '$SCENARIO'" >&2; exit 2; }
FORMAT=${PROFILE_FORMAT:-raw}
case "$FORMAT" in
  raw) EXT=txt ;; flamegraph) EXT=svg ;; speedscope) EXT=json ;;
  *) echo "profile: PROFILE_FORMAT is raw, flamegraph or speedscope" >&2; exit 2 ;;
esac
RATE=${PROFILE_RATE:-100}
WARMUP=${WARMUP:-200}
E2E_TIMEOUT=${E2E_TIMEOUT:-300}
PY=$ROOT/.venv/bin/python
PYSPY=$ROOT/.venv/bin/py-spy
TOOL=${PROFILE_TOOL:-py-spy}
case "$TOOL" in
  py-spy) [ -x "$PYSPY" ] || { echo "profile: no $PYSPY: make bench-profile installs it" >&2; exit 1; } ;;
  perf) command -v perf >/dev/null || { echo "profile: no perf (apt-get install linux-perf)" >&2; exit 1; }
    EXT=perf.txt ;;
  *) echo "profile: PROFILE_TOOL is py-spy or perf" >&2; exit 2 ;;
esac
if [ -z "${PROFILE_LABEL:-}" ]; then
  PROFILE_LABEL=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo nogit)
  git -C "$ROOT" diff --quiet HEAD 2>/dev/null || PROFILE_LABEL+=+dirty
fi
OUTDIR=${BENCH_PROFILES:-$BENCH/profiles}
mkdir -p "$OUTDIR"
OUTFILE=$OUTDIR/$PROFILE_LABEL-$NAME.$EXT

WORK=$(mktemp -d "${BENCH_DISK_TMP:-/var/tmp}/filterhost-profile.XXXXXX")
chmod 755 "$WORK"
source "$BENCH/common.sh"

SPY_PID=""; CLAMD_PID=""
cleanup() {
  stop_pid "$SPY_PID"
  stop_fh
  stop_pid "$CLAMD_PID"
  stop_sink
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_sink
socket=""
if [ "${PROFILE_CLAMAV:-0}" = 1 ]; then
  mkdir -p "$WORK/clamd"
  CLAMD_DIR=$WORK/clamd CLAMD_STREAM_MAX=30M bash "$ROOT/tests/components/clamd.sh" --daemon >/dev/null
  CLAMD_PID=$(cat "$WORK/clamd/clamd.pid")
  socket=$WORK/clamd/clamd.sock
fi
write_fh_conf "$WORK/conf.d" "$socket"
start_fh "$WORK/conf.d" "$WORK/filterhost.log"
warm_up "$FRONT_PORT" "$WARMUP" || log "warm-up incomplete"

if [ "$TOOL" = perf ]; then
  # cpu-clock: a VM may have no hardware counters. Every thread of the process is sampled.
  perf record -F "$RATE" -e cpu-clock -p "$FH_PID" -o "$WORK/perf.data" > "$WORK/py-spy.log" 2>&1 &
  SPY_PID=$!
  for _ in $(seq 1 100); do [ -s "$WORK/perf.data" ] && break; sleep 0.05; done
else
  # --subprocesses: worker processes, if filterhost grows them, are profiled too.
  SPY_ARGS=(--pid "$FH_PID" --subprocesses --rate "$RATE" --format "$FORMAT" --output "$OUTFILE")
  [ "${PROFILE_GIL:-0}" = 1 ] && SPY_ARGS+=(--gil)
  "$PYSPY" record "${SPY_ARGS[@]}" > "$WORK/py-spy.log" 2>&1 &
  SPY_PID=$!
  for _ in $(seq 1 100); do grep -q "Sampling process" "$WORK/py-spy.log" && break; sleep 0.05; done
  grep -q "Sampling process" "$WORK/py-spy.log" || { cat "$WORK/py-spy.log" >&2; exit 1; }
fi

base=$("$PY" "$BENCH/benchlib.py" count "$WORK/sink.out")
t0=$EPOCHREALTIME
rc=0
timeout "$E2E_TIMEOUT" smtp-source -s "$SESSIONS" -m "$N" -l "$BYTES" "${SRC_ARGS[@]}" \
  "127.0.0.1:$FRONT_PORT" > /dev/null 2> "$WORK/src.err" || rc=$?
[ "$rc" -eq 0 ] || { echo "profile: smtp-source failed ($rc):" >&2; head -5 "$WORK/src.err" >&2; }
"$PY" "$BENCH/benchlib.py" wait "$WORK/sink.out" $((base + N)) "$E2E_TIMEOUT" > /dev/null \
  || log "not every message reached the sink"
t1=$EPOCHREALTIME

# SIGINT is py-spy's (and perf's) "stop and write the profile"; give it 30 s to do so.
kill -INT "$SPY_PID"
for _ in $(seq 1 300); do kill -0 "$SPY_PID" 2>/dev/null || break; sleep 0.1; done
wait "$SPY_PID" 2>/dev/null || true
SPY_PID=""
if [ "$TOOL" = perf ]; then
  {
    echo "# perf record -F $RATE -e cpu-clock -p <filterhost>: $NAME, $N messages after a warm-up"
    # (head closes the pipe early: perf's SIGPIPE is not a failure here)
    perf report -i "$WORK/perf.data" --stdio --sort dso 2>/dev/null | grep "Event count\|Samples" || true
    echo; echo "## per thread"
    perf report -i "$WORK/perf.data" --stdio --sort pid 2>/dev/null | grep -v "^[#]" | grep -v "^$" | head -8 || true
    echo; echo "## per thread and symbol (top 60)"
    perf report -i "$WORK/perf.data" --stdio --sort pid,sym 2>/dev/null | grep -v "^[#]" | grep -v "^$" | head -60 || true
  } > "$OUTFILE"
fi
[ -s "$OUTFILE" ] || { echo "profile: $TOOL wrote nothing:" >&2; cat "$WORK/py-spy.log" >&2; exit 1; }

log "$NAME: $N messages in $("$PY" -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.2f}")' \
  "$t0" "$t1") s end to end while sampled at $RATE Hz"
if [ "$TOOL" = perf ]; then
  head -30 "$OUTFILE"
  log "profile: $OUTFILE"
elif [ "$FORMAT" = raw ]; then
  "$PY" "$BENCH/benchlib.py" top "$OUTFILE" 40 > "${OUTFILE%.txt}.top.txt"
  head -25 "${OUTFILE%.txt}.top.txt"
  log "profile: $OUTFILE (collapsed stacks: open in https://www.speedscope.app) and ${OUTFILE%.txt}.top.txt"
else
  log "profile: $OUTFILE"
fi
