#!/usr/bin/env bash
# Set up everything HealthLab needs, idempotently; quick when nothing changed.
#   system : Debian packages (nodejs, npm, postgresql, chromium for the browser tests)
#            — installed when root or sudo allows
#   python : .venv with the project and its dev tools, pinned by constraints.txt
#   npm    : solc-js, anvil and cast in contracts/node_modules; the IPFS importer the CID
#            tests compare against in tests/ipfs_reference/node_modules (npm ci, lock files)
#   slither: slither-analyzer in its own venv (.tools/slither): it needs web3<8
# Under CI (CI=true) anything missing is an error, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
TOOLS=.tools
# Playwright drives this browser (tests/test_browser.py); it never downloads its own
CHROMIUM=${HEALTHLAB_CHROMIUM:-/usr/bin/chromium}

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }
digest() { cat "$@" | sha256sum | cut -d' ' -f1; }
fresh() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

ci() { case "${CI:-}" in 1 | true | yes) return 0 ;; *) return 1 ;; esac; }

system() {
  local missing=()
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  [ -x "$CHROMIUM" ] || missing+=(chromium fonts-liberation)
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      local hint="sudo apt-get install -y ${missing[*]}"
      # without a browser only the browser tests skip (locally; under CI they fail)
      if [ "${missing[*]}" = "chromium fonts-liberation" ] && ! ci; then
        say "no $CHROMIUM: the browser tests will be skipped. Install it with: $hint"
        return 0
      fi
      die "missing Debian packages: ${missing[*]}. Install them with: $hint"
    fi
  fi
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get here: install Node.js >= 20, npm, PostgreSQL and Chromium (or set HEALTHLAB_CHROMIUM to a Chromium binary)"
  say "installing Debian packages: ${missing[*]}"
  # the tests start their own PostgreSQL servers: no default cluster on port 5432
  $sudo mkdir -p /etc/postgresql-common
  echo "create_main_cluster = false" | $sudo tee /etc/postgresql-common/createcluster.conf >/dev/null
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_env() {
  local want; want=$(digest pyproject.toml constraints.txt)
  fresh "$VENV/.healthlab-stamp" "$want" && return 0
  say "installing Python packages into $VENV (pinned by constraints.txt)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$VENV/.healthlab-stamp"
}

npm_env() {
  npm_ci contracts "solc, anvil and cast"
  npm_ci tests/ipfs_reference "the IPFS UnixFS importer the CID tests compare against"
}

npm_ci() {
  local dir=$1 what=$2 want
  want=$(digest "$dir/package-lock.json")
  fresh "$dir/node_modules/.healthlab-stamp" "$want" && return 0
  say "installing npm packages in $dir/ ($what)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$dir/node_modules/.healthlab-stamp"
}

slither_env() {
  local want; want=$(digest scripts/slither-requirements.txt)
  fresh "$TOOLS/slither/.healthlab-stamp" "$want" && return 0
  say "installing slither-analyzer into $TOOLS/slither"
  [ -x "$TOOLS/slither/bin/python" ] || "$PYTHON" -m venv "$TOOLS/slither"
  "$TOOLS/slither/bin/python" -m pip install -q --upgrade pip
  "$TOOLS/slither/bin/python" -m pip install -q -r scripts/slither-requirements.txt
  echo "$want" > "$TOOLS/slither/.healthlab-stamp"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(system python npm slither)
for step in "${steps[@]}"; do
  case "$step" in
    system) system ;;
    python) python_env ;;
    npm) npm_env ;;
    slither) slither_env ;;
    *) die "unknown step $step (system, python, npm, slither)" ;;
  esac
done
