"""The command line as a new user meets it: --version, -v anywhere, clear errors before any model loads, stopping
with Ctrl-C or SIGTERM at any moment (no abort), log lines that survive being written to a file."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest
from test_runner import make_video

from turbostream import __version__, bench, cli
from turbostream.pipeline import _Rate

TURBOSTREAM = [sys.executable, "-m", "turbostream"]
# A slow engine on a CPU: tiny-random at 1024 px takes seconds for one frame, so its warmup is a long engine call.
SLOW_MODEL = ["--model", "tiny-random", "--device", "cpu", "--size", "1024", "--buckets", "1"]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"turbostream {__version__}"


@pytest.mark.parametrize("argv", [["-v", "bench", "--iters", "1"], ["bench", "-v", "--iters", "1"],
                                  ["bench", "--iters", "1", "--verbose"]])
def test_verbose_before_or_after_the_subcommand(argv):
    args = cli.build_parser().parse_args(argv)
    assert args.verbose is True and args.command == "bench"
    assert cli.build_parser().parse_args(["bench"]).verbose is False


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model starts loading: every check below must come before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(bench, "load_components", refuse)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_on_cuda_without_a_gpu_is_a_clear_error(no_loading, capsys):
    assert cli.main(["bench", "--model", "tiny-random", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "turbostream: error:" in err and "Traceback" not in err
    assert "CPU-only build" in err or "finds no usable GPU" in err


def test_bench_json_that_cannot_be_written_fails_before_loading(tmp_path, no_loading, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli.main(["bench", "--model", "tiny-random", "--device", "cpu", "--json", str(blocker / "out.json")]) == 2
    assert "cannot create folder" in capsys.readouterr().err
    assert cli.main(["bench", "--model", "tiny-random", "--device", "cpu", "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_python_m_turbostream_cli_reports_user_errors_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "turbostream.cli", "serve", "--jpeg-quality", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "JPEG quality" in result.stderr and "Traceback" not in result.stderr


def test_progress_rate_reads_a_slow_run_instead_of_flickering_to_zero():
    rate = _Rate(window=2.0)
    # One frame every 5 s, the display refreshed every 0.25 s: the rate never reads 0 once two frames are in.
    readings = [rate.add(t / 4, int(t / 4 // 5)) for t in range(0, 4 * 30)]
    after_two_frames = readings[4 * 5:]
    assert min(after_two_frames) > 0.1 and max(after_two_frames) <= 0.21
    # A fast run (25 frames/s, read every 0.25 s) reads 25, steadily.
    fast = _Rate(window=2.0)
    readings = [fast.add(t * 0.25, int(t * 0.25 * 25)) for t in range(40)]
    assert all(abs(r - 25) < 2 for r in readings[8:]), readings


def test_log_lines_to_a_file_are_plain_and_never_wrapped(tmp_path):
    log = tmp_path / "serve.log"
    url = "http://127.0.0.1:8000/" + "a-long-path/" * 12
    code = (f"import logging; from turbostream.cli import setup_logging; setup_logging(False); "
            f"logging.getLogger('turbostream.test').info('source %s is live', {url!r})")
    with log.open("w") as stderr:
        subprocess.run([sys.executable, "-c", code], stderr=stderr, timeout=60, check=True)
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"INFO turbostream.test: source {url} is live"), lines


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """Lines of proc's output up to the first one containing text (fails after timeout or if proc ends)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout} s:\n{''.join(seen)}")


def _interrupt(argv: list[str], wait_for: str, sig: int) -> tuple[int, float, str]:
    """Start the command, wait for a log line, let it get one second into that work, send sig: (status, seconds to
    exit, output)."""
    proc = subprocess.Popen([*TURBOSTREAM, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(proc, wait_for, 120)
        time.sleep(1.0)  # inside the model build, or a (seconds-long) warmup frame at 1024 px on a CPU
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, time.monotonic() - t0, out
    finally:
        proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_while_the_engine_warms_up(sig):
    status, stopped_in, out = _interrupt(["serve", *SLOW_MODEL, "--port", "0"], "loading the engine", sig)
    assert status == 0 and stopped_in < 8, (status, stopped_in, out)
    assert "terminate called" not in out and "Traceback" not in out and "engine ready" not in out


@pytest.mark.slow
def test_run_stops_cleanly_on_ctrl_c_during_a_long_engine_call(tmp_path):
    src = make_video(tmp_path / "in.avi", n=5)
    argv = ["run", "-i", str(src), "-o", str(tmp_path / "out.avi"), *SLOW_MODEL]
    status, stopped_in, out = _interrupt(argv, "warming up the engine", signal.SIGINT)
    assert status == 130 and stopped_in < 8, (status, stopped_in, out)
    assert "terminate called" not in out and "Traceback" not in out


def test_setup_logging_uses_rich_only_on_a_terminal():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        cli.setup_logging(False)  # pytest's stderr is not a terminal
        handlers = root.handlers
        assert len(handlers) == 1 and type(handlers[0]) is logging.StreamHandler
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])


@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-"])
def test_a_command_started_with_stdout_or_stderr_closed_does_its_work_and_exits_0(tmp_path, closed):
    """Scripts and init scripts that start it with >&- or 2>&-: sys.stdout or sys.stderr is None. The exit flushed
    them (exit 1 with a traceback after the work was done), and the logging setup asked a None stderr whether it
    was a terminal (nothing ran at all)."""
    import shlex

    out = tmp_path / "picture.png"
    argv = [*TURBOSTREAM, "generate", "a cat", "--model", "tiny-random", "--device", "cpu", "--size", "64",
            "-o", str(out)]
    proc = subprocess.run(["bash", "-c", f"{shlex.join(argv)} {closed}"], timeout=120)
    assert proc.returncode == 0 and out.exists()


TINY = ["--model", "tiny-random", "--device", "cpu", "--size", "64"]


@pytest.mark.parametrize("argv", [
    ["run", "-i", "{video}", "-o", "{long}.mp4"],
    ["run", "-i", "{long}", "-o", "{tmp}/out.mp4"],
    ["generate", "x", "-o", "{long}.png"],
    ["generate", "x", "--image", "{long}.png", "-o", "{tmp}/out.png"],
    ["bench", "--json", "{long}.json"],
    ["serve", "--source", "{long}", "--port", "0"],
    ["run", "-i", "{video}", "-o", "udp://[::1:9000"],
    ["serve", "--source", "{video}", "--publish", "srt://[::1:9000", "--port", "0"],
], ids=["run-output", "run-input", "generate-output", "generate-image", "bench-json", "serve-source",
        "run-stream-url", "serve-publish-url"])
def test_a_path_that_cannot_be_looked_at_or_a_url_that_cannot_be_read_is_one_line_and_status_2(tmp_path, capsys,
                                                                                                 argv):
    """A name longer than the file system allows (or in a folder the user may not search) made pathlib raise
    OSError, and a stream URL with an unclosed "[" made urlsplit raise ValueError: a traceback and status 1, where
    every other bad path is one line and status 2."""
    video = make_video(tmp_path / "in.avi", n=2)
    fill = {"video": str(video), "long": str(tmp_path / ("x" * 300)), "tmp": str(tmp_path)}
    assert cli.main([a.format(**fill) for a in argv] + TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith("turbostream: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "File name too long" in err or "cannot be read: Invalid IPv6 URL" in err


@pytest.mark.parametrize("option", ["--token", "--control-token"])
def test_an_empty_token_is_refused_not_an_open_server(capsys, option):
    """`--token "$TOKEN"` with TOKEN unset ran a server without a token, silently (on a loopback bind, behind a
    proxy, not even the warning)."""
    assert cli.main(["serve", option, "", "--port", "0", *TINY]) == 2
    assert f"{option} (or $TURBOSTREAM_" in (err := capsys.readouterr().err) and "is empty: give a secret" in err


def test_tokens_can_come_from_the_environment_and_an_option_overrides_them(monkeypatch, capsys):
    """A command line is readable by every user of the machine (ps, /proc/PID/cmdline); the environment is not."""
    from turbostream.cli.serve import server_config

    monkeypatch.setenv("TURBOSTREAM_TOKEN", "env-secret")
    monkeypatch.setenv("TURBOSTREAM_CONTROL_TOKEN", "env-control")
    config = server_config(cli.build_parser().parse_args(["serve", *TINY]))
    assert (config.token, config.control_token) == ("env-secret", "env-control")
    config = server_config(cli.build_parser().parse_args(["serve", "--token", "typed", *TINY]))
    assert (config.token, config.control_token) == ("typed", "env-control")
    monkeypatch.setenv("TURBOSTREAM_TOKEN", " ")  # set but blank: refused like an empty --token
    assert cli.main(["serve", "--port", "0", *TINY]) == 2
    assert "--token (or $TURBOSTREAM_TOKEN) is empty" in capsys.readouterr().err


def test_the_same_publish_url_twice_is_refused(tmp_path, capsys):
    """run refuses an output given twice; serve started two FFmpeg publishers to one place (for udp://, two H.264
    streams interleaved into one corrupt stream)."""
    video = make_video(tmp_path / "in.avi", n=2)
    url = "udp://127.0.0.1:9000"
    assert cli.main(["serve", "--source", str(video), "--publish", url, "--publish", url, "--port", "0", *TINY]) == 2
    assert f"--publish '{url}' is given twice" in capsys.readouterr().err


def test_a_refused_stream_option_creates_no_output_folder(tmp_path, capsys):
    """The outputs were checked (and their folders created, with an "overwritten" warning for a full one) before
    the stream options: a refused --strength left empty folders behind."""
    video = make_video(tmp_path / "in.avi", n=2)
    new_folder, new_parent = tmp_path / "frames", tmp_path / "videos"
    argv = ["run", "-i", str(video), "-o", f"{new_folder}/", "-o", str(new_parent / "out.mp4"), "--strength", "0.3"]
    assert cli.main(argv + TINY) == 2
    assert "steps x strength must be at least 1" in capsys.readouterr().err
    assert not new_folder.exists() and not new_parent.exists()
