#!/usr/bin/env bash
# Start Postfix's smtp-sink as a recording SMTP peer (an "MX host") on loopback.
#
# usage: smtp-sink.sh [--daemon] ADDR:PORT [extra smtp-sink options...]
#   e.g. smtp-sink.sh 127.0.0.2:2525                 accept everything, record it
#        smtp-sink.sh '[::1]:2525'                   same on IPv6 loopback
#        smtp-sink.sh 127.0.0.3:2525 -r RCPT         every RCPT gets 450 4.3.0
#        smtp-sink.sh 127.0.0.4:2525 -f RCPT         every RCPT gets 500 5.3.0
#        smtp-sink.sh 127.0.0.5:2525 -Q MAIL         421 + disconnect after MAIL
#        smtp-sink.sh 127.0.0.6:2525 -q CONNECT      drop connection, no greeting
#        smtp-sink.sh 127.0.0.7:2525 -r . -b '452 4.2.2 Mailbox full'
#   --daemon  run in background, write $SINK_DIR/smtp-sink.pid, wait until the
#             port accepts, print the variables and exit 0.
#   (default) foreground: prints the variables to stderr, then exec's smtp-sink
#             so the PID of this script IS smtp-sink's PID (good for Popen()).
# env: SINK_DIR  use this directory instead of a fresh `mktemp -d`
# Each accepted message is written to $SINK_DIR/mail/<timestamp>.<random> (option -d),
# prefixed with X-Client-Addr/X-Client-Proto/X-Helo-Args/X-Mail-Args/X-Rcpt-Args
# lines and a 3-line Received: header, with LF line endings and one empty line
# appended (see SinkMessage in services.py for the exact format and its limits).
# The file is created at MAIL, filled during DATA and removed on RSET or abort.
# smtp-sink has no STARTTLS; it announces AUTH but accepts any credentials.
set -euo pipefail

DAEMON=no
if [ "${1:-}" = "--daemon" ]; then DAEMON=yes; shift; fi
LISTEN="${1:?usage: smtp-sink.sh [--daemon] ADDR:PORT [options]}"; shift
DIR="${SINK_DIR:-$(mktemp -d -t smtp-sink.XXXXXX)}"
DIR="$(cd "$DIR" && pwd)"
mkdir -p "$DIR/mail"

USEROPT=()
if [ "$(id -u)" = 0 ]; then
  # smtp-sink refuses to run as root without -u; it binds first, then drops
  chown nobody "$DIR/mail"; chmod 755 "$DIR"
  USEROPT=(-u nobody)
fi
FAM=-4; case "$LISTEN" in \[*) FAM=-6;; esac   # [::1]:2525 -> IPv6
# -4/-6: address family of LISTEN, -t 30: command timeout,
# -h: greeting host name, -d: one file per transaction (no subdirectory part)
CMD=(/usr/sbin/smtp-sink "$FAM" -t 30 -h "sink-${LISTEN%:*}" "${USEROPT[@]}"
     -d "$DIR/mail/%Y%m%d%H%M%S." "$@" "inet:$LISTEN" 64)
VARS="SINK_DIR=$DIR SINK_MAILDIR=$DIR/mail SINK_LISTEN=$LISTEN SINK_PIDFILE=$DIR/smtp-sink.pid"

if [ "$DAEMON" = no ]; then
  echo "$VARS" >&2
  exec "${CMD[@]}"
fi

"${CMD[@]}" > "$DIR/smtp-sink.log" 2>&1 &
echo $! > "$DIR/smtp-sink.pid"
for _ in $(seq 1 200); do
  if python3 -c "import socket,sys;h,p='$LISTEN'.rsplit(':',1);socket.create_connection((h.strip('[]'),int(p)),timeout=0.2).close()" 2>/dev/null
  then echo "$VARS"; exit 0; fi
  kill -0 "$(cat "$DIR/smtp-sink.pid")" 2>/dev/null || break
  sleep 0.05
done
echo "smtp-sink did not start; log:" >&2
cat "$DIR/smtp-sink.log" >&2 || true
exit 1
