#!/usr/bin/env bash
# Lint, format check and the whole test suite, on CPU with tiny models the tests build themselves.
source "$(dirname "$0")/setup.sh"
ruff check .
ruff format --check .
hadolint Dockerfile
python -m pytest "$@"
