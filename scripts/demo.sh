#!/usr/bin/env bash
# Runs test_input.json through the real handler.py on tiny random-weight models and writes the images to
# outputs/. The first run installs the dependencies and builds the tiny models (a few minutes).
source "$(dirname "$0")/setup.sh"
export MODELS_DIR="${MODELS_DIR:-$PWD/models}"
export OUTPUT_DIR="${OUTPUT_DIR:-$PWD/outputs}"
python builder/fetch_models.py --tiny --models-dir "$MODELS_DIR"
python handler.py "$@"
echo "Results of job local_test are in $OUTPUT_DIR/local_test/"
ls -l "$OUTPUT_DIR/local_test/"
