"""The out-of-memory policy at a CPU home, through a real daemon, driven by injected
torch.cuda.OutOfMemoryError (ACESTEP_INJECT_OOM). A CPU home has nowhere to fall back
to: one run, then the answer. The GPU's retries and CPU fallback need a GPU home.
"""

from __future__ import annotations

from pathlib import Path

import torch

from acestep_daemon.pipeline import default_dtype
from tests.daemon_harness import daemon_env, running

CPU_DEFAULT = str(default_dtype(torch.device("cpu"))).removeprefix("torch.")
"""The dtype the policy chooses on this machine's CPU (bfloat16 or float32)."""


def test_cpu_home_text_oom_is_answered_once_with_advice(tmp_path: Path, tiny_checkpoint: Path):
    """At a CPU home an injected OOM is answered as running out of RAM, without a second run."""
    env = daemon_env(tmp_path, ACESTEP_INJECT_OOM="text:1")
    with running(tmp_path, "--model-dir", str(tiny_checkpoint), env=env) as daemon:
        assert (daemon.status()["device"], daemon.status()["dtype"]) == ("cpu", CPU_DEFAULT)
        answer = daemon.ask({"caption": "x", "duration_s": 1, "output": str(tmp_path / "a.wav")})
        assert answer["ok"] is False and answer["code"] == "oom", answer
        assert "fewer seeds" in answer["error"]
        status = daemon.status()
        assert (status["oom_retries"], status["cpu_fallbacks"]) == (0, 0)
        assert not (tmp_path / "a.wav").exists()
        again = daemon.ask({"caption": "x", "duration_s": 1})
        assert again["ok"] and again["fallback"] is None and again["oom_retries"] == 0
