#!/usr/bin/env bash
# The whole test suite, as the README documents it and as CI runs it:
# install, lint, type-check, then pytest (every test under pytest-timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# Runtimes write caches and ids under $HOME; keep them out of the user's.
export RAY_USAGE_STATS_ENABLED=0
ruff check .
ruff format --check .
bash ci/typecheck.sh
set +e
timeout --signal=INT --kill-after=60 85m python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "ci/test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
