"""The command line: the engine demo checks itself against the reference and reports bad arguments."""

from __future__ import annotations

from streamattn.cli import main


def test_engine_demo_small_stream_passes_its_own_check(capsys):
    assert main(["engine-demo", "--tokens", "3000", "--chunk", "300", "--decode", "40", "--check-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "same buffers since the first call" in out


def test_engine_demo_fails_when_tolerance_is_impossible(capsys):
    assert main(["engine-demo", "--tokens", "500", "--chunk", "100", "--decode", "0", "--tol", "0"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_bad_arguments_are_one_clear_line(capsys):
    assert main(["engine-demo", "--tokens", "0"]) == 2
    assert "error: --tokens" in capsys.readouterr().err
    assert main(["engine-demo", "--window", "0"]) == 2
    assert "window must be >= 1" in capsys.readouterr().err
