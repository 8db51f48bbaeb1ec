"""The benchmarks run: bench/perf.py end to end with tiny counts (its table and JSON; the cold start's baseline loader
on its own, as two more cold starts would double the cost), bench/gpu.py refuses a machine without CUDA and reads the
speed-ups off a loaded worker. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from diffusion_worker.runtime import Worker

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from gpu import speedups  # noqa: E402
from perf import markdown, seconds_to_ready  # noqa: E402


def test_perf_prints_and_writes_every_section_with_its_baselines(tiny_models_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "perf.json"
    # fmt: off
    command = [
        sys.executable, str(REPO / "bench" / "perf.py"), "--models-dir", str(tiny_models_dir), "--output", str(output),
        "--size", "64", "--repeats", "1", "--jobs", "2", "--formats", "png",
        "--sections", "overhead,handler,memory,resident",
    ]
    # fmt: on
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["machine"]["cores"] >= 1
    rows = {(row["section"], row["measure"]): row for row in report["rows"]}
    expected = {
        ("memory", "all pipelines' weights"),
        ("handler", "txt2img 64² png s3 ×1, 1 step"),
        ("handler", "txt2img 64² png s3 ×4, 1 step"),
        *(
            ("overhead", f"{source} png {sink} ×{count}")
            for source in ("tiny", "photos")
            for sink in ("inline", "s3")
            for count in (1, 4)
        ),
        ("resident", "resident memory after job 2 vs job 20"),
        ("resident", "clean-up per job vs the whole job"),
    }
    assert rows.keys() == expected
    for row in rows.values():
        assert row["worker"] > 0 and row["baseline"] > 0
        assert row["ratio"] == row["worker"] / row["baseline"]
    # One table: a header, then every row, as printed; and as the README shows it.
    for section, measure in expected:
        assert any(line.startswith(section) and measure in line for line in completed.stdout.splitlines())
    assert sum(
        line.startswith(("| overhead", "| handler", "| memory", "| resident")) for line in markdown(report).splitlines()
    ) == len(expected)


def test_the_cold_starts_baseline_loads_the_same_models(tiny_models_dir: Path) -> None:
    command = [sys.executable, str(REPO / "bench" / "bare_load.py"), str(tiny_models_dir)]
    assert seconds_to_ready(command, {"PATH": "/usr/bin:/bin"}) > 0


def test_gpu_benchmark_refuses_a_machine_without_cuda() -> None:
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py")], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 1
    assert "found none; on a CPU machine run bench/perf.py" in completed.stderr


def test_gpu_benchmark_lists_the_speed_ups_in_force(worker: Worker) -> None:
    found = speedups(worker)
    assert "AttnProcessor2_0 (SDPA)" in found["sdxl attention"]
    assert found["sdxl vae"] == "madebyollin/sdxl-vae-fp16-fix"
    assert found["sdxl channels-last"] == "off" and found["sdxl torch.compile"] == "off"
    assert {"txt2video attention", "img2video dtype", "tf32 matmul"} <= found.keys()


def test_encoders_prints_the_chosen_group_against_its_baseline() -> None:
    command = [sys.executable, str(REPO / "bench" / "encoders.py"), "--size", "64", "--repeats", "1"]
    completed = subprocess.run([*command, "--groups", "thumbnail"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = completed.stdout.splitlines()[1:]
    # Every candidate on photos and on noise, the worker's own among them, and nothing of the other groups.
    assert len(rows) == 2 * 6 and all(row.startswith("thumbnail 256 webp") for row in rows)
    assert sum("the worker's" in row for row in rows) == 2
