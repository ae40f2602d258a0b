# Sourced by the other scripts: create or refresh the project's virtual environment.
# Usage: ensure_venv EXTRAS   (e.g. ensure_venv "train" or ensure_venv "train,test,dev")
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="${ANOMALYD_VENV:-$ROOT/.venv}"

ensure_venv() {
  local extras=$1
  local stamp="$VENV/.anomalyd-$(echo "$extras" | tr ',' '-')-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-12)"
  if [ ! -x "$VENV/bin/python" ]; then
    local py="" cand
    # The first interpreter that actually runs and is new enough (a pyenv shim can exist
    # for a version that is not selected, and then fails).
    for cand in python3.11 python3.12 python3.13 python3; do
      if command -v "$cand" >/dev/null 2>&1 \
         && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
        py=$cand
        break
      fi
    done
    [ -n "$py" ] || { echo "anomalyd needs Python 3.11 or newer" >&2; exit 1; }
    echo "creating virtual environment in $VENV" >&2
    "$py" -m venv "$VENV"
  fi
  if [ ! -e "$stamp" ]; then
    echo "installing anomalyd[$extras] into $VENV (TensorFlow is large: the first time takes a few minutes)" >&2
    local log="$VENV/install.log"
    if ! { "$VENV/bin/python" -m pip install --upgrade pip \
           && "$VENV/bin/python" -m pip install -e "$ROOT[$extras]"; } > "$log" 2>&1; then
      tail -30 "$log" >&2
      echo "installation failed; full log: $log" >&2
      exit 1
    fi
    touch "$stamp"
  fi
}
