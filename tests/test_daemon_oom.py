"""The out-of-memory policy, driven by real torch.cuda.OutOfMemoryError (ACESTEP_INJECT_OOM).

Injected errors fire only while the pipeline is at home, never in the CPU
fallback, so a reply that ran in float32 on the CPU while the daemon's home is
bfloat16 shows that the fallback happened; `status` then shows it went home.
"""

from __future__ import annotations

from pathlib import Path

from tests.daemon_harness import daemon_env, running


def test_vae_oom_is_retried_with_half_the_chunk(tmp_path: Path, tiny_checkpoint: Path):
    env = daemon_env(tmp_path, ACESTEP_INJECT_OOM="vae:1")
    with running(tmp_path, "--model-dir", str(tiny_checkpoint), env=env) as daemon:
        answer = daemon.ask({"caption": "x", "duration_s": 1, "output": str(tmp_path / "a.wav")})
        assert answer["ok"] is True, answer
        assert answer["oom_retries"] == 1
        assert answer["vae_chunk_frames"] == 256
        assert answer["fallback"] is None
        assert Path(answer["path"]).is_file()
        status = daemon.status()
        assert (status["oom_retries"], status["cpu_fallbacks"]) == (1, 0)
        again = daemon.ask({"caption": "x", "duration_s": 1})
        assert again["ok"] and again["oom_retries"] == 0 and again["vae_chunk_frames"] == 512


def test_diffusion_oom_falls_back_to_cpu_and_returns_home(tmp_path: Path, tiny_checkpoint: Path):
    env = daemon_env(tmp_path, ACESTEP_INJECT_OOM="diffusion:99")
    home = ("--device", "cpu", "--dtype", "bfloat16")
    with running(tmp_path, "--model-dir", str(tiny_checkpoint), *home, env=env) as daemon:
        assert daemon.status()["dtype"] == "bfloat16"
        for n in (1, 2):
            output = tmp_path / f"{n}.wav"
            answer = daemon.ask({"caption": "x", "duration_s": 1, "output": str(output)})
            assert answer["ok"] is True, answer
            assert (answer["fallback"], answer["device"], answer["dtype"]) == (
                "cpu",
                "cpu",
                "float32",
            )
            # It started at home: the injection (which only fires there) hit the first
            # try, then its one retry, and only then did the request move to the CPU.
            assert answer["oom_retries"] == 1
            assert output.is_file()
            status = daemon.status()
            assert (status["device"], status["dtype"], status["loaded"]) == (
                "cpu",
                "bfloat16",
                True,
            )
            assert status["cpu_fallbacks"] == n
