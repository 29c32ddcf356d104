"""gfpgan-enhance: folders in, enhanced files out, in-process or through a (dead) service.

In-process runs use the small random-valued weights; the service runs point at a closed port.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from client.cli import main
from tests.faces import make_faces


def write_faces(folder: Path, count: int, size: int = 128) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    faces = make_faces(count, seed=3, size=size)
    for index, face in enumerate(faces):
        cv2.imwrite(str(folder / f"face_{index}.png"), face)
    return list(faces)


def run_cli(argv) -> int:
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in argv])
    return exited.value.code


def dead_address() -> str:
    """A loopback port nobody listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def test_in_process_folder_gives_one_output_per_face_at_the_output_size_and_wide_comparisons(
        tmp_path, small_weights, capsys):
    write_faces(tmp_path / "in", 3)
    out = tmp_path / "out"
    code = run_cli(["--in-process", "--model", small_weights / "GFPGANv1.4.pth",
                    "--weights-dir", small_weights, "--device", "cpu", "--no-download",
                    "--alignment", "aligned", "--output-size", 256, "--side-by-side",
                    "--batch-size", 2, "--quiet", "-o", out, tmp_path / "in"])
    assert code == 0
    for index in range(3):
        enhanced = cv2.imread(str(out / f"face_{index}.png"))
        compare = cv2.imread(str(out / f"face_{index}_compare.png"))
        assert enhanced.shape == (256, 256, 3)
        assert compare.shape == (256, 512, 3)
        assert np.array_equal(compare[:, 256:], enhanced)
    assert "enhanced 3, no face 0, fell back 0" in capsys.readouterr().err


def test_dead_service_gives_the_lanczos_resize_says_why_and_exits_non_zero(tmp_path, capsys):
    """Issue 9: every face fell back and the CLI said nothing of why and exited 0. It names the
    reason, and exits 1 unless --allow-none-enhanced accepts resized copies."""
    faces = write_faces(tmp_path / "in", 3)
    out = tmp_path / "out"
    address = dead_address()
    code = run_cli(["--address", address, "--timeout-ms", 2000, "--output-size", 256,
                    "--quiet", "-o", out, tmp_path / "in"])
    err = capsys.readouterr().err
    assert code == 1
    for index, face in enumerate(faces):
        expected = cv2.resize(face, (256, 256), interpolation=cv2.INTER_LANCZOS4)
        assert np.array_equal(cv2.imread(str(out / f"face_{index}.png")), expected)
    assert "fell back 3" in err
    assert "fell back (unavailable) for 3 faces" in err and address in err
    assert "error: no face was enhanced" in err
    assert run_cli(["--address", address, "--timeout-ms", 2000, "--quiet", "--allow-none-enhanced",
                    "-o", out, tmp_path / "in"]) == 0


def test_unreadable_or_non_square_input_is_named_and_the_exit_status_is_non_zero(tmp_path, capsys):
    folder = tmp_path / "in"
    write_faces(folder, 1)
    (folder / "broken.png").write_bytes(b"not an image")
    cv2.imwrite(str(folder / "wide.png"), np.zeros((100, 150, 3), np.uint8))
    out = tmp_path / "out"
    code = run_cli(["--address", dead_address(), "--timeout-ms", 2000, "--quiet", "-o", out, folder])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.png: not a readable png/jpg/webp image" in err
    assert "wide.png: the face crop is 150x100; crops must be square" in err
    # The good face is still written.
    assert (out / "face_0.png").is_file()
    assert not (out / "broken.png").exists()


def test_missing_file_exits_non_zero(tmp_path, capsys):
    code = run_cli(["--address", dead_address(), "--quiet", "-o", tmp_path / "out",
                    tmp_path / "nope.png"])
    assert code == 1
    assert "nope.png: no such file" in capsys.readouterr().err


def test_landmarks_alignment_is_refused_for_image_files(tmp_path, capsys):
    code = run_cli(["--address", "127.0.0.1:1", "--alignment", "landmarks", "-o", tmp_path,
                    tmp_path])
    assert code == 2
    assert "landmarks" in capsys.readouterr().err


def test_service_mode_does_not_import_torch(tmp_path):
    write_faces(tmp_path / "in", 1)
    script = ("import sys, client.cli as c\n"
              "try:\n"
              f"    c.main(['--address', {dead_address()!r}, '--timeout-ms', '2000', '--quiet', '--allow-none-enhanced',"
              f" '-o', {str(tmp_path / 'out')!r}, {str(tmp_path / 'in')!r}])\n"
              "except SystemExit as e:\n"
              "    print('torch' in sys.modules, e.code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.split() == ["False", "0"], done.stderr


def test_in_process_without_weights_and_no_download_says_which_files_are_missing(tmp_path, capsys):
    write_faces(tmp_path / "in", 1)
    with pytest.raises(SystemExit) as exited:
        main(["--in-process", "--weights-dir", str(tmp_path / "empty"), "--device", "cpu",
              "--no-download", "--quiet", "-o", str(tmp_path / "out"), str(tmp_path / "in")])
    message = str(exited.value.code)
    assert message.startswith("error: ") and "GFPGANv1.4.pth" in message
    assert "--no-download" in message
    assert not (tmp_path / "out").exists()


def test_model_with_address_asks_the_service_for_that_restorer(tmp_path):
    """Issue 10: gfpgan-enhance --model restoreformer --address ... names the restorer in every
    request; the in-process run takes the same word as a known id (tests/test_models.py)."""
    from tests.fake_service import FakeService

    write_faces(tmp_path / "in", 3)
    with FakeService() as fake:
        code = run_cli(["--address", fake.address, "--model", "restoreformer", "--batch-size", 2,
                        "--quiet", "-o", tmp_path / "out", tmp_path / "in"])
        asked = list(fake.servicer.model_ids)
    assert code == 0 and asked == ["restoreformer", "restoreformer"]



def test_the_in_process_door_gives_the_pipelines_faces_refuses_bad_sizes_and_keeps_one_video(small_weights):
    """server/local.py, the one door gfpgan-enhance's in-process mode uses: the faces the
    service's pipeline gives for the same job, exactly; a face size the service refuses is
    refused the same way; steady-video batches are one video's frames."""
    from contract.types import Alignment, EnhanceOptions, FaceStatus, InvalidRequest
    from server.jobs import Job
    from server.local import LocalEnhancer, LocalSetupError
    from server.steady import VideoState

    enhancer = LocalEnhancer(model=str(small_weights / "GFPGANv1.4.pth"), device="cpu",
                             weights_dir=str(small_weights), no_download=True)
    faces = make_faces(2, seed=5, size=128)
    options = EnhanceOptions(alignment=Alignment.ALIGNED, output_size=256).validate()
    result = enhancer.enhance(faces, options)
    expected = enhancer.pipeline.enhance([Job(faces, options)])[0]
    assert np.array_equal(result.faces, expected.faces)
    assert result.status == [FaceStatus.ENHANCED] * 2 and not result.fell_back
    with pytest.raises(InvalidRequest, match="outside the accepted"):
        enhancer.enhance(np.zeros((1, 32, 32, 3), np.uint8), options)
    steady = EnhanceOptions(steady_video=True).validate()
    video = VideoState()
    for start in (0, 1):  # two batches of one stream, and the same two through a fresh state
        frames = make_faces(2, seed=7 + start, size=256)
        assert np.array_equal(enhancer.enhance(frames, steady).faces,
                              enhancer.pipeline.enhance([Job(frames, steady, video=video)])[0].faces)
    assert enhancer.video.frame == video.frame == 4
    with pytest.raises(LocalSetupError, match="GFPGANv1.4.pth"):
        LocalEnhancer(model="GFPGANv1.4.pth", device="cpu", weights_dir=str(small_weights / "none"),
                      no_download=True)
