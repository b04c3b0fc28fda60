#!/usr/bin/env bash
# Install the system packages the test suite starts as real components on loopback:
#   clamav-daemon (clamd), unbound, postfix (smtp-sink, smtp-source), swaks,
#   libnet-ssleay-perl (swaks --tls), iproute2 (ip), util-linux (unshare, setpriv),
#   and python3-venv if `python3 -m venv` cannot work (Debian splits ensurepip out).
#
# Idempotent: when everything is present it prints one line and never calls apt.
# Never starts a daemon: apt runs behind a policy-rc.d that forbids service starts
# (freshclam would try the Internet, postfix "Internet Site" would listen on :25),
# and postfix is preseeded to "No configuration" (smtp-sink needs no main.cf).
set -euo pipefail

# Binaries may live in sbin directories that a non-root PATH lacks.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# "check|package": a check is a command name, perl:Module or py:module.
NEEDS=(
  "clamd|clamav-daemon"
  "unbound|unbound"
  "unbound-checkconf|unbound"
  "smtp-sink|postfix"
  "smtp-source|postfix"
  "swaks|swaks"
  "perl:Net::SSLeay|libnet-ssleay-perl"
  "ip|iproute2"
  "unshare|util-linux"
  "setpriv|util-linux"
  "py:ensurepip|python3-venv"
)

present() {
  case "$1" in
    perl:*) command -v perl >/dev/null 2>&1 && perl -M"${1#perl:}" -e 1 2>/dev/null ;;
    py:*) command -v python3 >/dev/null 2>&1 && python3 -c "import ${1#py:}" 2>/dev/null ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

missing_packages() {
  local entry check pkg
  local -A seen=()
  for entry in "${NEEDS[@]}"; do
    check="${entry%%|*}"; pkg="${entry#*|}"
    if ! present "$check" && [ -z "${seen[$pkg]:-}" ]; then
      seen[$pkg]=1
      printf '%s\n' "$pkg"
    fi
  done
}

mapfile -t MISSING < <(missing_packages)
if [ "${#MISSING[@]}" -eq 0 ]; then
  echo "install-test-deps: all test dependencies present, nothing to do"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-test-deps: missing packages: ${MISSING[*]}" >&2
  echo "install-test-deps: run as root (e.g. sudo $0) to install them" >&2
  exit 1
fi

POLICY=/usr/sbin/policy-rc.d
cleanup() { :; }
if [ ! -e "$POLICY" ]; then
  # exit 101 = "action forbidden": invoke-rc.d and deb-systemd-invoke start nothing.
  printf '#!/bin/sh\n# temporary, from filterhost scripts/install-test-deps.sh\nexit 101\n' > "$POLICY"
  chmod 755 "$POLICY"
  cleanup() { rm -f "$POLICY"; }
fi
trap cleanup EXIT

echo "install-test-deps: installing ${MISSING[*]}"
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=300 update
apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${MISSING[@]}"

mapfile -t STILL < <(missing_packages)
if [ "${#STILL[@]}" -ne 0 ]; then
  echo "install-test-deps: still missing after install: ${STILL[*]}" >&2
  exit 1
fi
echo "install-test-deps: done"
