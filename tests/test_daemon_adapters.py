"""Several adapters (a PEFT LoRA and a LyCORIS LoKr) in one request, and the weight-decomposed
kinds (a PEFT DoRA, a LoKr with weight_decompose), through a real daemon."""

from __future__ import annotations

from pathlib import Path

import soundfile

from acestep_daemon.tiny import dit_config, make_tiny_lokr, make_tiny_lora
from tests.daemon_harness import running
from tests.test_daemon_family import FP32, assert_audio, generate


def test_two_adapters_run_each_at_its_scale_and_the_answer_names_them(tmp_path: Path) -> None:
    lora = make_tiny_lora(tmp_path / "lora", dit_config("sft"))
    lokr = make_tiny_lokr(tmp_path / "lokr", dit_config("sft"))
    both = [{"path": str(lora), "scale": 0.5}, {"path": str(lokr.parent), "scale": 0.8}]
    with running(tmp_path, "--model", "tiny-sft", *FP32) as daemon:
        plain = generate(daemon, tmp_path / "a", steps=2)[-1]
        answer = generate(daemon, tmp_path / "b", steps=2, lora=both)[-1]
        assert_audio(answer)
        assert "adapters" not in plain
        assert answer["adapters"] == [
            {"path": str(lora), "scale": 0.5, "kind": "lora"},
            {"path": str(lokr.parent), "scale": 0.8, "kind": "lokr"},
        ]
        lora_only = generate(daemon, tmp_path / "c", steps=2, lora=both[:1])[-1]
        muted = [both[0], {**both[1], "scale": 0.0}]
        lokr_muted = generate(daemon, tmp_path / "d", steps=2, lora=muted)[-1]
        read = [soundfile.read(a["path"])[0] for a in (plain, answer, lora_only, lokr_muted)]
        assert not (read[0] == read[1]).all() and not (read[1] == read[2]).all()
        assert (read[2] == read[3]).all()  # scale 0 adds nothing
        wrong = generate(daemon, tmp_path / "e", steps=2, lora=both, lora_scale=0.5)[-1]
        assert wrong["code"] == "invalid_request" and "lora_scale" in wrong["error"]
        dora = make_tiny_lora(tmp_path / "dora", dit_config("sft"), dora=True)
        dokr = make_tiny_lokr(tmp_path / "dokr", dit_config("sft"), weight_decompose=True)
        decomposed = [*both[:1], {"path": str(dora)}, {"path": str(dokr), "scale": 0.5}]
        with_dora = generate(daemon, tmp_path / "f", steps=2, lora=decomposed)[-1]
        assert with_dora["adapters"][1:] == [
            {"path": str(dora), "scale": 1.0, "kind": "dora"},
            {"path": str(dokr), "scale": 0.5, "kind": "lokr"},
        ]
        assert not (soundfile.read(with_dora["path"])[0] == read[2]).all()
        assert daemon.status()["loaded"] is True
