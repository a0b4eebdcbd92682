#!/usr/bin/env bash
# Create .venv (if missing) and install asyncflow with every runtime and the test
# tools, plus the out-of-tree example adapter the tests exercise.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check \
    -e '.[all,test]' -e tests/example_adapter
