#!/usr/bin/env bash
# `make demo`: filterhost's five-minute tour, offline (see demo/demo.py for what it does).
#
# usage: demo/run.sh [--summary FILE]
# Inside a private network namespace already (the test suite runs in one), it runs the tour
# directly; otherwise it enters one with scripts/netns-run first, so nothing it starts can
# reach (or be reached from) beyond loopback.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${DEMO_PYTHON:-$REPO/.venv/bin/python}"   # DEMO_PYTHON: another interpreter with filterhost
if [ ! -x "$PY" ]; then
  echo "demo: $PY not found; run 'make venv' first" >&2
  exit 127
fi

# /proc/net/dev lists the interfaces of this process's own network namespace.
if tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | grep -qvx lo; then
  if [ -n "${FILTERHOST_DEMO_NETNS:-}" ]; then
    echo "demo: still not in a private network namespace after netns-run" >&2
    exit 126
  fi
  export FILTERHOST_DEMO_NETNS=1
  exec "$REPO/scripts/netns-run" "$PY" "$HERE/demo.py" "$@"
fi
exec "$PY" "$HERE/demo.py" "$@"
