"""The integration plan's own words, word for word, and MuseTalk where its users run it.

- the plan's `gfpgan:` YAML section, its flags and its GFPGANEnhancer(...) constructor and
  methods, run in the MuseTalk stand-in against the real service, give enhanced faces;
- its model keys are checked against what the service serves (GetInfo), and another model
  stops the run at start with both named;
- a `gfpgan:` section never reaches MuseTalk: through the launcher (whatever prefix of
  --inference_config MuseTalk's argparse accepts, or its default config), or through the
  documented edits (which take the section out of the loaded config);
- the Windows forms: the .bat example's command is accepted as written, and the client and
  adapter use no POSIX-only call.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from musetalk_adapter import GFPGANEnhancer, ModelMismatch, SettingsError, enhancer_from_musetalk
from musetalk_adapter.__main__ import main as launcher_main
from musetalk_adapter.__main__ import prepare
from musetalk_adapter.bench_overhead import in_standin
from tests.faces import make_faces
from tests.fake_service import FakeService
from tests.service_process import gfpgan_serve
from tests.musetalk_project import STANDIN, musetalk_args, written_frames

ROOT = Path(__file__).resolve().parent.parent

#: The plan's section, as the plan writes it.
PLAN_SECTION = """gfpgan:
  enabled: true
  model_path: "models/gfpgan/GFPGANv1.4.pth"
  upscale: 2
  arch: "clean"
  channel_multiplier: 2
"""
#: The plan's flags, as the plan writes them.
PLAN_FLAGS = ["--enable_gfpgan", "--gfpgan_upscale", "2", "--gfpgan_model",
              "models/gfpgan/GFPGANv1.4.pth"]


@pytest.fixture(scope="module")
def service(small_weights):
    with gfpgan_serve(small_weights) as (address, metrics_url, _):
        yield address


@pytest.fixture
def fake():
    with FakeService() as service:
        yield service


def run_launcher(standin: Path, *argv: str) -> int:
    with in_standin(standin):
        return launcher_main(list(argv))


# --- the plan's YAML section, flags and constructor ----------------------------------------------

def test_the_plans_yaml_section_and_flags_run_musetalk_with_enhanced_faces(service, project, capsys):
    """The section and the flags as the plan writes them (plus where the service is): every
    face of the run is enhanced at 512 (upscale 2), and the start line says what was checked."""
    config = project.offline_yaml(11, gfpgan=PLAN_SECTION)
    summary = project.dir / "summary.json"
    # aligned: a detector with random weights finds no face in most crops (NO_FACE, not enhanced)
    code = run_launcher(STANDIN, "run", "--gfpgan-address", service, "--gfpgan-timeout-ms", "60000",
                        "--gfpgan-alignment", "aligned",
                        "--summary-json", str(summary), "--", "scripts/inference.py",
                        "--inference_config", config, "--result_dir", str(project.dir / "out"),
                        *PLAN_FLAGS)
    assert code == 0
    err = capsys.readouterr().err
    assert "checked: model_path, arch, channel_multiplier" in err
    assert "GFPGANv1.4 (GFPGANv1.4.pth, arch clean, channel_multiplier 2)" in err
    result = json.loads(summary.read_text())
    assert (result["faces"], result["faces_enhanced"], result["fell_back"]) == (11, 11, {})
    assert len(written_frames(project.dir / "out")) == 11


def test_the_plans_constructor_and_methods_give_enhanced_faces_in_order(service, tmp_path):
    """GFPGANEnhancer(model_path=..., upscale=2, arch='clean', channel_multiplier=2,
    bg_upsampler=None, device=None) and its four methods; the batched forms agree with the
    one-face form (the service's noise is fixed), in order."""
    decoded = np.ascontiguousarray(make_faces(5, seed=21)[..., ::-1])[..., ::-1]  # MuseTalk's view
    with GFPGANEnhancer(model_path="models/gfpgan/GFPGANv1.4.pth", upscale=2, arch="clean",
                        channel_multiplier=2, bg_upsampler=None, device=None,
                        address=service, timeout_ms=60000, alignment="aligned") as enhancer:
        one = enhancer.enhance_face(decoded[0])
        batch = enhancer.enhance_batch(decoded[:3])
        optimized = enhancer.enhance_batch_optimized(list(decoded), batch_size=4)
        back = enhancer.resize_to_original(optimized)
        summary = enhancer.summary
        assert enhancer.notes and "(checked: model_path, arch, channel_multiplier)" in enhancer.notes[0]
    assert one.shape == (512, 512, 3) and batch.shape == (3, 512, 512, 3)
    assert optimized.shape == (5, 512, 512, 3) and optimized.dtype == np.uint8
    assert back.shape == (5, 256, 256, 3)
    assert np.abs(optimized[0].astype(int) - one).max() <= 1
    assert np.abs(optimized[:3].astype(int) - batch).max() <= 1
    for j in range(4):  # each face its own: the order held across the two batches of 4 and 1
        assert np.abs(optimized[j].astype(int) - optimized[j + 1]).mean() > 5
    # 1 + 3 + 5 faces, every one enhanced by the service (none resized locally)
    assert (summary.faces_enhanced, summary.faces_fell_back) == (9, 0)


def test_device_is_reported_and_bg_upsampler_realesrgan_asks_the_service_for_it(fake):
    """Issue 10: the plan's `bg_upsampler: realesrgan` selects the service's Real-ESRGAN
    background for every batch; a service without one stops the run at start."""
    from contract.pb import face_enhance_pb2 as pb

    fake.servicer.backgrounds = ["lanczos", "realesrgan"]
    with GFPGANEnhancer(address=fake.address, device="cuda", bg_upsampler="realesrgan", upscale=2,
                        timeout_ms=2000) as enhancer:
        notes = "\n".join(enhancer.notes)
        enhancer.enhance_batch(make_faces(2))
    assert "device 'cuda' is not used here: the service runs the model (on cpu)" in notes
    assert "upsamples each crop around the face with Real-ESRGAN" in notes
    assert fake.servicer.background_kinds == [pb.BACKGROUND_REALESRGAN]
    fake.servicer.backgrounds = ["lanczos"]
    with pytest.raises(ModelMismatch, match="no Real-ESRGAN loaded.*--bg-upsampler realesrgan-x2"):
        GFPGANEnhancer(address=fake.address, bg_upsampler="realesrgan", timeout_ms=2000)
    with pytest.raises(SettingsError, match="must be realesrgan .* or none"):
        GFPGANEnhancer(address=fake.address, bg_upsampler="swinir", timeout_ms=2000)


def test_enhance_batch_optimized_refuses_a_bad_batch_size(fake):
    with GFPGANEnhancer(address=fake.address) as enhancer:
        with pytest.raises(ValueError, match="batch_size must be a whole number of 1 or more"):
            enhancer.enhance_batch_optimized(make_faces(2), batch_size=0)
        assert enhancer.enhance_batch_optimized([], batch_size=4).shape == (0, 256, 256, 3)


# --- the model keys against what the service serves ----------------------------------------------

@pytest.mark.parametrize("keys, message", [
    ({"model_path": r"models\gfpgan\GFPGANv1.3.pth"},
     "model_path names GFPGANv1.3.pth, but the service serves GFPGANv1.4 (GFPGANv1.4.pth, arch "
     "clean, channel_multiplier 2)"),
    ({"arch": "original"}, "arch is 'original', but the service serves GFPGANv1.4"),
    ({"channel_multiplier": 1}, "channel_multiplier is 1, but the service serves GFPGANv1.4"),
])
def test_another_model_stops_the_constructor_at_start_naming_both(fake, keys, message):
    with pytest.raises(ModelMismatch) as caught:
        GFPGANEnhancer(address=fake.address, **keys)
    assert message in str(caught.value)
    assert f"the service at {fake.address}" in str(caught.value)
    assert fake.faces == 0


def test_a_windows_path_to_the_served_model_and_another_case_are_the_same_model(fake):
    with GFPGANEnhancer(address=fake.address, model_path=r"models\gfpgan\gfpganv1.4.PTH",
                        arch="Clean") as enhancer:
        assert enhancer.enhance_batch(make_faces(2)).shape == (2, 256, 256, 3)
    assert fake.faces == 2


def test_a_local_model_file_that_differs_from_the_services_stops_the_run(fake, tmp_path, monkeypatch):
    """Where the plan's model_path exists on this machine, its SHA-256 is checked too."""
    (tmp_path / "models" / "gfpgan").mkdir(parents=True)
    (tmp_path / "models" / "gfpgan" / "GFPGANv1.4.pth").write_bytes(b"a fine-tuned copy")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelMismatch, match=r"the local GFPGANv1.4.pth has SHA-256 .* they are "
                                            r"different files"):
        GFPGANEnhancer(address=fake.address, model_path="models/gfpgan/GFPGANv1.4.pth")


def test_the_launcher_stops_before_musetalk_runs_when_the_model_differs(fake, project, capsys,
                                                                      tmp_path, monkeypatch):
    fake.model = ("GFPGANv1.3.pth", "clean", 2)
    config = project.offline_yaml(3, gfpgan=PLAN_SECTION)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the launcher writes its YAML copy
    code = run_launcher(STANDIN, "run", "--gfpgan-address", fake.address, "--",
                        "scripts/inference.py", "--inference_config", config, "--result_dir",
                        str(project.dir / "out"))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("musetalk_adapter: error:")
    assert "model_path names GFPGANv1.4.pth, but the service serves GFPGANv1.3" in err
    assert not (project.dir / "out").exists()  # MuseTalk never started
    assert fake.faces == 0
    assert list(scratch.iterdir()) == []  # the gfpgan-free copy of the YAML is gone with the refusal


def test_a_service_down_at_start_is_checked_before_its_first_batch(project, capsys):
    """Nothing answers at start: the run goes on, saying so; when the service comes up serving
    another model, it gets no face (the batch falls back as wrong_model)."""
    with FakeService() as later:
        address = later.address
        later.stop()
        enhancer = GFPGANEnhancer(address=address, model_path="GFPGANv1.4.pth", timeout_ms=300)
        assert any("no service answered at start" in note for note in enhancer.notes)
        later.model = ("GFPGANv1.3.pth", "clean", 2)
        later.start()
        with enhancer:
            # the channel reconnects (gRPC's backoff) and the breaker lets a probe through
            deadline = time.monotonic() + 20
            while True:
                batch = enhancer.submit_batch(make_faces(2))
                assert batch.faces().shape == (2, 256, 256, 3)
                if batch.fallback_reason not in ("unavailable", "circuit_open", "timeout") \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert batch.fell_back and batch.fallback_reason == "wrong_model"
        assert later.faces == 0 and later.info_calls >= 1


@pytest.mark.parametrize("section, flags, message", [
    ("  arch: gfpgan\n", [], "'arch' must be one of clean, original, bilinear, RestoreFormer"),
    ("  channel_multiplier: 0\n", [], "'channel_multiplier' must be 1 or more"),
    ('  model_path: ""\n', [], "'model_path' must name the checkpoint file"),
    ("  channel_multiplier: 1.5\n", [], "'channel_multiplier' must be a whole number"),
    ("", ["--gfpgan_arch", "v2"], "'arch' must be one of"),
])
def test_bad_model_keys_stop_the_launcher_before_musetalk_runs(section, flags, message, project, capsys):
    config = project.offline_yaml(3, gfpgan="gfpgan:\n" + section if section else "")
    code = run_launcher(STANDIN, "run", *flags, "--", "scripts/inference.py", "--inference_config",
                        config, "--result_dir", str(project.dir / "out"))
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (project.dir / "out").exists()


# --- the section never reaches MuseTalk ------------------------------------------------------------

def realtime_yaml_with_section(project, address: str, frames: int = 5) -> str:
    path = Path(project.realtime_yaml(frames))
    path.write_text(path.read_text() + f"gfpgan:\n  address: {address}\n  timeout_ms: 300\n")
    return str(path)


def test_musetalk_alone_dies_on_a_gfpgan_section_in_its_realtime_config(project, fake):
    """What the launcher and the edits prevent: MuseTalk's realtime script reads every
    top-level key as an avatar (MuseTalk: an uncaught ConfigKeyError)."""
    config = realtime_yaml_with_section(project, fake.address)
    done = subprocess.run([sys.executable, "scripts/realtime_inference.py", "--inference_config", config,
                           "--result_dir", str(project.dir / "out")],
                          cwd=STANDIN, env={**os.environ, "PYTHONPATH": str(STANDIN)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "gfpgan" in done.stderr and "Missing key" in done.stderr


@pytest.mark.parametrize("form", ["--inference_config", "--inference_conf", "--i", "--inference_c=",
                                  "twice", "default"])
def test_the_launcher_hides_the_section_whichever_way_musetalk_gets_its_config(form, project, fake,
                                                                               tmp_path):
    """MuseTalk's argparse accepts any unambiguous prefix (and the last one given wins); with
    no flag at all it reads its default config: the launcher reads and strips the same file."""
    config = realtime_yaml_with_section(project, fake.address)
    standin = tmp_path / "standin"
    shutil.copytree(STANDIN, standin, ignore=shutil.ignore_patterns("__pycache__"))
    if form == "default":
        (standin / "configs" / "inference").mkdir(parents=True)
        shutil.copy(config, standin / "configs" / "inference" / "realtime.yaml")
        args = []
    elif form == "twice":
        args = ["--inference_config", str(project.dir / "nowhere.yaml"), "--inference_conf", config]
    elif form.endswith("="):
        args = [form + config]
    else:
        args = [form, config]
    summary = project.dir / "summary.json"
    code = run_launcher(standin, "run", "--summary-json", str(summary), "--",
                        "scripts/realtime_inference.py", *args, "--result_dir", str(project.dir / "out"))
    assert code == 0
    result = json.loads(summary.read_text())
    # the settings came from the section (its address: the fake enhanced every face)
    assert (result["faces"], result["faces_enhanced"]) == (5, 5)
    assert fake.faces == 5
    assert len(written_frames(project.dir / "out")) == 4  # MuseTalk's realtime worker skips the last


def test_prepare_swaps_only_the_config_argument_keeping_every_other_in_order(project, fake):
    config = realtime_yaml_with_section(project, fake.address)
    with in_standin(STANDIN):
        settings, argv, _, stripped = prepare(
            ["run", "--", "-m", "scripts.realtime_inference", "--fps", "25", "--inference_c=" + config,
             "--gfpgan_upscale", "2", "--skip_save_images"])
    try:
        assert argv == ["-m", "scripts.realtime_inference", "--fps", "25", "--inference_c=" + stripped,
                        "--skip_save_images"]
        assert settings.upscale == 2 and settings.address == fake.address
        assert "gfpgan" not in Path(stripped).read_text()
    finally:
        Path(stripped).unlink()


def test_the_edited_realtime_script_takes_the_section_out_before_its_avatar_loop(project, fake, tmp_path):
    """realtime_inference.py.diff's added lines, put at the same places in a copy of the
    stand-in's realtime script: the run gets through its avatar loop, every face enhanced."""
    added = [line[1:].split("  #")[0].rstrip() for line in
             (ROOT / "musetalk_adapter" / "realtime_inference.py.diff").read_text().splitlines()
             if line.startswith("+") and not line.startswith("+++") and not line[1:].lstrip().startswith("#")]
    assert len(added) == 5
    the_import, submit, add_arguments, make, close = added
    script = (STANDIN / "scripts" / "realtime_inference.py").read_text()
    edits = [
        ("from musetalk.utils.utils import datagen, load_all_model\n", the_import, "after"),
        ("            recon = vae.decode_latents(pred_latents)\n", submit, "after"),
        ("    args = parser.parse_args()\n", add_arguments, "before"),
        ("    inference_config = OmegaConf.load(args.inference_config)\n", make, "after"),
    ]
    for anchor, line, where in edits:
        assert script.count(anchor) == 1, anchor
        script = script.replace(anchor, anchor + line + "\n" if where == "after" else line + "\n" + anchor)
    edited = tmp_path / "realtime_inference.py"
    edited.write_text(script + close + "\n")
    config = realtime_yaml_with_section(project, fake.address)
    done = subprocess.run(
        [sys.executable, str(edited), "--inference_config", config, "--result_dir",
         str(project.dir / "out"), "--enable_gfpgan"],
        cwd=STANDIN, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{STANDIN}"},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "GFPGAN summary: 5 faces in 1 batches; 5 enhanced" in done.stdout
    assert fake.faces == 5


def test_enhancer_from_musetalk_takes_the_section_out_of_what_musetalk_loaded(fake):
    from omegaconf import OmegaConf

    loaded = OmegaConf.create({"avator_1": {"preparation": True},
                               "gfpgan": {"address": fake.address, "upscale": 2}})
    with enhancer_from_musetalk(musetalk_args("--enable_gfpgan"), loaded) as enhancer:
        assert (enhancer.settings.address, enhancer.settings.upscale) == (fake.address, 2)
    assert list(loaded) == ["avator_1"]
    plain = {"task_0": {}, "gfpgan": {"enabled": False}}
    assert enhancer_from_musetalk(musetalk_args(), plain).enabled is False
    assert list(plain) == ["task_0"]


# --- Windows ---------------------------------------------------------------------------------------

def bat_command(path: Path) -> list[str]:
    """The python command of a .bat file: ^-continued lines joined, %VAR% expanded from its
    `set` defaults, %* dropped; split as cmd.exe would split these plain arguments."""
    text = path.read_bytes().decode("ascii")
    assert "\r\n" in text and "\n" not in text.replace("\r\n", "")  # CRLF throughout
    lines = text.split("\r\n")
    defaults = dict(re.findall(r'set "(\w+)=([^"]*)"', text))
    joined = []
    for line in lines:
        if joined and joined[-1].endswith("^"):
            joined[-1] = joined[-1][:-1] + line
        else:
            joined.append(line)
    command = next(line for line in joined if line.startswith("python "))
    command = re.sub(r"%(\w+)%", lambda m: defaults[m.group(1)], command).replace("%*", "")
    return command.split()


def test_the_bat_example_is_the_plans_command_and_the_launcher_accepts_it(fake, tmp_path):
    argv = bat_command(ROOT / "examples" / "run_inference_optimized.bat")
    assert argv[:4] == ["python", "-m", "musetalk_adapter", "run"]
    assert argv[argv.index("--") + 1:argv.index("--") + 3] == ["-m", "scripts.inference"]
    for flag in PLAN_FLAGS:
        assert flag in argv or flag.replace("/", "\\") in argv
    # MuseTalk's own arguments are the Windows command of MuseTalk's README
    assert "configs\\inference\\test.yaml" in argv and "results\\test" in argv
    # the launcher accepts it as written (with the config where this machine can read it)
    argv[argv.index("configs\\inference\\test.yaml")] = str(tmp_path / "test.yaml")
    (tmp_path / "test.yaml").write_text("task_0:\n  video_path: v\n  audio_path: a\n" + PLAN_SECTION)
    argv[argv.index("--gfpgan-address") + 1] = fake.address
    with in_standin(STANDIN):
        settings, script_argv, _, stripped = prepare(argv[3:])
    Path(stripped).unlink()
    assert (settings.enabled, settings.upscale, settings.arch, settings.channel_multiplier) == \
        (True, 2, "clean", 2)
    assert settings.model_path == "models\\gfpgan\\GFPGANv1.4.pth"  # the flag wins over the YAML
    assert not any(arg.startswith("--gfpgan") or arg == "--enable_gfpgan" for arg in script_argv)
    with GFPGANEnhancer(settings) as enhancer:  # and names the model the service serves
        assert enhancer.enhance_face(make_faces(1)[0]).shape == (512, 512, 3)


#: Calls and modules that exist on POSIX only, or behave differently on Windows.
POSIX_ONLY = {"fork", "forkpty", "getuid", "geteuid", "getpgid", "setsid", "killpg", "getpwnam",
              "add_signal_handler", "SIGKILL", "SIGHUP", "SIGUSR1", "SIGALRM", "mkfifo", "chown"}
POSIX_MODULES = {"fcntl", "termios", "pwd", "grp", "resource", "posix", "pty", "uvloop"}


def _posix_only(package: str) -> list[tuple[str, str]]:
    """(file, what) for each POSIX-only module, call, signal or hard-coded POSIX path in a package."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if "pb" in path.parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(path.name, f"import {a.name}") for a in node.names
                          if a.name.split(".")[0] in POSIX_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in POSIX_MODULES:
                found.append((path.name, f"from {node.module}"))
            elif isinstance(node, ast.Attribute) and node.attr in POSIX_ONLY:
                found.append((path.name, f".{node.attr}"))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.match(r"^/(tmp|dev|proc|var|etc|usr)(/|$)", node.value):
                found.append((path.name, repr(node.value)))
    return found


@pytest.mark.parametrize("package", ["contract", "client", "musetalk_adapter"])
def test_the_client_and_adapter_use_no_posix_only_call_or_path(package):
    """What runs on Windows desks (the contract, the client and the adapter) is checked here, on
    Linux (no Windows machine in CI): no POSIX-only module, call or signal, and no hard-coded
    POSIX path."""
    assert _posix_only(package) == []


def test_the_service_uses_posix_only_calls_only_where_a_tested_fallback_follows():
    """gfpgan-serve on a Windows desk: each POSIX-only use in server/ has a fallback, tested on
    Linux as Windows behaves: the event loop's signal handlers (test_server.py's Ctrl-C on a
    loop without them) and the resident memory gauge (its metrics page without /proc and
    `resource`). A new one fails here until it has its own."""
    assert sorted(_posix_only("server")) == [("app.py", ".add_signal_handler"),
                                             ("metrics.py", "'/proc/self/statm'"),
                                             ("metrics.py", "import resource")]


def test_settings_error_is_what_a_caller_catches_for_a_bad_model_key():
    with pytest.raises(SettingsError):
        GFPGANEnhancer(arch="restoreformer++", address="127.0.0.1:1")
    assert issubclass(ModelMismatch, SettingsError)
    args = argparse.Namespace(gfpgan_model_path="m\\GFPGANv1.4.pth")
    from musetalk_adapter.config import from_args

    assert from_args(args).model_path == "m\\GFPGANv1.4.pth"
