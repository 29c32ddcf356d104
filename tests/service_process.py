"""`gfpgan-serve` as a process of its own on loopback, for the client's and the adapter's tests.

The service may run from another Python than the tests: GFPGAN_TEST_SERVER_PYTHON names it
(scripts/check_client_envs.sh runs the adapter's tests in a Python 3.10 environment pinned like
MuseTalk's, with no torch, against a service from the main environment). The weights it loads
are made by that Python too, so this module imports nothing of torch or the server.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import free_port, serving

ROOT = Path(__file__).resolve().parent.parent
#: The interpreter that runs the service (and makes its weights).
SERVER_PYTHON = os.environ.get("GFPGAN_TEST_SERVER_PYTHON") or sys.executable
#: The GFPGAN file name in a test weights dir (tests.checkpoints.GFPGAN_FILE, without torch).
GFPGAN_FILE = "GFPGANv1.4.pth"


def in_another_python() -> bool:
    return Path(SERVER_PYTHON).absolute() != Path(sys.executable).absolute()


def make_small_weights(directory: Path) -> Path:
    """tests.checkpoints.make_weights_dir(directory, narrow=SMALL_NARROW), by SERVER_PYTHON."""
    if not in_another_python():
        from tests.checkpoints import SMALL_NARROW, make_weights_dir

        return make_weights_dir(directory, narrow=SMALL_NARROW)
    code = ("import sys, pathlib; from tests.checkpoints import SMALL_NARROW, make_weights_dir; "
            "make_weights_dir(pathlib.Path(sys.argv[1]), narrow=SMALL_NARROW)")
    subprocess.run([SERVER_PYTHON, "-c", code, str(directory)], cwd=ROOT, check=True, timeout=600)
    return directory


@contextlib.contextmanager
def gfpgan_serve(weights: Path, *extra: str):
    """`gfpgan-serve` on loopback (CPU, float32, no download); yields (address, metrics_url,
    process). float32 on every machine: the tests compare faces enhanced in different batches
    within a level, and bf16 (auto's choice on CPUs that compute it) rounds differently with the
    batch around a face. `extra` flags come last and win."""
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [SERVER_PYTHON, "-c", "from server.app import main; main()", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", str(metrics_port), "--model",
         str(weights / GFPGAN_FILE), "--weights-dir", str(weights), "--device", "cpu",
         "--dtype", "float32", "--no-download", "--no-warmup", "--max-batch-faces", "8", *extra],
        cwd=ROOT, env={**os.environ, "GRPC_VERBOSITY": "ERROR"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not serving(address):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "gfpgan-serve did not become SERVING"
            time.sleep(0.3)
        yield address, f"http://127.0.0.1:{metrics_port}/metrics", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
