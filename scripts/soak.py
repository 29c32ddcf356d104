"""A bounded soak: clients stream frames at a service for a while; prints, every interval,
the frames sent and answered (enhanced / fell back), and the service's resident memory.

    python scripts/soak.py --spawn-fake --seconds 120            # the real gfpgan-serve process
                                                                 # around the fake pipeline
    python scripts/soak.py --address HOST:50051 --pid PID        # a running service (RSS if local)
    python scripts/soak.py --spawn-fake --fake-out-of-memory-above 8   # a device that has memory
                                                                 # for batches of 8 faces, not 16
    python scripts/soak.py --spawn-fake --fake-delay-s 0 --clients 1 --in-flight 4 --batch 32 \
        --fake-max-batch-faces 64                # gfpgan-bench's service method: one client, 4
                                                 # requests in flight on one stream

Not a test: it prints a table for a person to read (BENCHMARKS.md, "Soak"). A leak shows as
RSS climbing row after row while frames in and out stay level.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import EnhanceOptions, FaceEnhanceClient  # noqa: E402


def rss_mib(pid: int | None) -> str:
    if pid is None:
        return "-"
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return f"{int(line.split()[1]) / 1024:.0f}"
    except OSError:
        pass
    return "?"


def spawn_fake(delay_s: float, out_of_memory_above: int | None = None,
               max_batch_faces: int = 16) -> tuple[subprocess.Popen, str]:
    env = {"PYTHONPATH": str(ROOT), "FAKE_DELAY_S": str(delay_s), "PATH": "/usr/bin:/bin"}
    if out_of_memory_above is not None:
        env["FAKE_OUT_OF_MEMORY_ABOVE"] = str(out_of_memory_above)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "serve_fake.py"), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--max-batch-faces", str(max_batch_faces), "--max-delay-ms", "2",
         "--max-faces-per-request", str(max(32, max_batch_faces)),
         "--max-queue-faces", str(max(256, 8 * max_batch_faces))],
        cwd=ROOT, env=env,
        stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        match = re.search(r"SERVING on 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, f"127.0.0.1:{match.group(1)}"
    raise SystemExit("the fake service did not start:\n" + (process.stderr.read() or ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="a running service")
    where.add_argument("--spawn-fake", action="store_true", help="start tests/serve_fake.py here")
    parser.add_argument("--pid", type=int, help="the service's process id, for its RSS (local only)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="faces per request")
    parser.add_argument("--in-flight", type=int, default=1,
                        help="requests each client keeps in flight (submit()), on its one stream")
    parser.add_argument("--size", type=int, default=256, help="face side in pixels")
    parser.add_argument("--fake-delay-s", type=float, default=0.02, help="--spawn-fake: seconds per batch")
    parser.add_argument("--fake-out-of-memory-above", type=int, default=None, metavar="FACES",
                        help="--spawn-fake: device batches of more faces run out of memory (the "
                             "service's --max-batch-faces is 16)")
    parser.add_argument("--fake-max-batch-faces", type=int, default=16,
                        help="--spawn-fake: the service's --max-batch-faces (gfpgan-bench's loopback "
                             "service has the largest batch size it measures, at least 8)")
    args = parser.parse_args(argv)

    process, address, pid = None, args.address, args.pid
    if args.spawn_fake:
        process, address = spawn_fake(args.fake_delay_s, args.fake_out_of_memory_above,
                                      args.fake_max_batch_faces)
        pid = process.pid
    counts = {"sent": 0, "enhanced": 0, "fell_back": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        faces = rng.integers(0, 256, (args.batch, args.size, args.size, 3), np.uint8)
        window = threading.Semaphore(args.in_flight)

        def answered(future) -> None:
            if future.cancelled():  # the client closed under it, at the end
                return
            with lock:
                counts["fell_back" if future.result().fell_back else "enhanced"] += args.batch
            window.release()

        with FaceEnhanceClient(address, options=EnhanceOptions(output_size=256), timeout_ms=5000,
                               max_in_flight=args.in_flight) as client:
            while not stop.is_set():
                if not window.acquire(timeout=0.1):
                    continue
                with lock:
                    counts["sent"] += args.batch
                client.submit(faces).add_done_callback(answered)

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(args.clients)]
    print(f"soak: {args.clients} clients x {args.in_flight} in flight x {args.batch} faces of {args.size} px "
          f"at {address} for {args.seconds:.0f} s")
    print("| t (s) | frames sent | enhanced | fell back | frames/s | service RSS (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| 0 | 0 | 0 | 0 | - | {rss_mib(pid)} |", flush=True)
    started = last_t = time.monotonic()
    last_out = 0
    for thread in threads:
        thread.start()
    try:
        while (now := time.monotonic()) - started < args.seconds:
            time.sleep(min(args.interval, args.seconds - (now - started)))
            now = time.monotonic()
            with lock:
                snapshot = dict(counts)
            out = snapshot["enhanced"] + snapshot["fell_back"]
            rate = (out - last_out) / max(now - last_t, 1e-9)
            print(f"| {now - started:.0f} | {snapshot['sent']} | {snapshot['enhanced']} | "
                  f"{snapshot['fell_back']} | {rate:.0f} | {rss_mib(pid)} |", flush=True)
            last_t, last_out = now, out
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        if process is not None:
            process.terminate()
            process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
