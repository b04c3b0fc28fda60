#!/usr/bin/env bash
# A private, throw-away Postfix relay: the yardstick of `make bench` (DESIGN.md section 5).
#   postfix_instance.sh create DIR FRONT_PORT SINK_PORT   write DIR/conf, DIR/queue, DIR/data
#   postfix_instance.sh start  DIR                         start it (master daemonizes)
#   postfix_instance.sh pid    DIR                         the master's PID
#   postfix_instance.sh qsize  DIR                         queue files not yet delivered
#   postfix_instance.sh stop   DIR
# It listens on 127.0.0.1:FRONT_PORT and relays everything to [127.0.0.1]:SINK_PORT. Postfix's
# defaults otherwise, durability included: cleanup fsyncs each queue file before smtpd answers 250,
# so DIR must be on a real disk (not tmpfs). No local delivery, no DNS, no chroot; it logs to
# DIR/maillog through postlogd because there is no syslog daemon in the namespace. The system
# Postfix (/etc/postfix) is never touched: every command names this instance's config directory.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
cmd=${1:-}; D=${2:-}
[ -n "$D" ] || { echo "usage: $0 create|start|stop|pid|qsize DIR ..." >&2; exit 2; }
case "$cmd" in
create)
  FRONT=$3; SINK=$4
  mkdir -p "$D/conf" "$D/queue" "$D/data"
  D=$(cd "$D" && pwd)
  chmod 755 "$D"
  chown postfix "$D/data"
  cat > "$D/conf/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $D/queue
data_directory = $D/data
command_directory = $(postconf -dh command_directory)
daemon_directory = $(postconf -dh daemon_directory)
shlib_directory = $(postconf -dh shlib_directory)
meta_directory = $(postconf -dh meta_directory)
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file = $D/maillog
myhostname = postfix-bench.localdomain
mydomain = localdomain
myorigin = \$myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery disabled
alias_maps =
alias_database =
relay_domains =
relayhost = [127.0.0.1]:$SINK
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_banner = \$myhostname ESMTP
biff = no
smtputf8_enable = no
# Defaults kept on purpose (this is Postfix as shipped): in_flow_delay = 1s,
# default_destination_concurrency_limit = 20, smtp_connection_cache_on_demand = yes,
# default_process_limit = 100.
EOF
  # master.cf: Debian's services minus chroot, local, virtual, pipe and friends.
  cat > "$D/conf/master.cf" <<EOF
127.0.0.1:$FRONT inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
EOF
  postfix -c "$D/conf" set-permissions >/dev/null 2>&1 || true
  postfix -c "$D/conf" check
  ;;
start) postfix -c "$D/conf" start ;;
stop)  postfix -c "$D/conf" stop || true ;;
pid)   tr -d ' \n' < "$D/queue/pid/master.pid" ;;
qsize) find "$D/queue/incoming" "$D/queue/active" "$D/queue/deferred" "$D/queue/maildrop" \
         -type f 2>/dev/null | wc -l ;;
*) echo "usage: $0 create|start|stop|pid|qsize DIR ..." >&2; exit 2 ;;
esac
