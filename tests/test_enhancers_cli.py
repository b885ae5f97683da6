"""The ``enhancers`` command: process files through the streaming path, eval dispatch, errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from enhancers import registry
from enhancers.audio_io import read_mono
from enhancers.cli import main
from enhancers.eval.metrics import si_sdr
from enhancers.file_pipeline import process_file
from enhancers.stage import BatchContext, Stage, StageStream

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
ENHANCERS = Path(sys.executable).parent / "enhancers"
XMAS = EVAL / "speech" / "xmas_44k.wav"


class DelayStage(Stage):
    """Test stage with declared latency: delays each stream by 300 samples (crosses chunks)."""

    name = "dereverb"
    latency_samples = 300

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"tail": torch.zeros(self.latency_samples)}

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        slots = self.slots(streams)
        full = torch.cat([self.state["tail"].index_select(0, slots), audio], dim=1)
        self.state["tail"].index_copy_(0, slots, full[:, -self.latency_samples :].contiguous())
        return full[:, : audio.shape[1]]


def test_console_script_processes_44k_file(tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    proc = subprocess.run(
        [str(ENHANCERS), "process", "--stages", "vad,limiter", str(XMAS), str(out)],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info_in, info_out = sf.info(str(XMAS)), sf.info(str(out))
    assert info_out.samplerate == info_in.samplerate == 44_100
    assert info_out.frames == info_in.frames
    x, _ = read_mono(XMAS)
    y, _ = read_mono(out)
    assert si_sdr(y, x) > 25.0  # vad + limiter on normal-level speech: content unchanged
    assert '"bypassed_chunks": 0' in proc.stdout


def test_latency_is_compensated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGES, "dereverb:test_delay", f"{__name__}:DelayStage")
    src = EVAL / "speech" / "cmu_arctic_us_axb_a0005.wav"  # 16 kHz
    out = tmp_path / "out.wav"
    result = process_file(src, out, "dereverb:test_delay", device="cpu")
    assert result.run.latency_samples == 300
    x, rate = read_mono(src)
    y, out_rate = read_mono(out)
    assert out_rate == rate == 16_000 and len(y) == len(x)
    assert si_sdr(y, x) > 25.0  # aligned: a 100-sample shift at 16 kHz would score far below 0 dB


def test_reference_file_of_another_rate_is_accepted(tmp_path: Path) -> None:
    far = EVAL / "aec" / "DMTgmZwtgUilp4omPK7-OQ_doubletalk_lpb.wav"
    out = tmp_path / "out.wav"
    code = main(
        ["process", "--stages", "limiter", "--reference", str(far), "--device", "cpu", str(XMAS), str(out)]
    )
    assert code == 0 and sf.info(str(out)).frames == sf.info(str(XMAS)).frames


def test_stage_options_reach_the_stage(tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    code = main(["process", "--stages", "limiter", "--set", "limiter.ceiling_db=-12", str(XMAS), str(out)])
    assert code == 0
    y, _ = read_mono(out)
    # -12 dBFS at 48 kHz; resampling back to 44.1 kHz may add a little inter-sample overshoot.
    assert np.abs(y).max() <= 10 ** (-12 / 20) * 1.1 < 0.5 * np.abs(read_mono(XMAS)[0]).max()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["process", "--stages", "limiter,warp", "IN", "OUT"], "unknown stage 'warp'"),
        (["process", "--stages", "vad,vad:silero", "IN", "OUT"], "listed twice"),
        (["process", "--stages", "limiter", "missing.wav", "OUT"], "not found"),
        (["process", "--stages", "limiter", "--set", "limiter=3", "IN", "OUT"], "SPEC.OPTION=VALUE"),
        (["eval", "--task", "nosuchtask"], "unknown eval task 'nosuchtask'"),
        (["eval"], "usage: enhancers eval --task TASK"),
    ],
)
def test_clear_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(XMAS) if a == "IN" else str(tmp_path / "o.wav") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    assert main(["process", "--stages", "limiter", str(bad), str(tmp_path / "o.wav")]) == 2
    assert "cannot read input file" in capsys.readouterr().err


def test_eval_dispatches_to_task_module(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, argparse.Namespace] = {}
    task = types.ModuleType("enhancers.eval.faketask")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--seconds", type=float, default=1.0)

    def run(args: argparse.Namespace) -> int:
        seen["args"] = args
        return 0

    task.add_arguments = add_arguments  # type: ignore[attr-defined]
    task.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "enhancers.eval.faketask", task)
    assert main(["eval", "--task", "faketask", "--seconds", "2.5"]) == 0
    assert seen["args"].seconds == 2.5 and seen["args"].task == "faketask"


def test_stages_lists_every_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for spec in registry.STAGES:
        assert spec in out


def test_stages_check_loads_each_stage_and_shows_its_real_latency(capsys: pytest.CaptureFixture[str]) -> None:
    """A stage whose latency comes from its model (DF3's STFT and look-ahead, WPE's frame) reports it:
    the check builds each stage, it does not read a class default."""
    assert main(["stages", "--check"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "available, latency 1440 samples" in lines["denoise"]
    assert "available, latency 960 samples" in lines["dereverb"]
