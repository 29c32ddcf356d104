#!/usr/bin/env python3
"""Does the loopback service lose throughput because its client shares the bench's interpreter?

    python scripts/service_client_probe.py [--held-ms 0,3,6] [--face-ms 10] [--sizes 16,32,64]

gfpgan-bench's service rows, on a fake device instead of the pipeline: each face costs
`--face-ms`, of which `held` ms is pure-Python work (the GIL held, as a device thread's kernel
launches and host work hold it) and the rest asleep (the GIL released, as a CUDA sync releases
it). The service is timed from its client in this process (gfpgan-bench's `service`) and in a
child process (`service-process`), 4 requests in flight, as gfpgan-bench does; prints one
Markdown row per held time, client and request size, with its faces/s against the device's.
Written for the H200's halving at 32-face requests (BENCHMARKS.md, third run).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contract.types import EnhanceOptions  # noqa: E402
from server.bench import (_BatchLog, _loopback_service, bench_service, bench_service_process,  # noqa: E402
                          synthetic_faces)
from tests.fakes import FakePipeline  # noqa: E402


class GilDevice(FakePipeline):
    """FakePipeline whose batches take `held_s` a face with the GIL held, then `free_s` a face
    with it released."""

    def __init__(self, held_s: float, free_s: float):
        super().__init__(record_faces=False)
        self.held_s, self.free_s = held_s, free_s

    def enhance(self, jobs):
        faces = sum(job.faces.shape[0] for job in jobs)
        end = time.perf_counter() + faces * self.held_s
        while time.perf_counter() < end:  # the GIL is held: nothing else in Python runs
            pass
        time.sleep(faces * self.free_s)
        return super().enhance(jobs)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--held-ms", default="0,3,6", help="ms of each face with the GIL held")
    parser.add_argument("--face-ms", type=float, default=10.0, help="the fake device's ms a face")
    parser.add_argument("--sizes", default="16,32,64", help="request sizes")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    faces = synthetic_faces(16, 256)
    lines = ["| GIL held, ms a face | client | request faces | faces/s | vs the device | p50 ms |",
             "|---:|---|---:|---:|---:|---:|"]
    for held in (float(h) for h in args.held_ms.split(",")):
        if not 0 <= held <= args.face_ms:
            parser.error(f"--held-ms {held} is not within 0 and --face-ms {args.face_ms}")
        log = _BatchLog(GilDevice(held / 1000, (args.face_ms - held) / 1000))
        with _loopback_service(log, max(8, max(sizes))) as address:
            rows = bench_service(address, faces, sizes, EnhanceOptions(), args.iterations, None, args.in_flight, log)
            rows += bench_service_process(address, faces, sizes, EnhanceOptions(), args.iterations, None,
                                          args.in_flight, log)
        for m in rows:
            lines.append(f"| {held:g} | {m.method} | {m.batch_size} | {m.faces_per_s:.1f} | "
                         f"{m.faces_per_s * args.face_ms / 1000:.2f}x | {m.percentile(50):.0f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
