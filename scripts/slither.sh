#!/usr/bin/env bash
# Static analysis of every contract in CONTRACTS_DIR/src (the registry and the city score
# oracle) with Slither, fed a Hardhat-style build-info written by contracts/compile.py
# (Slither cannot drive solc-js itself). Fails on any High or Medium finding, and when a
# source in src/ was not analysed. Test-only contracts are not analysed.
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
"$SLITHER" . --hardhat-ignore-compile --npx-disable --print contract-summary \
  >"$work/summary.log" 2>&1 || { cat "$work/summary.log"; exit 1; }
python3 - "$work/slither.json" "$work/summary.log" "$root"/src/*.sol <<'PY'
import json, re, sys
from pathlib import Path
report = json.load(open(sys.argv[1]))
found = report.get("results", {}).get("detectors", [])
summary = re.sub(r"\x1b\[[0-9;]*m", "", Path(sys.argv[2]).read_text())
analysed = set(re.findall(r"^\+ Contract (\w+)", summary, re.MULTILINE))
expected = {Path(p).stem for p in sys.argv[3:]}
missing = sorted(expected - analysed)
print(f"slither: analysed {', '.join(sorted(expected & analysed))}")
if missing:
    print(f"slither: not analysed: {', '.join(missing)}", file=sys.stderr)
print(f"slither: {len(found)} High/Medium findings in contracts/src (success={report['success']})")
sys.exit(1 if found or missing or not report["success"] else 0)
PY
