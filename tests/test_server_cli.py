"""`mediaserver serve --stages`: the rooms' default stages are checked at the entry point, as a client's are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mediaserver.config import load_config

MEDIASERVER = Path(sys.executable).parent / "mediaserver"


def test_none_or_nothing_means_rooms_without_stages() -> None:
    for value in ("none", "None", "", " , "):
        assert load_config(stages=value, dev=True).enhance.default_stages == ()
        assert load_config(env={"MEDIASERVER_DEV": "1", "MEDIASERVER_STAGES": value}).enhance.default_stages == ()


def test_known_stages_are_kept() -> None:
    assert load_config(stages=" denoise , vad", dev=True).enhance.default_stages == ("denoise", "vad")


@pytest.mark.parametrize("value, message", [
    ("bogus", "unknown stage 'bogus'"),
    ("denoise,denoise:gtcrn", "stage kind listed twice: denoise"),
])
def test_a_bad_stage_list_is_a_configuration_error(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(stages=value, dev=True)
    with pytest.raises(ValueError, match=message):
        load_config(env={"MEDIASERVER_DEV": "1", "MEDIASERVER_STAGES": value})


def test_the_command_refuses_a_bad_stage_list_before_serving() -> None:
    proc = subprocess.run([str(MEDIASERVER), "serve", "--dev", "--port", "0", "--stages", "bogus"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "mediaserver: bad configuration: unknown stage 'bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "open http" not in proc.stdout + proc.stderr  # it never started
