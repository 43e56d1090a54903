#!/usr/bin/env bash
# Static analysis of the registry with Slither, fed a Hardhat-style build-info written by
# contracts/compile.py (Slither cannot drive solc-js itself). Fails on any High or Medium
# finding. Test-only contracts are not analysed.
# Usage: scripts/slither.sh [CONTRACTS_DIR]   (default: contracts; reads CONTRACTS_DIR/src)
set -euo pipefail
cd "$(dirname "$0")/.."
SLITHER=$PWD/.tools/slither/bin/slither
[ -x "$SLITHER" ] || { echo "slither is not installed: run make setup" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$(realpath "${1:-contracts}")
.venv/bin/python contracts/compile.py --build-info "$work" --root "$root"
cd "$work"
"$SLITHER" . --hardhat-ignore-compile --npx-disable \
  --exclude-informational --exclude-low --exclude-optimization \
  --fail-medium --json "$work/slither.json" >"$work/slither.log" 2>&1 && status=0 || status=$?
if [ "$status" -ne 0 ]; then
  cat "$work/slither.log"
  echo "slither: High or Medium findings (or an analysis error) in contracts/src" >&2
  exit "$status"
fi
python3 - "$work/slither.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
found = report.get("results", {}).get("detectors", [])
print(f"slither: {len(found)} High/Medium findings in contracts/src (success={report['success']})")
sys.exit(1 if found or not report["success"] else 0)
PY
