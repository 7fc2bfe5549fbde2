"""scripts/benchmark.py runs end to end on the tiny checkpoint and its tiny 5 Hz LM (so it never
rots; no timings are asserted: speed is what the script reports, not what a test decides)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark.py"
STAGES = {"text", "condition", "diffusion", "vae", "write", "total"}
LM_STATS = {"thought_s", "thought_tokens", "thought_tok_s", "codes_s", "codes", "codes_per_s"}


def run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--durations", "1"]
    done = subprocess.run(
        [*command, "--repeats", "1", "--daemon-requests", "2", "--throughput", "0", *args],
        capture_output=True,
        text=True,
        env=env | {"HF_HUB_OFFLINE": "1"},
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_benchmark_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)


def test_tiny_benchmark_prints_a_markdown_table_with_every_stage() -> None:
    out = run()
    assert "| duration (s) | text (s) | condition (s) | diffusion (s) | VAE decode (s) |" in out
    row = next(line for line in out.splitlines() if line.startswith("| 1 |"))
    assert len(row.strip("|").split("|")) == 9
    assert "daemon (tiny checkpoint): ready" in out
    assert "requests/s" in out
    assert "5 Hz LM planner (acestep-5Hz-lm-0.6B;" in out
    assert "| duration (s) | thought tokens | thought (s) | thought tok/s | codes |" in out
    lm_row = [line for line in out.splitlines() if line.startswith("| 1 |")][1]
    assert len(lm_row.strip("|").split("|")) == 9


def test_tiny_benchmark_json_has_stage_times_memory_and_daemon_figures() -> None:
    report = json.loads(run("--json"))
    assert report["model"] == "tiny"
    assert report["torch"]
    assert report["dtype"] in {"fp32", "bf16"}
    (row,) = report["durations"]
    assert row["duration_s"] == 1
    assert set(row["ours"]) == STAGES
    assert all(value >= 0 for value in row["ours"].values())
    assert row["ours"]["total"] >= row["ours"]["diffusion"] > 0
    assert row["ours_peak_gib"] > 0
    assert report["load_s"] > 0
    daemon = report["daemon"]
    assert daemon["ready_s"] > 0
    assert daemon["status_per_s"] > 0
    assert daemon["overhead_ms"] > 0
    lm = report["lm"]
    assert lm["folder"] == "acestep-5Hz-lm-0.6B"
    (row,) = lm["durations"]
    assert row["duration_s"] == 1 and "official" not in row
    ours = row["ours"]
    assert set(ours) >= LM_STATS
    assert ours["codes"] == 5  # 5 codes per second of song
    assert ours["thought_tokens"] > 10 and ours["thought_tok_s"] > 0 and ours["codes_per_s"] > 0
    assert ours["peak_gib"] > 0 and ours["load_s"] > 0


def test_throughput_table_has_socket_and_queue_rows_for_one_and_two_workers() -> None:
    args = ("--lm", "none", "--daemon-requests", "0", "--throughput", "2")
    out = run(*args, "--throughput-duration", "1")
    assert "| path | workers | jobs/min | overhead (ms) |" in out
    rows = [line.split("|")[1:5] for line in out.splitlines() if line.startswith("| socket")]
    rows += [line.split("|")[1:5] for line in out.splitlines() if line.startswith("| queue")]
    assert [(path.strip(), int(workers)) for path, workers, _, _ in rows] == [
        ("socket", 1),
        ("socket", 2),
        ("queue", 1),
        ("queue", 2),
    ]
    assert all(float(rate) > 0 and float(overhead) > 0 for _, _, rate, overhead in rows)


def test_lm_none_skips_the_planner_and_lm_only_skips_the_rest() -> None:
    assert "lm" not in json.loads(run("--json", "--lm", "none", "--daemon-requests", "0"))
    out = run("--lm-only")
    assert "| duration (s) | text (s)" not in out and "daemon" not in out
    assert "| duration (s) | thought tokens |" in out
    assert any(line.startswith("| 1 | ") and "| 5 |" in line for line in out.splitlines())


def test_memory_table_runs_each_setup_against_the_plain_latents() -> None:
    """On the CPU: plain, int8 and fp8 (offload needs a GPU), each with its peaks and time;
    the plain row is its own reference, the 8-bit rows land near it but not on it."""
    args = ("--json", "--lm", "none", "--daemon-requests", "0", "--memory", "1")
    report = json.loads(run(*args))
    rows = {row["setup"]: row for row in report["memory"]}
    assert list(rows) == ["plain", "int8", "fp8"]
    assert rows["plain"]["latents_error"] == 0
    assert all(0 < rows[name]["latents_error"] < 0.2 for name in ("int8", "fp8"))
    assert all(row["peak_gib"] >= row["load_peak_gib"] > 0 for row in rows.values())
    assert all(row["peak_gib"] >= row["resident_gib"] > 0 for row in rows.values())
    assert all(row["total_s"] >= row["diffusion_s"] > 0 for row in rows.values())
    assert report["memory_duration_s"] == 1
