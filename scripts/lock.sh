#!/usr/bin/env bash
# Regenerates requirements/constraints.txt, the versions the Docker image installs, from this project's .venv
# (the environment the tests pass in). Run it after changing a dependency in pyproject.toml, then run the tests.
source "$(dirname "$0")/setup.sh"
python scripts/lock.py > requirements/constraints.txt
echo "requirements/constraints.txt: $(grep -vc '^#' requirements/constraints.txt) pins"
