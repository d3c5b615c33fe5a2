#!/usr/bin/env bash
# The test suite against several torch releases, each in a virtual environment of its own:
#
#     bash tools/test_torch_versions.sh                  # the releases the README lists
#     bash tools/test_torch_versions.sh 2.9.1 2.13.0     # these
#
# Environments are kept under .venvs/ (reused on the next run). Prints one line per release
# and exits non-zero if any release fails.
set -uo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
    versions=(2.9.1 2.10.0 2.11.0 2.12.1 2.13.0 2.14.1)
fi
status=0
summary=()
for version in "${versions[@]}"; do
    venv=".venvs/torch-$version"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet "torch==$version" -e ".[test]" || { summary+=("$version: install failed"); status=1; continue; }
    fi
    log="$venv/pytest.log"
    if "$venv/bin/python" -m pytest -q -p no:cacheprovider >"$log" 2>&1; then
        summary+=("$version: $(tail -n 1 "$log")")
    else
        summary+=("$version: FAILED, $(tail -n 1 "$log") (log: $log)")
        status=1
    fi
done
printf '%s\n' "${summary[@]}"
exit $status
