#!/usr/bin/env bash
# Start a private unbound on 127.0.0.1:PORT that answers ONLY from local data
# (never recurses to the Internet) with the filterhost test zone under .test.
#
# usage: unbound.sh [--daemon] [PORT]
#   PORT      UDP+TCP port on 127.0.0.1 (default: a free port picked by python3)
#   --daemon  unbound forks; pidfile $UNBOUND_DIR/unbound.pid; the script waits
#             until a query answers, prints the variables and exits 0.
#   (default) foreground: prints the variables to stderr, then exec's unbound -d
#             so the PID of this script IS unbound's PID (good for Popen()).
# env: UNBOUND_DIR         use this directory instead of a fresh `mktemp -d`
#      UNBOUND_EXTRA_DATA  extra server: lines, one per line, each starting with
#                          local-data:, local-data-ptr: or local-zone:, e.g.
#                          local-data: 'spf.test. 60 IN TXT "v=spf1 -all"'
#
# Test data (all under .test, RFC 6761):
#   mx.test        MX 10 mx1.mx.test, MX 20 mx2.mx.test, MX 30 mx3.mx.test
#   mx1.mx.test    A 127.0.0.2            mx2.mx.test  A 127.0.0.3
#   mx3.mx.test    A 127.0.0.4, AAAA ::1
#   amx.test       A 127.0.0.2, no MX (implicit MX, RFC 5321 5.1) -> NoAnswer for MX
#   nullmx.test    MX 0 .  (null MX, RFC 7505)
#   v6.test        MX 10 v6host.v6.test;  v6host.v6.test AAAA ::1 (no A)
#   danglingmx.test MX 10 nx.nx.test (MX target does not exist)
#   nx.test        NXDOMAIN for the name and everything below it
#   servfail.test  SERVFAIL (forwarded to a do-not-query address)
#   timeout.test   query is dropped -> client timeout
#   refused.test   REFUSED
#   anything outside the local zones: REFUSED (local-zone "." refuse)
# Added for filterhost's own tests:
#   smart.test     A 127.0.0.5            (a smart host)
#   loop.test      MX 10 mx1.mx.test      (a second domain on the same MX host)
set -euo pipefail

DAEMON=no
if [ "${1:-}" = "--daemon" ]; then DAEMON=yes; shift; fi
PORT="${1:-}"
if [ -z "$PORT" ]; then
  PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
fi
DIR="${UNBOUND_DIR:-$(mktemp -d -t unbound.XXXXXX)}"
DIR="$(cd "$DIR" && pwd)"

# Only local data may be added: anything else could make unbound recurse or listen
# elsewhere, and a typo should fail here rather than as a puzzling test failure.
EXTRA=""
while IFS= read -r line; do
  line="${line#"${line%%[![:space:]]*}"}"   # strip leading blanks
  case "$line" in
    "") ;;
    local-data:*|local-data-ptr:*|local-zone:*) EXTRA+="    $line"$'\n' ;;
    *) echo "unbound.sh: UNBOUND_EXTRA_DATA: not a local-data/local-zone line: $line" >&2
       exit 2 ;;
  esac
done <<< "${UNBOUND_EXTRA_DATA:-}"

cat > "$DIR/unbound.conf" <<EOF
server:
    interface: 127.0.0.1@$PORT
    port: $PORT
    do-ip4: yes
    do-ip6: no
    do-udp: yes
    do-tcp: yes
    access-control: 127.0.0.0/8 allow
    # run as the invoking user, no chroot, files in the temp dir
    username: ""
    chroot: ""
    directory: "$DIR"
    pidfile: "$DIR/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 1
    log-servfail: yes
    num-threads: 1
    # no DNSSEC validator / trust anchor (would need root key and network)
    module-config: "iterator"
    # outgoing queries: loopback only. servfail.test is forwarded to an
    # address on the do-not-query list, so unbound has no server to ask and
    # answers SERVFAIL at once (a closed port instead costs >2 s of retries)
    do-not-query-localhost: no
    outgoing-interface: 127.0.0.1
    do-not-query-address: 127.0.0.254
    # no caching games between tests
    cache-max-ttl: 0
    cache-max-negative-ttl: 0
    serve-expired: no
    minimal-responses: yes

    # never recurse: every name outside the zones below is REFUSED
    local-zone: "." refuse

    # ("test." is a built-in static local zone in unbound; we add data to it)
    local-zone: "test." static
    local-data: "mx.test.          60 IN MX 10 mx1.mx.test."
    local-data: "mx.test.          60 IN MX 20 mx2.mx.test."
    local-data: "mx.test.          60 IN MX 30 mx3.mx.test."
    local-data: "mx1.mx.test.      60 IN A 127.0.0.2"
    local-data: "mx2.mx.test.      60 IN A 127.0.0.3"
    local-data: "mx3.mx.test.      60 IN A 127.0.0.4"
    local-data: "mx3.mx.test.      60 IN AAAA ::1"
    local-data: "amx.test.         60 IN A 127.0.0.2"
    local-data: "nullmx.test.      60 IN MX 0 ."
    local-data: "v6.test.          60 IN MX 10 v6host.v6.test."
    local-data: "v6host.v6.test.   60 IN AAAA ::1"
    local-data: "danglingmx.test.  60 IN MX 10 nx.nx.test."

    local-zone: "nx.test." always_nxdomain
    local-zone: "timeout.test." deny
    local-zone: "refused.test." always_refuse
    local-zone: "servfail.test." transparent

    # filterhost tests
    local-data: "smart.test.        60 IN A 127.0.0.5"
    local-data: "loop.test.         60 IN MX 10 mx1.mx.test."

    # UNBOUND_EXTRA_DATA
$EXTRA
remote-control:
    control-enable: no

forward-zone:
    name: "servfail.test."
    forward-addr: 127.0.0.254
    forward-first: no
EOF

if ! out=$(unbound-checkconf "$DIR/unbound.conf" 2>&1); then
  echo "unbound.sh: bad config $DIR/unbound.conf: $out" >&2
  exit 2
fi

RUN=()
if [ "$(id -u)" = 0 ]; then   # drop to nobody (username: "" keeps unbound from doing it)
  chown -R nobody "$DIR"; chmod 755 "$DIR"
  RUN=(setpriv --reuid=nobody --regid=nogroup --clear-groups --)
fi

VARS="UNBOUND_DIR=$DIR DNS_HOST=127.0.0.1 DNS_PORT=$PORT UNBOUND_PIDFILE=$DIR/unbound.pid"
if [ "$DAEMON" = no ]; then
  echo "$VARS" >&2
  exec "${RUN[@]}" /usr/sbin/unbound -d -c "$DIR/unbound.conf"
fi

"${RUN[@]}" /usr/sbin/unbound -c "$DIR/unbound.conf"
for _ in $(seq 1 200); do
  if python3 - "$PORT" <<'PY' 2>/dev/null
import socket, struct, sys
# tiny hand-made query: id=1, RD, 1 question mx.test/MX
q = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x02mx\x04test\x00" + struct.pack("!HH", 15, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.2)
s.sendto(q, ("127.0.0.1", int(sys.argv[1])))
sys.exit(0 if s.recv(512)[:2] == b"\x00\x01" else 1)
PY
  then echo "$VARS"; exit 0; fi
  sleep 0.05
done
echo "unbound did not answer within 10 s" >&2
exit 1
