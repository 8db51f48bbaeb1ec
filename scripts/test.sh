#!/usr/bin/env bash
# Lint (Python, the Dockerfile, the CI workflows), format check and the whole test suite, on CPU with tiny models
# the tests build themselves.
source "$(dirname "$0")/setup.sh"
ruff check .
ruff format --check .
hadolint Dockerfile
check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
python -m pytest "$@"
