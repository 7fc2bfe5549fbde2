"""The out-of-memory policy, driven by real torch.cuda.OutOfMemoryError (ACESTEP_INJECT_OOM).

Injected errors fire only while the pipeline is at home, never in the CPU
fallback, so a reply that ran on the CPU in the CPU's default dtype while the
daemon's home is the other dtype shows that the fallback happened; `status`
then shows it went home.
"""

from __future__ import annotations

from pathlib import Path

import torch

from acestep_daemon.pipeline import default_dtype
from tests.daemon_harness import daemon_env, running

CPU_DEFAULT = str(default_dtype(torch.device("cpu"))).removeprefix("torch.")
"""The dtype the policy chooses on this machine's CPU (bfloat16 or float32)."""


def test_text_and_vae_oom_are_retried_at_home(tmp_path: Path, tiny_checkpoint: Path):
    env = daemon_env(tmp_path, ACESTEP_INJECT_OOM="text:1,vae:1")
    with running(tmp_path, "--model-dir", str(tiny_checkpoint), env=env) as daemon:
        # No --device/--dtype: the CPU (no GPU here) in the dtype the policy chose.
        assert (daemon.status()["device"], daemon.status()["dtype"]) == ("cpu", CPU_DEFAULT)
        answer = daemon.ask({"caption": "x", "duration_s": 1, "output": str(tmp_path / "a.wav")})
        assert answer["ok"] is True, answer
        assert answer["oom_retries"] == 2  # the text stage once, the VAE once
        assert answer["vae_chunk_frames"] == 256  # the VAE retry used half the chunk
        assert answer["fallback"] is None
        assert (answer["device"], answer["dtype"]) == ("cpu", CPU_DEFAULT)
        assert Path(answer["path"]).is_file()
        status = daemon.status()
        assert (status["oom_retries"], status["cpu_fallbacks"]) == (2, 0)
        again = daemon.ask({"caption": "x", "duration_s": 1})
        assert again["ok"] and again["oom_retries"] == 0 and again["vae_chunk_frames"] == 512


def test_diffusion_oom_falls_back_to_cpu_and_returns_home(tmp_path: Path, tiny_checkpoint: Path):
    env = daemon_env(tmp_path, ACESTEP_INJECT_OOM="diffusion:99")
    other = "float32" if CPU_DEFAULT == "bfloat16" else "bfloat16"
    home = ("--device", "cpu", "--dtype", other)
    with running(tmp_path, "--model-dir", str(tiny_checkpoint), *home, env=env) as daemon:
        assert daemon.status()["dtype"] == other
        for n in (1, 2):
            output = tmp_path / f"{n}.wav"
            answer = daemon.ask({"caption": "x", "duration_s": 1, "output": str(output)})
            assert answer["ok"] is True, answer
            assert (answer["fallback"], answer["device"], answer["dtype"]) == (
                "cpu",
                "cpu",
                CPU_DEFAULT,
            )
            # It started at home: the injection (which only fires there) hit the first
            # try, then its one retry, and only then did the request move to the CPU.
            assert answer["oom_retries"] == 1
            assert output.is_file()
            status = daemon.status()
            assert (status["device"], status["dtype"], status["loaded"]) == (
                "cpu",
                other,
                True,
            )
            assert status["cpu_fallbacks"] == n
