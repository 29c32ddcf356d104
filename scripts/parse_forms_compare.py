#!/usr/bin/env python3
"""ParseNet's border and phases forms at two revisions, side by side in one process.

    python scripts/parse_forms_compare.py --before REV [--batch 2] [--repeats 3] [--threads 2]

Loads `upsample_conv2d` and `border_conv2d` from server/speed.py as it was at REV (git show)
and as it is in the working tree, and times, alternating the two so that both see the same
machine:
- each of ParseNet's x2 layer shapes alone (input channels, output channels, map size), NCHW
  and channels-last;
- a whole ParseNet pass (full size, random-valued, border + phases, norms folded,
  channels-last: the CUDA defaults' forms), with the largest difference of the two passes'
  logits.
Prints Markdown tables, best of `--repeats`. Written for the phases' one-convolution form
(BENCHMARKS.md, "Back under 1,000 with the CUDA defaults").
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import server.compat  # noqa: E402,F401 - basicsr's imports on a current torchvision
from server import speed  # noqa: E402

#: ParseNet's x2 layers: (input channels, output channels, input map size, batch timed)
UP_LAYERS = [(256, 256, 32, 4), (256, 256, 64, 4), (256, 128, 128, 2), (128, 64, 256, 1)]


def load_speed(revision: str):
    """server/speed.py as it was at `revision`, as a module of its own."""
    text = subprocess.run(["git", "show", f"{revision}:server/speed.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "speed_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("speed_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def ms(fn) -> float:
    """One timed call of fn (each form has run once before: its checks warm it up)."""
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def layers(before, repeats: int) -> str:
    lines = ["| x2 layer (in -> out channels, input size, batch) | layout | before ms | after ms | after / before |",
             "|---|---|---:|---:|---:|"]
    for c_in, c_out, size, batch in UP_LAYERS:
        for nhwc in (False, True):
            torch.manual_seed(size)
            conv = torch.nn.Conv2d(c_in, c_out, 3)
            x = torch.randn(batch, c_in, size, size)
            if nhwc:
                x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
            with torch.no_grad():
                reference = conv(torch.nn.ReflectionPad2d(1)(F.interpolate(x, scale_factor=2)))
                for form in (before, speed):
                    worst = (form.upsample_conv2d(x, conv) - reference).abs().max().item()
                    assert worst < 1e-3, (form.__name__, worst)
                times = {}
                for _ in range(repeats):  # alternate the two
                    for form in (before, speed):
                        took = ms(lambda: form.upsample_conv2d(x, conv))
                        times[form] = min(times.get(form, took), took)
            lines.append(f"| {c_in} -> {c_out}, {size}x{size}, {batch} | {'channels-last' if nhwc else 'NCHW'} | "
                         f"{times[before]:.1f} | {times[speed]:.1f} | {times[speed] / times[before]:.2f} |")
    return "\n".join(lines)


def whole_pass(before, batch: int, repeats: int) -> str:
    from facexlib.parsing.parsenet import ParseNet

    torch.manual_seed(0)
    parser = ParseNet(512, 512, 32, 64, parsing_ch=19, norm_type="bn", relu_type="LeakyReLU",
                      ch_range=[32, 256]).eval()
    speed.prepare_resampling(parser)
    speed.set_parse_forms(parser, "border", "phases")
    speed.set_norm_folding(parser, True)
    speed.set_memory_format(parser, True)
    x = (torch.rand(batch, 3, 512, 512) * 2 - 1).contiguous(memory_format=torch.channels_last)
    after = (speed.upsample_conv2d, speed.border_conv2d)

    def use(form):  # the layers' forward calls these by their module-level names
        speed.upsample_conv2d, speed.border_conv2d = \
            (before.upsample_conv2d, before.border_conv2d) if form is before else after

    times, logits = {}, {}
    try:
        with torch.inference_mode():
            for form in (before, speed):
                use(form)
                logits[form] = parser(x)[0]
            for _ in range(repeats):
                for form in (before, speed):
                    use(form)
                    took = ms(lambda: parser(x))
                    times[form] = min(times.get(form, took), took)
    finally:
        use(speed)
    worst = (logits[before] - logits[speed]).abs().max().item()
    return "\n".join([
        f"| ParseNet pass, batch {batch} at 512 (border + phases, folded, channels-last) | ms |",
        "|---|---:|",
        f"| before | {times[before]:.0f} |",
        f"| after | {times[speed]:.0f} |",
        f"| after / before | {times[speed] / times[before]:.3f} |",
        f"| largest difference of the logits | {worst:.2e} |"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = load_speed(args.before)
    print(layers(before, args.repeats))
    print()
    print(whole_pass(before, args.batch, args.repeats))


if __name__ == "__main__":
    main()
