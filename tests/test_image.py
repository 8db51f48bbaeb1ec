"""The Docker image, checked without a docker engine: its dependency pins match the environment the tests pass in."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import lock  # noqa: E402

CONSTRAINTS = REPO / "requirements" / "constraints.txt"


def test_constraints_pin_what_the_tests_run_on() -> None:
    pinned = dict(
        line.split("==") for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")
    )
    assert pinned == lock.runtime_closure(), "requirements/constraints.txt is stale: run scripts/lock.sh"
    assert "torch" not in pinned
