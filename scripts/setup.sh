# Sourced by the other scripts: a project virtualenv with the worker and its test tools, installed once per
# change of pyproject.toml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.installed-$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  # torch before anything that depends on it: torch==2.13.0 is the CPU build on this machine's disk, and a bare
  # dependency on torch would otherwise pull a multi-GB CUDA build.
  pip install --quiet torch==2.13.0
  # The versions the Docker image installs (scripts/lock.sh), so that the tests run on what ships.
  pip install --quiet -c requirements/constraints.txt -e ".[test]"
  touch "$stamp"
fi
