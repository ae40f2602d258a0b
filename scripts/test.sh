#!/usr/bin/env bash
# Run the test suite (lint, types, tests). Extra arguments go to pytest, e.g.
#   scripts/test.sh -m slow        the long fault-injection suites
#   scripts/test.sh -m "slow or not slow"   everything
source "$(dirname "$0")/env.sh"
ensure_venv "train,test,dev"
cd "$ROOT"
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] \
  || { echo "the tests need the mosquitto binary (Debian: apt-get install mosquitto)" >&2; exit 1; }
echo "== ruff" >&2
"$VENV/bin/ruff" check daemon tests bench
echo "== mypy" >&2
"$VENV/bin/mypy"
echo "== pytest" >&2
exec "$VENV/bin/pytest" "$@"
