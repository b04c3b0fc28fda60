#!/usr/bin/env bash
# Start a private ClamAV daemon on loopback with a tiny custom signature DB
# (no official database, no freshclam, no network).
#
# usage: clamd.sh [--daemon] [PORT]
#   PORT      TCP port on 127.0.0.1 (default: a free port picked by python3)
#   --daemon  clamd forks; PidFile is $CLAMD_DIR/clamd.pid; this script waits
#             until clamd answers PING, prints the variables and exits 0.
#   (default) foreground: prints the variables to stderr, then exec's clamd,
#             so the PID of this script IS clamd's PID (good for Popen()).
# env:
#   CLAMD_DIR             use this directory instead of a fresh `mktemp -d`
#   CLAMD_STREAM_MAX      StreamMaxLength (default 2M)
#   CLAMD_USER            user to run as when started by root (default clamav,
#                         falls back to nobody); ignored when not root.
# Signatures written (both detect the 68-byte EICAR test string):
#   filterhost-test.ndb  body signature, matches EICAR anywhere in any
#                        (decoded) part, e.g. a base64 mail attachment
#   filterhost-test.hdb  MD5 of the exact 68-byte EICAR file
set -euo pipefail

DAEMON=no
if [ "${1:-}" = "--daemon" ]; then DAEMON=yes; shift; fi
PORT="${1:-}"
if [ -z "$PORT" ]; then
  PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
fi
DIR="${CLAMD_DIR:-$(mktemp -d -t clamd.XXXXXX)}"
DIR="$(cd "$DIR" && pwd)"
STREAM_MAX="${CLAMD_STREAM_MAX:-2M}"
FG=yes; [ "$DAEMON" = yes ] && FG=no

# shellcheck disable=SC2016  # the $ signs are part of the EICAR string
EICAR='X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
EICAR_HEX=$(printf '%s' "$EICAR" | od -An -v -tx1 | tr -d ' \n')
# .ndb: Name:TargetType(0=any):Offset(*=anywhere):HexSignature
echo "Filterhost.Test.EICAR-Body:0:*:${EICAR_HEX}" > "$DIR/filterhost-test.ndb"
# .hdb: MD5:Size:Name
echo "44d88612fea8a8f36de82e1278abb02f:68:Filterhost.Test.EICAR-MD5" > "$DIR/filterhost-test.hdb"

cat > "$DIR/clamd.conf" <<EOF
TCPSocket $PORT
TCPAddr 127.0.0.1
LocalSocket $DIR/clamd.sock
LocalSocketMode 666
Foreground $FG
PidFile $DIR/clamd.pid
DatabaseDirectory $DIR
LogFile $DIR/clamd.log
LogTime yes
LogVerbose no
ScanMail yes
ScanArchive yes
StreamMaxLength $STREAM_MAX
MaxThreads 8
SelfCheck 3600
EOF

RUN=()
if [ "$(id -u)" = 0 ]; then
  U="${CLAMD_USER:-clamav}"
  id "$U" >/dev/null 2>&1 || U=nobody
  chown -R "$U" "$DIR"
  chmod 755 "$DIR"
  RUN=(setpriv --reuid="$U" --regid="$(id -g "$U")" --init-groups --)
fi

VARS="CLAMD_DIR=$DIR CLAMD_HOST=127.0.0.1 CLAMD_PORT=$PORT CLAMD_SOCKET=$DIR/clamd.sock CLAMD_PIDFILE=$DIR/clamd.pid"

if [ "$DAEMON" = no ]; then
  echo "$VARS" >&2
  exec "${RUN[@]}" /usr/sbin/clamd --config-file="$DIR/clamd.conf"
fi

"${RUN[@]}" /usr/sbin/clamd --config-file="$DIR/clamd.conf"
for _ in $(seq 1 200); do
  if python3 - "$PORT" <<'PY' 2>/dev/null
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.sendall(b"zPING\0")
sys.exit(0 if s.recv(16).startswith(b"PONG") else 1)
PY
  then echo "$VARS"; exit 0; fi
  sleep 0.05
done
echo "clamd did not answer PING within 10 s; log:" >&2
cat "$DIR/clamd.log" >&2 || true
exit 1
