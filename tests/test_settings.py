"""Settings: flags over GFPGAN_* variables over defaults, absolute paths, clear refusals, --help."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from contract.types import RequestLimits
from server.settings import SPECS, Settings, markdown_table

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_documented_ones_and_weights_live_under_the_home_cache():
    s = Settings.from_args([], environ={})
    assert (s.host, s.port, s.metrics_port, s.device, s.dtype) == (
        "127.0.0.1", 50051, 9090, "auto", "auto")
    assert (s.max_batch_faces, s.max_delay_ms, s.max_queue_faces) == ("auto", 5.0, 256)
    assert (s.max_faces_per_request, s.min_face_size, s.max_face_size) == (32, 64, 512)
    assert (s.no_download, s.log_level, s.drain_grace_s, s.warmup) == (False, "INFO", 30.0, True)
    assert s.weights_dir == str(Path.home().resolve() / ".cache" / "gfpgan-service" / "weights")
    assert s.model == str(Path(s.weights_dir) / "GFPGANv1.4.pth")


def test_environment_overrides_defaults_and_flags_override_the_environment():
    environ = {"GFPGAN_MAX_BATCH_FACES": "16", "GFPGAN_PORT": "6000", "GFPGAN_DTYPE": "float32",
               "GFPGAN_NO_DOWNLOAD": "1", "GFPGAN_WARMUP": "false", "GFPGAN_MAX_DELAY_MS": "2.5"}
    from_env = Settings.from_args([], environ=environ)
    assert (from_env.max_batch_faces, from_env.port, from_env.dtype) == (16, 6000, "float32")
    assert (from_env.no_download, from_env.warmup, from_env.max_delay_ms) == (True, False, 2.5)

    flags = Settings.from_args(["--max-batch-faces", "4", "--port", "7000", "--warmup",
                                "--dtype", "bfloat16"], environ=environ)
    assert (flags.max_batch_faces, flags.port, flags.dtype, flags.warmup) == (4, 7000, "bfloat16",
                                                                              True)
    assert flags.max_delay_ms == 2.5  # not given as a flag: the environment still counts


def test_relative_paths_become_absolute_at_parse_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.from_args(["--weights-dir", "weights"], environ={})
    assert s.weights_dir == str(tmp_path.resolve() / "weights")
    assert s.model == str(tmp_path.resolve() / "weights" / "GFPGANv1.4.pth")
    custom = Settings.from_args([], environ={"GFPGAN_MODEL": "models/GFPGANv1.3.pth"})
    assert custom.model == str(tmp_path.resolve() / "models" / "GFPGANv1.3.pth")


@pytest.mark.parametrize("flag, value, expected", [
    ("--port", "70000", "must be in 0..65535"),
    ("--port", "http", "expected a whole number"),
    ("--max-batch-faces", "0", "must be in 1..1024"),
    ("--max-delay-ms", "-1", "finite number >= 0"),
    ("--max-delay-ms", "nan", "finite number >= 0"),
    ("--device", "tpu", "auto, cpu, cuda or cuda:N"),
    ("--dtype", "float16", "float16 is not offered"),
    ("--log-level", "LOUD", "DEBUG, INFO"),
])
def test_a_bad_flag_value_exits_2_naming_the_flag(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        Settings.from_args([flag, value], environ={})
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and expected in err


def test_a_bad_environment_value_exits_2_naming_the_variable(capsys):
    with pytest.raises(SystemExit) as exited:
        Settings.from_args([], environ={"GFPGAN_MAX_QUEUE_FACES": "lots"})
    assert exited.value.code == 2
    assert "GFPGAN_MAX_QUEUE_FACES='lots'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--min-face-size", "600"], "--min-face-size (600) is larger than --max-face-size (512)"),
    (["--max-queue-faces", "16"], "--max-queue-faces (16) must be at least --max-faces-per-request"),
    (["--port", "9090"], "give them different ports"),
])
def test_settings_that_contradict_each_other_are_refused(argv, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        Settings.from_args(argv, environ={})
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err


def test_settings_built_in_code_get_the_same_checks_and_spellings():
    assert Settings(dtype="fp32", device="CUDA:1", max_delay_ms=5).dtype == "float32"
    assert Settings(device="CUDA:1").device == "cuda:1"
    with pytest.raises(ValueError, match="--max-batch-faces"):
        Settings(max_batch_faces=0)


def test_limits_carry_the_request_settings():
    s = Settings(max_faces_per_request=12, min_face_size=32, max_face_size=256)
    assert s.limits() == RequestLimits(max_faces_per_request=12, min_face_size=32,
                                       max_face_size=256)


def test_help_and_the_readme_table_list_every_setting():
    help_text = subprocess.run(
        [sys.executable, "-m", "server.app", "--help"], cwd=REPO, capture_output=True, text=True,
        timeout=60)
    assert help_text.returncode == 0, help_text.stderr
    table = markdown_table()
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert [spec.name for spec in SPECS] == fields
    for spec in SPECS:
        assert spec.flag in help_text.stdout and spec.env in help_text.stdout
        assert f"`{spec.flag}`" in table and f"`{spec.env}`" in table
    assert "--no-warmup" in help_text.stdout and "--no-download" in help_text.stdout
    assert len(table.strip().splitlines()) == 2 + len(fields)


def test_speed_forms_auto_and_overrides(monkeypatch):
    from server.speed import SpeedOptions

    monkeypatch.setattr("server.speed.compile_toolchain_problem", lambda: None)  # Triton could build
    cpu, cuda = Settings().speed_options("cpu"), Settings().speed_options("cuda")
    # both run the unfused convolution with all of GFPGAN channels-last, ParseNet channels-last
    # without padding passes and with its x2 layers as phases, fold the norm layers, resample bf16
    # maps in bf16, modulate float32 maps into bf16 and run lean GFPGAN (measured faster on the
    # CPU and on an H200: BENCHMARKS.md); CUDA also replays graphs and selects fixed-size rows
    assert cpu == SpeedOptions(modconv="unfused", channels_last=True, decoder_channels_last=True,
                               fold_norms=True, gfpgan_forward="lean", parse_channels_last=True,
                               parse_padding="border", parse_upsample="phases", resample_dtype="compute",
                               modulate_dtype="compute")
    # ... detects without waiting for the device, and compiles its passes (2.1-2.7x on an
    # H200), each checked against eager at warm-up
    assert cuda == dataclasses.replace(cpu, cuda_graphs=True, fixed_selection=True, fixed_detection=True,
                                       compile=True)
    plain = Settings.from_args(["--modconv", "fused", "--cuda-graphs", "off", "--channels-last", "off",
                                "--fold-norms", "off", "--gfpgan-forward", "gfpgan", "--fixed-selection", "off",
                                "--resample-dtype", "autocast", "--modulate-dtype", "autocast",
                                "--parse-channels-last", "off", "--parse-padding", "reflect",
                                "--parse-upsample", "nearest"])
    assert plain.speed_options("cuda") == SpeedOptions() == plain.speed_options("cpu")
    with pytest.raises(SystemExit):
        Settings.from_args(["--fold-norms", "maybe"])
    # wait-free detection goes with the fixed-size selection: off without it, and asked for on
    # the CPU it turns that on too; asked for without it, a clear refusal
    assert not Settings(fixed_selection="off").speed_options("cuda").fixed_detection
    assert Settings(fixed_detection="on").speed_options("cpu") == \
        dataclasses.replace(cpu, fixed_selection=True, fixed_detection=True)
    assert not Settings(fixed_detection="off").speed_options("cuda").fixed_detection
    with pytest.raises(ValueError, match="--fixed-detection on needs --fixed-selection on"):
        Settings(fixed_detection="on", fixed_selection="off")
    with pytest.raises(ValueError, match="fixed_detection needs fixed_selection"):
        SpeedOptions(fixed_detection=True)
    # --compile and --decoder-channels-last need the unfused convolution (auto's), and refuse fused
    compiled = Settings.from_args(["--compile", "on"], environ={})
    assert compiled.speed_options("cpu") == dataclasses.replace(cpu, compile=True)
    assert Settings.from_args([], environ={"GFPGAN_COMPILE": "on"}).speed_options("cuda").compile
    with pytest.raises(ValueError, match="--compile on needs --modconv unfused"):
        Settings(compile="on", modconv="fused")
    # auto compiles on CUDA only, and not with the fused convolution, off, or where Triton cannot
    # build its launcher: the passes then run eagerly instead of failing to compile on every start
    assert not Settings(compile="off").speed_options("cuda").compile
    assert not Settings(modconv="fused").speed_options("cuda").compile
    monkeypatch.setattr("server.speed.compile_toolchain_problem", lambda: "no C compiler")
    assert Settings().speed_options("cuda") == dataclasses.replace(cuda, compile=False)
    assert Settings(compile="on").speed_options("cuda").compile  # asked for: tried, and logged if it fails
    monkeypatch.setattr("server.speed.compile_toolchain_problem", lambda: None)
    nchw = Settings.from_args(["--decoder-channels-last", "off"], environ={})
    assert nchw.speed_options("cuda") == dataclasses.replace(cuda, decoder_channels_last=False)
    with pytest.raises(ValueError, match="--decoder-channels-last on needs --modconv unfused"):
        Settings(decoder_channels_last="on", modconv="fused")
    # the fused convolution asked for: the channels-last forms left at auto turn off, not refuse
    fused = Settings.from_args(["--modconv", "fused"], environ={}).speed_options("cpu")
    assert fused == dataclasses.replace(cpu, modconv="fused", channels_last=False, decoder_channels_last=False)
    # ParseNet's forms, by flag and by variable, either way on either device; any modconv takes them
    assert Settings.from_args(["--parse-padding", "reflect", "--parse-upsample", "nearest",
                               "--parse-channels-last", "off"], environ={}).speed_options("cpu") == \
        dataclasses.replace(cpu, parse_padding="reflect", parse_upsample="nearest", parse_channels_last=False)
    assert Settings.from_args(["--modconv", "fused", "--parse-padding", "reflect"], environ={}) \
        .speed_options("cuda") == dataclasses.replace(cuda, modconv="fused", channels_last=False,
                                                       decoder_channels_last=False, parse_padding="reflect",
                                                       compile=False)
    assert Settings.from_args([], environ={"GFPGAN_PARSE_PADDING": "reflect"}).speed_options("cuda") \
        .parse_padding == "reflect"
    assert Settings.from_args([], environ={"GFPGAN_PARSE_PADDING": "reflect"}).speed_options("cpu") \
        .parse_padding == "reflect"
    with pytest.raises(SystemExit):
        Settings.from_args(["--parse-padding", "zeros"], environ={})
    assert Settings.from_args(["--parse-upsample", "nearest"], environ={}).speed_options("cuda") \
        .parse_upsample == "nearest"
    assert Settings.from_args([], environ={"GFPGAN_PARSE_UPSAMPLE": "nearest"}).speed_options("cpu") \
        .parse_upsample == "nearest"
    assert not Settings.from_args([], environ={"GFPGAN_PARSE_CHANNELS_LAST": "off"}).speed_options("cuda") \
        .parse_channels_last
    assert not Settings.from_args([], environ={"GFPGAN_DECODER_CHANNELS_LAST": "off"}).speed_options("cpu") \
        .decoder_channels_last
    # GFPGAN's x2 layers: as it writes them unless asked (no GPU has timed the phases yet); the
    # phases by flag or variable, refused with the forms they are part of turned off
    assert cpu.gfpgan_upsample == cuda.gfpgan_upsample == "resample"
    assert Settings.from_args(["--gfpgan-upsample", "phases"], environ={}).speed_options("cuda") == \
        dataclasses.replace(cuda, gfpgan_upsample="phases")
    assert Settings.from_args([], environ={"GFPGAN_GFPGAN_UPSAMPLE": "phases"}).speed_options("cpu") \
        .gfpgan_upsample == "phases"
    for other in ({"modconv": "fused"}, {"gfpgan_forward": "gfpgan"}):
        with pytest.raises(ValueError, match="--gfpgan-upsample phases needs --modconv unfused"):
            Settings(gfpgan_upsample="phases", **other)
    with pytest.raises(SystemExit):
        Settings.from_args(["--gfpgan-upsample", "phases", "--modconv", "fused"], environ={})
    with pytest.raises(ValueError, match="gfpgan_upsample='phases' needs gfpgan_forward='lean'"):
        SpeedOptions(modconv="unfused", gfpgan_upsample="phases")


def test_compile_toolchain_problem_names_what_triton_would_miss(monkeypatch, tmp_path):
    """Triton builds its kernel launcher with a C compiler against Python's headers at run time:
    each missing one is named, with what to install; a CC that is not there is named as such, and
    so is a missing Triton. On Windows, triton-windows brings its own compiler: Triton is enough."""
    import importlib.util
    import os
    import shutil
    import sysconfig

    from server.speed import compile_toolchain_problem

    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "Python.h").write_text("")
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {**paths, "include": str(tmp_path / "include")})
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "triton" else find_spec(name))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in ("gcc", "cc") else None)
    monkeypatch.delenv("CC", raising=False)
    assert compile_toolchain_problem() is None  # gcc, the headers and Triton: it can build
    monkeypatch.setenv("CC", "no-such-cc --flag")
    assert "CC='no-such-cc --flag' is not on PATH" in compile_toolchain_problem()
    monkeypatch.setenv("CC", "gcc -O2")
    assert compile_toolchain_problem() is None
    monkeypatch.delenv("CC")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no compiler anywhere
    assert "no C compiler (clang, gcc or cc)" in compile_toolchain_problem()
    monkeypatch.setattr(os, "name", "nt")  # ... which triton-windows does not need
    assert compile_toolchain_problem() is None
    monkeypatch.setattr(os, "name", "posix")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/gcc")
    (tmp_path / "include" / "Python.h").unlink()
    assert "no Python headers" in compile_toolchain_problem() and "python3-dev" in compile_toolchain_problem()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "triton" else find_spec(name))
    assert "Triton is not installed" in compile_toolchain_problem()
    assert "triton-windows" in compile_toolchain_problem()
