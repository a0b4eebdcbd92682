#!/usr/bin/env bash
# mypy over the whole installed package: asyncflow/ plus adapters/ and
# conformance/, which setuptools maps to asyncflow.adapters and
# asyncflow.conformance.  mypy cannot follow that mapping, so it checks a
# throw-away tree of symlinks laid out the way the package is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/asyncflow"
for entry in asyncflow/*; do
    ln -s "$PWD/$entry" "$tree/asyncflow/$(basename "$entry")"
done
ln -s "$PWD/adapters" "$tree/asyncflow/adapters"
ln -s "$PWD/conformance" "$tree/asyncflow/conformance"
cd "$tree"
exec mypy --config-file "$OLDPWD/pyproject.toml" -p asyncflow
