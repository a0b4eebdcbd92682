#!/usr/bin/env bash
# Create .venv (if missing) and install asyncflow with every runtime and the test
# tools and the documentation site's (tests/test_docs_site.py builds it), plus the
# out-of-tree example adapter the tests exercise.  As root, also
# install the Debian packages of the Slurm test cluster (tests/hpc) and the
# Chromium the report tests open pages in (tests/browser.py), if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in slurmctld:slurm-wlm munged:munge nsenter:util-linux ip:iproute2 ss:iproute2 \
    chromium:chromium; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "ci/setup.sh: the Slurm and browser tests need ${need[*]} (apt-get install as root)" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# tests/test_wheel.py builds the wheel offline (no build isolation), so the build
# backend that pyproject.toml names must be installed in .venv itself.
mapfile -t build_requires < <(.venv/bin/python -c 'import tomllib
toml = tomllib.load(open("pyproject.toml", "rb"))
print(*toml["build-system"]["requires"], sep="\n")')
.venv/bin/python -m pip install -q --disable-pip-version-check "${build_requires[@]}"
.venv/bin/python -m pip install -q --disable-pip-version-check \
    -e '.[all,test,docs]' -e tests/example_adapter
