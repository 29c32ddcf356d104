#!/usr/bin/env python3
"""What --overlap-batches buys through the real service, on a device that computes asynchronously.

    python scripts/overlap_probe.py [--host-ms 0,2,5] [--device-ms 10] [--waited-ms 0] [--sizes 16,32,64]

A fake CUDA pipeline (tests.fakes.QueuedFakePipeline): a batch costs `--host-ms` a face of
pure-Python work on the service's device thread when it is queued (the GIL held, as the real
pipeline's upload, launches and host work between them hold it), then `--device-ms` a face on
the fake device, which computes batches one at a time in the order they were queued, while
the host goes on. The service is timed over loopback gRPC as gfpgan-bench's `service` method
does (its client in this process, 4 requests in flight, --max-batch-faces 64), with
--overlap-batches off and on side by side. Without overlap the device waits for the host's work
between batches: at best host + device ms a face ("serial"); with it, at best the larger of
the two ("overlapped"). `--waited-ms` adds host work after a wait for the batches queued before,
as a DETECT batch's reads of the detection threshold and the NMS make: that part cannot hide
behind the batch before, so with it the bound is the larger of host and device, plus waited.
Prints one Markdown row per host time, overlap and request size.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contract.types import EnhanceOptions  # noqa: E402
from server.bench import _BatchLog, _loopback_service, bench_service, synthetic_faces  # noqa: E402
from tests.fakes import QueuedFakePipeline  # noqa: E402


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # the GIL is held: nothing else in Python runs
        pass


class AsyncDevice(QueuedFakePipeline):
    """QueuedFakePipeline whose start() first holds the GIL for `host_s` a face; with
    `waited_s`, it then waits for the device to finish every batch queued before (as a DETECT
    batch's threshold and NMS reads wait for the stream) and holds the GIL `waited_s` a face more."""

    def __init__(self, host_s: float, device_s: float, waited_s: float = 0.0):
        super().__init__(record_faces=False, face_s=device_s)
        self.host_s, self.waited_s = host_s, waited_s
        self._last = None

    def start(self, jobs):
        faces = sum(job.faces.shape[0] for job in jobs)
        _busy(self.host_s * faces)
        if self.waited_s:
            if self._last is not None:
                self._last.done.wait(timeout=60)
            _busy(self.waited_s * faces)
        self._last = super().start(jobs)
        return self._last


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--host-ms", default="0,2,5", help="host ms of each face, GIL held")
    parser.add_argument("--device-ms", type=float, default=10.0, help="the fake device's ms a face")
    parser.add_argument("--waited-ms", type=float, default=0.0,
                        help="host ms of each face after a wait for the batches queued before (a "
                             "DETECT batch's reads of the threshold and the NMS), GIL held")
    parser.add_argument("--sizes", default="16,32,64", help="request sizes")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    faces = synthetic_faces(16, 256)
    lines = ["| host ms a face | after a wait | overlap | request faces | faces/s | vs serial | "
             "vs overlapped | faces a batch | p50 ms |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for host in (float(h) for h in args.host_ms.split(",")):
        if host < 0:
            parser.error(f"--host-ms {host} is negative")
        for overlap in ("off", "on"):
            log = _BatchLog(AsyncDevice(host / 1000, args.device_ms / 1000, args.waited_ms / 1000))
            with _loopback_service(log, max(8, max(sizes)), overlap) as address:
                rows = bench_service(address, faces, sizes, EnhanceOptions(), args.iterations, None,
                                     args.in_flight, log)
            serial = host + args.waited_ms + args.device_ms  # the bound without overlap
            # with it, the host's work before the wait hides behind the device's work on the
            # batch before, that after the wait does not: a batch every max(host, device) + waited
            larger = max(host, args.device_ms) + args.waited_ms
            for m, (_, _, batches, _) in zip(rows, log.per_size):
                per_batch = sum(f for f, _, _ in batches) / max(1, len(batches))
                lines.append(f"| {host:g} | {args.waited_ms:g} | {overlap} | {m.batch_size} | {m.faces_per_s:.1f} | "
                             f"{m.faces_per_s * serial / 1000:.2f}x | "
                             f"{m.faces_per_s * larger / 1000:.2f}x | {per_batch:.0f} | "
                             f"{m.percentile(50):.0f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
