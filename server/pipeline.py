"""The batched GFPGAN pipeline: faces in, restored faces out, in one pass on the device.

faces -> one tensor -> batched detection -> per-face similarity transform -> warp to the
512 template -> GFPGAN over the whole batch -> inverse warp + soft parsing-mask paste ->
fidelity blend -> output size -> uint8. It knows nothing about gRPC or queues; the batcher
calls `enhance(jobs)`, or `start(jobs)` and then the handle's `result()`, from its worker
threads (see server/jobs.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from contract.types import Alignment, Background, EnhanceOptions, FaceStatus
from server import imageops
from server.detection import FaceDetector, Faces, centre_choice, centre_mask, decode, network_input, priors
from server.jobs import DeviceOutOfMemory, Job, JobResult, ModelInfo, Started, start_batch
from server.memory import AUTO_CPU, MEASURED_SIZES, BatchMemory, measure_passes, peak_meter
from server.steady import VideoState
from server.speed import (CompiledForward, GraphedForward, NoisePlan, SpeedOptions, box_paste_mask,
                          check_speed_device, compile_toolchain_problem, graph_buckets, prepare_resampling,
                          reset_compiled, set_activation_form, set_norm_folding, set_memory_format,
                          set_modconv_form, set_parse_forms)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

FACE_SIZE = 512
# facexlib's FFHQ 5-point template for 512x512 faces: eyes, nose, mouth corners.
FACE_TEMPLATE = torch.tensor([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], dtype=torch.float64)
# facexlib fills the area outside the image with this grey (BGR) when warping to the template.
WARP_BORDER_BGR = (135.0, 133.0, 132.0)
# ParseNet classes that belong to the face mask (facexlib's MASK_COLORMAP: 0 background,
# 14 neck, 16 cloth, 17 hair, 18 hat are left out).
_FACE_CLASSES = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0]
# facexlib feathers the parsing mask with two 101x101 Gaussian blurs (sigma 11) and clears a
# 10-pixel frame.
_MASK_BLUR = (101, 11.0, 2)
_MASK_FRAME = 10
#: How far a compiled pass's output may be from the float32 eager pass's, at warm-up, in levels
#: of 0..255 (a mask's 0..1 scaled to it), over its mean and its 99.9th percentile: twice as far
#: as the eager pass in the service's dtype is, plus these. Compiled code rounds in another order
#: (float32 inside fused kernels where eager rounds each bf16 result), so in bf16 it is often
#: nearer float32 than eager is; a compiler bug (a wrong stride, a dropped term) moves faces by
#: tens of levels. In float32 the eager pass is the reference, and half a level on average, 4 at
#: the 99.9th percentile, is what reordered float32 sums may move.
COMPILE_CHECK_SLACK = (0.5, 4.0)
#: How far the compiled detector's anchors may be from the eager pass's, at warm-up: their
#: boxes' and landmarks' coordinates in pixels of the 256x256 image, on average and at the
#: 99.9th percentile, and their face scores (0..1), at most. Both passes run float32 (TF32 on
#: CUDA), so the eager pass is the reference: reordered sums moved a coordinate by a
#: thousandth of a pixel and a score by 0.0002 (Inductor on the CPU, the test weights), and
#: TF32's rounding moves scores near 0.5 by thousandths; a compiler bug moves pixels and tenths.
#: Half a pixel here is one in the 512 template.
DETECTOR_CHECK = (0.05, 0.5, 0.01)
# Most faces in one network pass. At 64 faces GFPGAN's last upsampling (64 x 128 x 512 x 512)
# and ParseNet's reflect padding pass 2**31 elements, beyond which CUDA kernels refuse to index
# ("input tensor must fit into 32-bit index math", seen on an H200); batches of 32 run as fast
# per face as larger ones there (BENCHMARKS.md), so larger batches run in passes of 32.
MAX_NETWORK_FACES = 32
# A hard cap on restored faces per image when only_center_face is off, so that one
# crowded (or adversarial) image cannot blow up a device batch.
MAX_FACES_PER_IMAGE = 8
#: The image size whose detection is captured as CUDA graphs (MuseTalk's crops).
GRAPHED_DETECTION_SIZE = 256
#: A status the device writes for an image whose wait-free detection was not settled; never
#: reported (not a FaceStatus): _Launched.result() runs that image's job again, detecting exactly.
REDETECT = 255
#: The scales an image -> template alignment may have (the template's eyes are 126 px apart):
#: eyes 4 px to about 1000 px apart. A fit outside, or not finite (landmarks that coincide or
#: lie on one line), cannot be a face: it is neither restored into the image nor ENHANCED.
ALIGN_SCALE_RANGE = (1 / 8, 32.0)


def _to_network(images_bgr: torch.Tensor) -> torch.Tensor:
    """0..255 BGR -> the [-1, 1] RGB the networks take."""
    return images_bgr.flip(1) / 127.5 - 1.0


def _from_network(output_rgb: torch.Tensor) -> torch.Tensor:
    """Network output [-1, 1] RGB -> 0..255 BGR, rounded like basicsr's tensor2img."""
    return ((output_rgb.float().clamp(-1, 1) + 1.0) * 127.5).round().flip(1)


def check_crops(n: int, device: torch.device) -> torch.Tensor:
    """n 0..255 BGR template crops (n, 3, 512, 512), the same on every call, that vary at every
    scale from the whole face down to single pixels: what a pass is checked on at warm-up, where
    a flat grey crop would leave most of a network's arithmetic multiplying constants."""
    generator = torch.Generator().manual_seed(20261130)
    crops = torch.full((n, 3, FACE_SIZE, FACE_SIZE), 128.0)
    for size, spread in ((4, 60.0), (16, 35.0), (64, 20.0), (FACE_SIZE, 8.0)):
        noise = torch.randn(n, 3, size, size, generator=generator) * spread
        crops += torch.nn.functional.interpolate(noise, size=(FACE_SIZE, FACE_SIZE), mode="bilinear",
                                                 align_corners=False) if size < FACE_SIZE else noise
    return crops.clamp(0, 255).round().to(device)


def parse_logits(parser: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ParseNet's face-part logits for x, as `parser(x)[0]`, without its image output.

    facexlib's ParseNet.forward also runs `out_img_conv` (a reflection pad and a 64 -> 3
    convolution over the 512x512 features) for an image the paste never reads: one of the
    network's largest padding passes, done for nothing. The same layers, in the same order,
    make the logits here. Any other parser is called as it is."""
    layers = ("encoder", "body", "decoder", "out_mask_conv")
    if not all(isinstance(getattr(parser, name, None), torch.nn.Module) for name in layers):
        return parser(x)[0]
    feat = parser.encoder(x)
    return parser.out_mask_conv(parser.decoder(feat + parser.body(feat)))


class _Mask:
    """Steady video's mask_every: the paste mask one frame computes for its stream's next
    frames. VideoState.mask holds it from the host-side planning on; `tensor` (1, 1, 512, 512),
    in template space, is there from the moment the pass computes it."""

    __slots__ = ("video", "tensor")

    def __init__(self, video: VideoState):
        self.video = video
        self.tensor: torch.Tensor | None = None


@dataclass
class _Group:
    """The images of one input size in a device batch, on their way through the pipeline.

    Everything that depends only on the options is decided on the host before the upload
    (which images detect, which are aligned, output rows, fidelity), so the device never has to
    report back until the results are downloaded.
    """

    key: str                       # names its upload buffers
    indices: list[int]             # which jobs, in order
    images: torch.Tensor           # (n, 3, S, S) float BGR 0..255
    options: list[EnhanceOptions]  # per image
    faces: Faces                   # faces to restore and paste (DETECT and LANDMARKS images)
    affines: torch.Tensor          # (faces, 2, 3) image -> 512 template
    aligns: torch.Tensor           # (faces,) bool: the fit is a usable alignment
    aligned_index: torch.Tensor    # images given as already aligned (ALIGNED)
    aligned_host: list[int]        # the same, on the host
    warped: torch.Tensor           # (faces, 3, 512, 512) template crops
    aligned_inputs: torch.Tensor   # (aligned, 3, 512, 512) ALIGNED inputs resized to 512
    noise: torch.Tensor            # per crop (faces then aligned): wants random noise
    fidelity: torch.Tensor         # (n,) per image
    weights: torch.Tensor          # per crop: the network's own fidelity weight (CodeFormer's w)
    pasted_faces: torch.Tensor | None = None
    aligned_faces: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    #: steady video's mask_every: face row -> the _Mask it computes, and face row -> the _Mask
    #: (an earlier frame's) it pastes with instead of its own
    mask_made: dict[int, "_Mask"] = dataclasses.field(default_factory=dict)
    mask_reused: dict[int, "_Mask"] = dataclasses.field(default_factory=dict)
    #: (n,) bool: False for the images to detect again, the waiting way (their wait-free
    #: detection could not vouch for its face); None when nothing was detected wait-free
    settled: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.options)

    @property
    def num_crops(self) -> int:
        return self.warped.shape[0] + self.aligned_inputs.shape[0]


class _HostStaging:
    """Pinned host buffers, reused from batch to batch, for asynchronous uploads to CUDA.

    Two sets, a batch's uploads in one and the next batch's in the other, so that a batch can
    be queued on the device while the one before it computes (FacePipeline.start): its
    uploads never write into a buffer that a queued copy still reads. Before a set is filled
    again, the host waits for the device to have finished the batch that filled it last (at
    most two batches are queued at once, so that batch has normally finished long before).
    """

    SETS = 2

    def __init__(self, device: torch.device, owner: "FacePipeline"):
        self.device = device
        self.owner = owner
        self._sets: list[dict[str, torch.Tensor]] = [{} for _ in range(self.SETS)]
        #: per set: recorded after the last batch that filled it was queued (CUDA only)
        self._done: list[object | None] = [None] * self.SETS
        self._current = 0

    def next_batch(self) -> None:
        """Switch to the other set of buffers, once the device is done with what they hold."""
        self._current = (self._current + 1) % self.SETS
        done = self._done[self._current]
        if done is not None:
            done.synchronize()

    def batch_queued(self) -> None:
        """The current batch's work is all queued: its set is free again once the device gets
        past this point."""
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._done[self._current] = event

    def _uploading(self):
        profiler = self.owner.profiler
        return profiler.uploading() if profiler is not None else contextlib.nullcontext()

    def upload(self, key: str, array: np.ndarray) -> torch.Tensor:
        with self._uploading():
            return self._upload(key, array)

    def upload_joined(self, key: str, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """np.concatenate(arrays) on the device. On CUDA the arrays are joined straight into
        the pinned buffer: one host copy of the batch's images, not two, and no fresh
        allocation (a new batch-sized array page-faults in: 25 ms for 64 faces of 256x256)."""
        with self._uploading():
            if self.device.type != "cuda":
                return torch.from_numpy(np.concatenate(arrays))
            shape = (sum(a.shape[0] for a in arrays), *arrays[0].shape[1:])
            staged = self._staged(key, int(np.prod(shape)), torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype).view(shape)
            np.concatenate(arrays, out=staged.numpy())
            return staged.to(self.device, non_blocking=True)

    def _upload(self, key: str, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        if self.device.type != "cuda":
            return torch.from_numpy(array)
        source = torch.from_numpy(array)
        staged = self._staged(key, source.numel(), source.dtype).view(source.shape)
        staged.copy_(source)
        return staged.to(self.device, non_blocking=True)

    def _staged(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """`numel` elements of the current set's pinned buffer `key` (grown by half when short)."""
        buffers = self._sets[self._current]
        buffer = buffers.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = torch.empty(max(numel, 1) * 3 // 2 + 1, dtype=dtype, pin_memory=True)
            buffers[key] = buffer
        return buffer[:numel]


class FacePipeline:
    """GFPGAN + RetinaFace + ParseNet, resident on one device, run over batches of faces."""

    def __init__(self, gfpgan: torch.nn.Module, detector: torch.nn.Module, parser: torch.nn.Module,
                 *, device: torch.device, dtype: torch.dtype, info: ModelInfo | None = None,
                 speed: SpeedOptions | None = None, graph_max_batch: int = 8, upsampler=None,
                 compile_backend: str = "inductor"):
        self.gfpgan = gfpgan
        #: server.background.BackgroundUpsampler for `background: realesrgan`, or None.
        self.upsampler = upsampler
        self.detector = FaceDetector(detector)
        self.parser = parser
        self.device = torch.device(device)
        self.dtype = dtype
        self.info = info or ModelInfo("GFPGAN", "GFPGANv1Clean", "", str(self.device), str(dtype))
        self._face_mask_lut = torch.tensor(_FACE_CLASSES, dtype=torch.float32, device=self.device)
        self._template = FACE_TEMPLATE.to(self.device)
        self._border = torch.tensor(WARP_BORDER_BGR, device=self.device)
        self._box_mask = torch.from_numpy(box_paste_mask(FACE_SIZE)).to(self.device).view(1, 1, FACE_SIZE, FACE_SIZE)
        #: imageops.gaussian_blur(masks, *_MASK_BLUR) as two matrices, made once
        self._mask_blur = imageops.gaussian_blur_matrices(FACE_SIZE, FACE_SIZE, *_MASK_BLUR,
                                                          device=self.device, dtype=torch.float32)
        self._staging = _HostStaging(self.device, self)
        self._queueing = threading.RLock()
        #: Images detected again, exactly, because their wait-free detection was not settled
        #: (FaceDetector.centre_rows): the faceenhance_redetected_images metric.
        self.redetected_images = 0
        #: Passes run in float32 whatever self.dtype is (the compiled passes' check at warm-up).
        self._float32_reference = False
        #: What each compiled pass's check at warm-up measured (_check_compiled), by pass name.
        self.compile_checks: dict[str, str] = {}
        self._noise_plan: NoisePlan | None = None
        self._graphs: dict[str, GraphedForward] = {}
        #: GFPGAN's fixed-noise pass and ParseNet's masks as the batch runs them: the methods, or
        #: their CompiledForward with `compile` (the CUDA graphs capture whichever it is)
        self._fixed: dict[str, Callable] = {}
        #: speed forms asked for that did not take effect (a failed capture or compile), for
        #: whoever measures them: the service still runs, on the slower form
        self.fallbacks: list[str] = []
        self.graph_max_batch = graph_max_batch
        #: torch.compile's backend for `compile` (CompiledForward): Inductor unless a test asks
        self.compile_backend = compile_backend
        #: Attach a server.profiling.StageProfiler to time stages and count launches and syncs.
        self.profiler = None
        self.speed = SpeedOptions()
        self.set_speed(speed or SpeedOptions())

    # -- speed forms ------------------------------------------------------------------------

    def set_speed(self, speed: SpeedOptions) -> None:
        """Switch the networks to `speed`'s forms; CUDA graphs are (re)captured by warmup()."""
        self._graphs = {}
        self.detector.drop_graphs()
        # GFPGAN channels-last with the unfused form (its decoder too when asked); ParseNet when
        # asked (slower in NHWC on an H200 with its own padding, faster with the border form:
        # BENCHMARKS.md).
        if isinstance(self.gfpgan, torch.nn.Module):
            set_memory_format(self.gfpgan, speed.channels_last, modulated=speed.decoder_channels_last)
        if isinstance(self.parser, torch.nn.Module):
            set_norm_folding(self.parser, False)  # the layout goes to the unfolded weights too
            set_memory_format(self.parser, speed.parse_channels_last)
        if isinstance(self.gfpgan, torch.nn.Module) and hasattr(self.gfpgan, "stylegan_decoder"):
            set_modconv_form(self.gfpgan, speed.modconv, speed.modulate_dtype)
            set_activation_form(self.gfpgan, speed.activations, speed.gfpgan_forward, speed.modconv,
                                speed.gfpgan_upsample)
            _keep_style_input_contiguous(self.gfpgan)
        prepare_resampling(self.parser)
        set_parse_forms(self.parser, speed.parse_padding, speed.parse_upsample)
        set_norm_folding(self.detector.net, speed.fold_norms)
        set_norm_folding(self.parser, speed.fold_norms)
        if hasattr(self.gfpgan, "stylegan_decoder") and self._noise_plan is None:
            # its hook exists from the start: one added later would change what compiled code
            # was made against
            self._noise_plan = NoisePlan(self.gfpgan)
        if speed.compile or self.speed.compile or speed.compile_detector or self.speed.compile_detector:
            reset_compiled()
        self._fixed = {"gfpgan": self._gfpgan_fixed_noise, "parse": self._parse_masks}
        if speed.compile:
            # CodeFormer's passes take its fidelity weight (_restore_weighted), not this one
            skip = {"gfpgan"} if getattr(self.gfpgan, "takes_fidelity_weight", False) else set()
            self._fixed = {name: fn if name in skip else
                           CompiledForward(fn, name, speed.resampling, self.compile_backend)
                           for name, fn in self._fixed.items()}
        if speed.compile_detector:
            # RetinaFace's network pass for 256x256 images (FaceDetector.raw routes them to it)
            self._fixed["detect"] = CompiledForward(self.detector.net_pass, "detect", backend=self.compile_backend)
        self._use_detector_pass()
        self.fallbacks = []
        self.compile_checks = {}
        self.speed = speed
        for note in check_speed_device(speed, self.device):
            log.warning("%s", note)

    def set_graph_max_batch(self, largest: int) -> None:
        """CUDA graphs for batches of up to `largest` faces from the next warmup(). Graphs already
        captured are kept when the buckets stay the same, and nothing else is redone: compiled
        passes stay compiled."""
        if graph_buckets(min(largest, MAX_NETWORK_FACES)) != \
                graph_buckets(min(self.graph_max_batch, MAX_NETWORK_FACES)):
            self._graphs = {}
            self.detector.drop_graphs()
        self.graph_max_batch = largest

    def _capture_graphs(self) -> None:
        """GFPGAN, ParseNet and RetinaFace (on 256x256 images, the size lip-sync crops come in;
        other sizes detect eagerly) as CUDA graphs per batch-size bucket. A network whose capture
        fails is logged and runs eagerly: a slower service, not one that does not start."""
        buckets = graph_buckets(min(self.graph_max_batch, MAX_NETWORK_FACES))
        shape = (3, FACE_SIZE, FACE_SIZE)
        self._graphs = {}
        self.detector.drop_graphs()
        graphs = {"gfpgan": GraphedForward(self._fixed["gfpgan"], shape, buckets, self.device)}
        if self.speed.paste_mask == "parse":
            graphs["parse"] = GraphedForward(self._fixed["parse"], shape, buckets, self.device)
        # with wait-free detection, RetinaFace and its post-processing in one graph (raw_centre)
        detect = self.detector.raw_centre if self.speed.fixed_detection else self.detector.raw
        graphs["detect"] = GraphedForward(detect, (3, GRAPHED_DETECTION_SIZE, GRAPHED_DETECTION_SIZE),
                                          buckets, self.device)
        captured = {}
        # One memory pool for the three networks' graphs: it keeps about the largest network's
        # peak at the largest bucket, where a pool each would keep the sum (server.memory sizes
        # --max-batch-faces auto by it).
        pool = torch.cuda.graph_pool_handle()
        for name, graph in graphs.items():
            try:
                graph.capture(pool)
            except Exception as error:  # noqa: BLE001 - that network stays eager
                log.warning("CUDA graph capture of %s failed, it runs eagerly: %s: %s", name,
                            type(error).__name__, error)
                self.fallbacks.append(f"cuda graphs of {name}: {_first_line(error)}")
                if not captured:  # the pool's graphs are gone with the failure: a new one
                    pool = torch.cuda.graph_pool_handle()
                continue
            captured[name] = graph
        self._graphs = captured
        if "detect" in captured:
            self.detector.use_graph((GRAPHED_DETECTION_SIZE, GRAPHED_DETECTION_SIZE), captured["detect"],
                                    with_centre=self.speed.fixed_detection)
        log.info("captured CUDA graphs of %s for batches of %s faces", ", ".join(captured),
                 ", ".join(map(str, buckets)))

    def _use_detector_pass(self) -> None:
        """The detector's 256x256 images through `_fixed["detect"]` when it is compiled."""
        forward = self._fixed.get("detect")
        self.detector.compiled = {(GRAPHED_DETECTION_SIZE, GRAPHED_DETECTION_SIZE): forward} \
            if isinstance(forward, CompiledForward) else {}

    def _compile(self) -> None:
        """Compile GFPGAN's, ParseNet's and (with compile_detector) RetinaFace's passes
        (CompiledForward) now, not on a request. One that fails to compile, or whose check
        finds other faces, is logged and runs eagerly: a slower service, not one that does not
        start."""
        crop = torch.full((2, 3, FACE_SIZE, FACE_SIZE), 128.0, device=self.device)
        frame = torch.full((2, 3, GRAPHED_DETECTION_SIZE, GRAPHED_DETECTION_SIZE), 20.0, device=self.device)
        names = ["gfpgan"] + (["parse"] if self.speed.paste_mask == "parse" else []) + \
            (["detect"] if "detect" in self._fixed else [])
        for name in names:
            forward = self._fixed[name]
            if not isinstance(forward, CompiledForward) or forward.warmed:
                continue
            started = time.monotonic()
            try:
                forward.warm(frame if name == "detect" else crop)
            except Exception as error:  # noqa: BLE001 - that network stays eager
                log.warning("torch.compile of %s failed, it runs eagerly: %s", name, _first_line(error))
                self.fallbacks.append(f"compile of {name}: {_first_line(error)}")
                self._fixed[name] = forward.fn
                continue
            try:
                problem = self._check_compiled_detector(forward) if name == "detect" else \
                    self._check_compiled(forward)
            except Exception as error:  # noqa: BLE001 - unchecked is not kept: it runs eagerly
                problem = self.compile_checks[name] = \
                    f"its check against the eager pass failed: {_first_line(error)}"
            if problem:
                log.warning("compiled %s gives other faces than its eager pass, it runs eagerly: %s",
                            name, problem)
                self.fallbacks.append(f"compile of {name}: {problem}")
                self._fixed[name] = forward.fn
                continue
            log.info("compiled %s in %.1f s; against the eager passes: %s", name,
                     time.monotonic() - started, self.compile_checks[name])
        self._use_detector_pass()

    def _check_compiled_detector(self, forward: CompiledForward) -> str | None:
        """What is wrong with the compiled detector's output, or None: its anchors against the
        eager pass's on two 256x256 images that vary at every scale (check_crops, halved), every
        anchor's box and landmarks in pixels and its face score, within DETECTOR_CHECK. What it
        measured goes into compile_checks either way."""
        x = network_input(check_crops(2, self.device)[:, :, ::2, ::2])
        height, width = x.shape[-2:]
        anchors = priors(height, width, self.device)
        compiled, eager = forward(x).float(), forward.fn(x).float()
        (boxes, points), (want_boxes, want_points) = (decode(compiled, anchors, height, width),
                                                      decode(eager, anchors, height, width))
        d = torch.cat([(boxes - want_boxes).flatten(), (points - want_points).flatten()]).abs()
        mean, high = float(d.mean()), float(torch.quantile(d, 0.999))
        score = float((compiled[..., 5] - eager[..., 5]).abs().max())
        most_mean, most_high, most_score = DETECTOR_CHECK
        measured = self.compile_checks[forward.name] = (
            f"anchors {mean:.4f} px from the eager pass's on average and {high:.3f} at the 99.9th "
            f"percentile, scores {score:.5f} at most (allowed: {most_mean}, {most_high} and {most_score})")
        if not all(np.isfinite((mean, high, score))) or mean > most_mean or high > most_high or score > most_score:
            return measured
        return None

    def _check_compiled(self, forward: CompiledForward) -> str | None:
        """What is wrong with a compiled pass's output, or None: compiled and eager (in the
        service's dtype) against eager float32, on two crops that vary at every scale. What it
        measured goes into compile_checks either way.

        The compiled pass is fine when it is no further from float32 than twice the eager pass
        is, plus COMPILE_CHECK_SLACK, in mean and in 99.9th percentile. Relative to the eager
        pass's own error, so that the check holds for any weights and dtype. Runs the network
        three times on two crops, at warm-up only."""
        sample = check_crops(2, self.device)
        compiled = forward(sample).float()
        eager = forward.fn(sample).float()
        self._float32_reference = True
        try:
            reference = forward.fn(sample).float()
        finally:
            self._float32_reference = False
        scale = 255.0 if forward.name == "parse" else 1.0  # masks are 0..1
        worst = []
        for output in (compiled, eager):
            d = (output - reference).abs().flatten() * scale
            worst.append((float(d.mean()), float(torch.quantile(d, 0.999)) if d.numel() else 0.0))
        (mean, high), (eager_mean, eager_high) = worst
        allowed = (2 * eager_mean + COMPILE_CHECK_SLACK[0], 2 * eager_high + COMPILE_CHECK_SLACK[1])
        measured = self.compile_checks[forward.name] = (
            f"{mean:.2f} levels from float32 on average and {high:.1f} at the 99.9th percentile, "
            f"where the eager pass is {eager_mean:.2f} and {eager_high:.1f} (allowed: "
            f"{allowed[0]:.2f} and {allowed[1]:.1f})")
        if not (np.isfinite(mean) and np.isfinite(high)) or mean > allowed[0] or high > allowed[1]:
            return measured
        return None

    @property
    def graphed(self) -> list[str]:
        """The networks whose passes run as CUDA graph replays (captured by warmup())."""
        return sorted(self._graphs)

    @torch.no_grad()
    def batch_memory(self) -> BatchMemory:
        """What a batch takes on the device beyond what is resident, measured now
        (server.memory: `--max-batch-faces auto`): each network pass whose memory grows with
        the faces, run eagerly at two sizes (no graphs, nothing compiled: call it before
        warmup()). The restorer and ParseNet on 512x512 crops, RetinaFace on 256x256 images (and
        the wait-free detection's centre face after it, when on), Real-ESRGAN when loaded on 256x256 frames to its own scale. With CUDA graphs, also the
        static input and output each graph keeps per face of its bucket (_capture_graphs)."""
        crops = {n: check_crops(n, self.device) for n in MEASURED_SIZES}
        frames = {n: c[:, :, ::2, ::2].contiguous() for n, c in crops.items()}
        fixed = {name: getattr(fn, "fn", fn) for name, fn in self._fixed.items()}  # eager, not compiled
        if getattr(self.gfpgan, "takes_fidelity_weight", False):
            passes = {"restorer": lambda n: self._restore_weighted(
                crops[n], torch.full((n,), 0.5, device=self.device), [0.5])}
        else:
            passes = {"restorer": lambda n: fixed["gfpgan"](crops[n])}
        if self.speed.paste_mask == "parse":
            passes["parse"] = lambda n: fixed["parse"](crops[n])
        # RetinaFace, with the centre face's choice when it is part of the detect graph
        detect = functools.partial(self.detector.raw_centre, eager=True) if self.speed.fixed_detection \
            else self.detector.net_pass
        passes["detect"] = lambda n: detect(frames[n] - 110.0)
        if self.upsampler is not None:
            passes["background"] = lambda n: self.upsampler(frames[n], frames[n].shape[-1] * self.upsampler.scale)
        out_bytes: dict[str, int] = {}  # a face's row of each pass's output

        def noting(name, run):
            def noted(n):
                out = run(n)
                out_bytes[name] = _face_bytes(out)
                return out
            return noted
        passes = {name: noting(name, run) for name, run in passes.items()}
        need = enhance_within_memory(lambda: measure_passes(passes, peak_meter(self.device)), (), self.device,
                                     f"measuring a batch of {max(MEASURED_SIZES)} faces")
        if not self.speed.cuda_graphs:
            return need
        # the graphs' static inputs (float32) and outputs, per face of every bucket
        graphed = {"restorer": crops, "detect": frames} | ({"parse": crops} if "parse" in passes else {})
        return dataclasses.replace(need, graph_face=float(sum(
            _face_bytes(inputs[MEASURED_SIZES[0]]) + out_bytes[name] for name, inputs in graphed.items())))

    def compiled_eager_calls(self) -> int:
        """Calls of the compiled passes that ran eagerly instead (CompiledForward.eager_calls;
        not the detector's images of other sizes than 256x256, which it never compiles for)."""
        return sum(f.eager_calls for f in self._fixed.values() if isinstance(f, CompiledForward))

    # -- the door ---------------------------------------------------------------------------

    @torch.no_grad()
    def enhance(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Run every job's faces through the pipeline in as few device passes as possible.
        Raises DeviceOutOfMemory, with nothing changed, when the batch does not fit."""
        def run() -> list[JobResult]:
            batch = self.profiler.batch() if self.profiler is not None else contextlib.nullcontext()
            with batch:
                return self._launch(jobs).result()
        return enhance_within_memory(run, jobs, self.device)

    def start(self, jobs: Sequence[Job]) -> "_Launched":
        """enhance() up to its one wait: every pass and the downloads queued on the device, the
        results read by the handle's result() (from any thread; the next start() may come
        first). Raises DeviceOutOfMemory, with nothing changed, when the batch does not fit."""
        return enhance_within_memory(lambda: self._launch(jobs), jobs, self.device)

    def _detect_again(self, jobs: Sequence[Job]) -> list[JobResult]:
        """`jobs`, DETECT images whose wait-free detection was not settled (more candidates
        than FIXED_CANDIDATES, or a suppression its rounds did not finish), run again with the
        waiting detection. Called from result(), perhaps on another thread than the device
        thread, which may be queueing the next batch meanwhile (_launch takes turns). Raises
        RuntimeError, never DeviceOutOfMemory, as a result() may."""
        images = sum(job.faces.shape[0] for job in jobs)
        self.redetected_images += images
        log.info("%d image(s) detected again, exactly: their wait-free detection was not settled", images)
        try:
            return enhance_within_memory(lambda: self._launch(jobs, exact=True).result(), jobs, self.device,
                                         what="detecting again")
        except DeviceOutOfMemory as error:
            raise RuntimeError(f"out of device memory while detecting {images} image(s) again: {error}") from error

    def _stage(self, name: str):
        return self.profiler.stage(name) if self.profiler is not None else contextlib.nullcontext()

    def _launch(self, jobs: Sequence[Job], exact: bool = False) -> "_Launched":
        # One batch queued at a time: the device thread queues the next batch while the results
        # thread may run one again (_Launched.result: an unsettled wait-free detection).
        with self._queueing:
            self._staging.next_batch()
            try:
                return self._queue_batch(jobs, exact)
            finally:  # (also when it failed part-way: what it queued still reads the buffers)
                self._staging.batch_queued()

    def _queue_batch(self, jobs: Sequence[Job], exact: bool = False) -> "_Launched":
        groups = defaultdict(list)  # input size -> job indices: one tensor per size
        for index, job in enumerate(jobs):
            groups[job.faces.shape[1]].append(index)
        plans = [self._prepare(jobs, indices, f"g{number}", exact) for number, indices in enumerate(groups.values())]
        options = [o for plan in plans for o in plan.options]
        crops = _joined([c for plan in plans for c in (plan.warped, plan.aligned_inputs)])
        with self._stage("gfpgan"):
            if getattr(self.gfpgan, "takes_fidelity_weight", False):
                restored = self._restore_weighted(crops, _joined([plan.weights for plan in plans]),
                                                  sorted({_network_weight(o) for o in options}))
            else:
                restored = self._restore(crops, _joined([plan.noise for plan in plans]),
                                         any(o.random_noise for o in options),
                                         all(o.random_noise for o in options))
        pending = []  # (plan, {size: device uint8 NHWC}, device status)
        offset = 0
        for plan in plans:
            pending.append(self._finish(plan, restored[offset:offset + plan.num_crops]))
            offset += plan.num_crops
        with self._stage("download"):
            copies = _download_start([(status, outputs) for _, outputs, status in pending], self.device)
        return _Launched(self, jobs, plans, *copies)

    def warmup(self, faces: int = 1, size: int = 256) -> None:
        """Capture the CUDA graphs (when on), then one DETECT and one ALIGNED pass, so kernels
        and caches exist before real traffic."""
        if self.speed.compile or self.speed.compile_detector:
            self._compile()
        if self.speed.cuda_graphs and self.device.type == "cuda" and not self._graphs:
            self._capture_graphs()
        image = np.full((faces, size, size, 3), 128, dtype=np.uint8)
        self.enhance([Job(image, EnhanceOptions()),
                      Job(image, EnhanceOptions(alignment=Alignment.ALIGNED))])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- stages -----------------------------------------------------------------------------

    def _prepare(self, jobs: Sequence[Job], indices: list[int], key: str, exact: bool = False) -> _Group:
        """Upload one size group, find its faces and warp them to the 512 template (`exact`:
        detection never wait-free, for images whose wait-free detection was not settled)."""
        options = [jobs[i].options for i in indices for _ in range(jobs[i].faces.shape[0])]
        n = len(options)
        with self._stage("upload"):
            images = self._staging.upload_joined(key + "images", [jobs[i].faces for i in indices])
            images = images.permute(0, 3, 1, 2).float()
            # Per image: aligned, detect, centre only, random noise, fidelity, the network's own
            # fidelity weight (one upload).
            flags = np.array([[o.alignment is Alignment.ALIGNED, o.alignment is Alignment.DETECT,
                               o.only_center_face, o.random_noise, o.fidelity, _network_weight(o)]
                              for o in options], dtype=np.float32).reshape(n, 6)
            # (first image, landmarks): the caller's, and steady video's held alignment for the
            # frames whose detection is skipped (placeholders until _steady sets them)
            given = [(start, jobs[i].landmarks) for start, i in zip(_starts(jobs, indices), indices)
                     if jobs[i].options.alignment is Alignment.LANDMARKS]
            held = _skipped_detections(jobs, indices)
            given += [(frame, video.points[None]) for frame, video in held.items()]
            given_images = np.concatenate([np.arange(s, s + len(p)) for s, p in given]) if given \
                else np.zeros(0, np.int64)
            given_points = np.concatenate([np.asarray(p, np.float32) for _, p in given]) if given \
                else np.zeros((0, 5, 2), np.float32)
            aligned_host = [i for i, o in enumerate(options) if o.alignment is Alignment.ALIGNED]
            detect_host = [i for i, o in enumerate(options)
                           if o.alignment is Alignment.DETECT and i not in held]
            index_host = np.array(aligned_host + detect_host + given_images.tolist(), dtype=np.int64)
            meta = self._staging.upload(key + "flags", flags)
            index = self._staging.upload(key + "index", index_host)
            points = self._staging.upload(key + "points", given_points.reshape(-1, 5, 2))
        na, nd = len(aligned_host), len(detect_host)
        aligned_index, detect_index, given_index = index[:na], index[na:na + nd], index[na + nd:]
        fidelity = meta[:, 4]

        video = any(jobs[i].video is not None for i in indices)
        faces = self._locate(images, detect_index, given_index, points, meta[:, 2],
                             all_centre=all(options[i].only_center_face for i in detect_host),
                             fixed=self.speed.fixed_selection,
                             wait_free=self.speed.fixed_detection and not exact)
        mask_made, mask_reused = {}, {}
        if video:  # (its one wait also settles every image's detection: faces.settled is None after)
            faces, mask_made, mask_reused = self._steady(jobs, indices, faces, set(held), images, key)
        settled = None  # per image: its wait-free detection vouched for its face (or did not run)
        if faces.settled is not None and nd == n:  # every image detected: a row each, in order
            settled = faces.settled
        elif faces.settled is not None:
            settled = torch.ones(n, dtype=torch.bool, device=self.device).index_put_((faces.image,), faces.settled)
        if faces.image.shape[0]:
            with self._stage("align"):
                affines, aligns = _usable_alignments(
                    imageops.robust_similarity_transform(faces.landmarks, self._template), size=images.shape[-1])
                if faces.present is not None:  # an image without a face: its placeholder row is not pasted
                    aligns = aligns & faces.present
            with self._stage("warp"):
                warped = imageops.warp_affine(images[faces.image], affines, FACE_SIZE, self._border)
                # facexlib and cv2 hand GFPGAN uint8 crops: round like they do.
                warped = warped.round().clamp(0, 255)
        else:  # no face to align (an ALIGNED batch): no stage runs on empty tensors
            affines = torch.empty((0, 2, 3), dtype=torch.float64, device=self.device)
            aligns = torch.empty(0, dtype=torch.bool, device=self.device)
            warped = torch.empty((0, 3, FACE_SIZE, FACE_SIZE), dtype=images.dtype, device=self.device)
        with self._stage("warp"):
            resized = imageops.resize(images[aligned_index], FACE_SIZE, "linear").round().clamp(0, 255) \
                if na else warped[:0]  # (no work on empty tensors: the host knows there are none)
        # per crop (faces, then aligned images): its image's flags, in one gather
        crop_meta = meta[_joined([faces.image, aligned_index])]
        return _Group(key=key, indices=indices, images=images, options=options, faces=faces,
                      affines=affines, aligns=aligns,
                      aligned_index=aligned_index, aligned_host=aligned_host, warped=warped,
                      aligned_inputs=resized, fidelity=fidelity,
                      noise=crop_meta[:, 3] > 0.5, weights=crop_meta[:, 5],
                      mask_made=mask_made, mask_reused=mask_reused, settled=settled)

    def _locate(self, images, detect_index, given_index, given_points, centre_flags, all_centre,
                fixed: bool = True, wait_free: bool = False) -> Faces:
        """5-point landmarks of every face to restore: detected, or given by the caller.

        When every detected image wants only its centre face (GFPGANer's only_center_face, the
        default) and `fixed`, each gets exactly one row, a placeholder (`present` False) where it
        has no face: the shapes are then known on the host and the selection does not wait for
        the device. A faceless image costs a restoration that is thrown away, in exchange for one
        host wait fewer per batch. Otherwise the faces are selected, which waits once. With
        `wait_free` too the detection itself does not wait (FaceDetector.centre_rows; a row it
        cannot vouch for has `settled` False); otherwise it waits twice, for the threshold and
        for the NMS."""
        size = images.shape[-1]
        parts = []
        if detect_index.numel() and all_centre and fixed and wait_free:
            with self._stage("detect"):
                # a row per detected image, in their order
                parts.append(self.detector.centre_rows(images[detect_index], image=detect_index))
        elif detect_index.numel():
            with self._stage("detect"):
                found, usable = self.detector.candidates(images[detect_index])
                if all_centre and fixed:
                    found, present = centre_choice(found, size, size, detect_index.numel(), usable)
                    found.present = present
                    found.image = detect_index  # a row per detected image, in their order
                else:
                    keep = centre_mask(found, size, size, centre_flags[detect_index] > 0.5, among=usable)
                    if not all_centre:  # at most MAX_FACES_PER_IMAGE faces of one image
                        keep = keep & (_rank_within_image(found.image, detect_index.numel(), keep)
                                       < MAX_FACES_PER_IMAGE)
                    found = found.take(keep)  # the one selection: every filter folded into `keep`
                    found.image = detect_index[found.image]
                parts.append(found)
        if given_index.numel():
            zeros = torch.zeros(given_index.shape[0], device=self.device)
            parts.append(Faces(given_index, torch.zeros(given_index.shape[0], 4, device=self.device),
                               zeros, given_points))
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return Faces(empty, torch.zeros(0, 4, device=self.device), torch.zeros(0, device=self.device),
                         torch.zeros(0, 5, 2, device=self.device))
        if len(parts) == 1 and all_centre and fixed and detect_index.numel():
            return parts[0]  # already image by image (detect_index is in the images' order)
        def joined(flags: list[torch.Tensor | None]) -> torch.Tensor | None:  # None: all True
            if all(f is None for f in flags):
                return None
            return torch.cat([torch.ones(p.image.shape[0], dtype=torch.bool, device=self.device) if f is None
                              else f for p, f in zip(parts, flags)])
        merged = Faces(*(torch.cat(t) for t in zip(*((p.image, p.boxes, p.scores, p.landmarks) for p in parts))),
                       present=joined([p.present for p in parts]), settled=joined([p.settled for p in parts]))
        # paste order: image by image, each image's faces in detection (score) order
        return merged.take(torch.sort(merged.image, stable=True).indices)

    def _steady(self, jobs: Sequence[Job], indices: list[int], faces: Faces,
                held: set[int], images: torch.Tensor, key: str) -> tuple[Faces, dict[int, "_Mask"], dict[int, "_Mask"]]:
        """steady_video jobs: each frame's landmarks through its stream's filter, in frame order
        (server/steady.py); the frames in `held` (detection skipped) take the filter's current
        alignment, or lose their face when a frame detected before them lost it. The points
        make one trip to the host and back: the one wait for the device this mode adds; batches
        without it are untouched.

        With fixed-size rows (`present`, _locate's fixed selection) a frame whose row is a
        placeholder has no face, and the row is dropped: the host knows it here, so the batch
        restores and pastes the rows the waiting detection gives, and a faceless image costs
        nothing. With wait-free detection, the rows it could not vouch for
        (`settled` False) are detected again here, exactly, before any filter sees them (the
        host waits for that once more, only then): a steady batch is never run again for its
        detection, which would filter its frames twice. Every image of the group is settled on
        return (faces.settled None).

        With mask_every > 1 (and ParseNet's mask), also which face rows compute the paste mask
        their stream's next frames reuse, and which paste with an earlier frame's: the two dicts
        of _Group.mask_made and mask_reused. `key`: the group's, for its uploads."""
        made: dict[int, _Mask] = {}
        reused_masks: dict[int, _Mask] = {}
        with self._stage("steady"):
            count = faces.image.shape[0]
            flags = [f for f in (faces.present, faces.settled) if f is not None]
            # image, landmarks, present, settled: one download, the one wait
            self._note_read("steady")
            host = torch.cat([faces.image.reshape(-1, 1).float(), faces.landmarks.float().reshape(-1, 10)]
                             + [f.reshape(-1, 1).float() for f in flags], dim=1).cpu().numpy()
            image, points = host[:, 0].astype(np.int64), host[:, 1:11].reshape(-1, 5, 2).copy()
            present = host[:, 11] > 0.5 if faces.present is not None else np.ones(count, dtype=bool)
            settled = host[:, -1] > 0.5 if faces.settled is not None else np.ones(count, dtype=bool)
            if not settled.all():
                points[~settled], present[~settled] = self._detect_rows(images, image[~settled])
            faces.settled = None
            keep = np.ones(len(image), dtype=bool)
            for start, i in zip(_starts(jobs, indices), indices):
                job = jobs[i]
                if job.video is None or job.options.alignment is Alignment.ALIGNED:
                    continue
                video, every = job.video, job.options.mask_every if self.speed.paste_mask == "parse" else 1
                for frame in range(start, start + job.faces.shape[0]):
                    rows = np.flatnonzero(image == frame)
                    if frame in held:  # one placeholder row
                        reused = video.hold()
                        if reused is None:
                            keep[rows] = False
                            continue
                        points[rows[0]] = reused
                    elif len(rows) == 1 and job.options.only_center_face and present[rows[0]]:
                        points[rows[0]] = video.smooth(points[rows[0]])
                    else:  # no face (or a placeholder row), or several: left as they are
                        video.skip()
                        continue
                    if every <= 1:
                        continue
                    if video.reuses_mask(every):
                        reused_masks[int(rows[0])] = video.mask[1]
                    else:
                        video.mask = (video.frame - 1, _Mask(video))
                        made[int(rows[0])] = video.mask[1]
            # back through the pinned buffers: uploads that do not wait either
            faces.landmarks = self._staging.upload(key + "steady-points", points.astype(np.float32))
            # a placeholder row (an image without a face) goes here, known on the host: no
            # restoration and no mask for it, the rows the waiting detection gives
            keep &= present
            faces.present = None
            if not keep.all():  # (an index made on the host: taking it does not wait)
                faces = faces.take(self._staging.upload(key + "steady-keep", np.flatnonzero(keep)))
                new_row = np.cumsum(keep) - 1
                made = {int(new_row[r]): m for r, m in made.items()}
                reused_masks = {int(new_row[r]): m for r, m in reused_masks.items()}
        return faces, made, reused_masks

    def _note_read(self, what: str) -> None:
        """A read of device results on the host, for the profiler where it cannot see it (on
        the CPU a copy to the host is no copy; on CUDA it counts the blocking copy itself)."""
        if self.profiler is not None and self.device.type == "cpu":
            self.profiler.note_sync(what)

    def _detect_rows(self, images: torch.Tensor, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The centre face of each of images[image] as the waiting detection finds it
        (candidates, centre_choice), on the host: landmarks (k, 5, 2) and found (k,). For the
        images of a steady batch whose wait-free detection was not settled; counted in
        redetected_images."""
        self.redetected_images += len(image)
        log.info("%d steady-video image(s) detected again, exactly: their wait-free detection was not settled",
                 len(image))
        size = images.shape[-1]
        found, usable = self.detector.candidates(images[torch.from_numpy(image).to(self.device)])
        rows, present = centre_choice(found, size, size, len(image), usable)
        self._note_read("steady")
        host = torch.cat([rows.landmarks.float().reshape(-1, 10), present.reshape(-1, 1).float()], dim=1).cpu().numpy()
        return host[:, :10].reshape(-1, 5, 2), host[:, 10] > 0.5

    @contextlib.contextmanager
    def _autocast(self):
        """Around every network pass: the compute dtype, and the resampling forms."""
        with self.speed.resampling():
            if self.dtype == torch.float32 or self._float32_reference:
                yield
                return
            # No weight cache: each weight is used once per pass, and a cache breaks graph capture.
            with torch.autocast(device_type=self.device.type, dtype=self.dtype, cache_enabled=False):
                yield

    def _network_input(self, crops: torch.Tensor, gfpgan: bool = True) -> torch.Tensor:
        x = _to_network(crops)
        # Explicitly one layout: a channels-last input (GFPGAN's output, a permuted upload) would
        # otherwise pull an NCHW network's first convolution into NHWC.
        nhwc = self.speed.channels_last if gfpgan else self.speed.parse_channels_last
        return x.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)

    def _gfpgan_fixed_noise(self, crops: torch.Tensor) -> torch.Tensor:
        """0..255 BGR template crops -> restored 0..255 BGR, with the stored noise."""
        with self._autocast():
            output = self.gfpgan(self._network_input(crops), return_rgb=False, randomize_noise=False)[0]
        return _from_network(output)

    def _restore_weighted(self, crops: torch.Tensor, weights: torch.Tensor, values: list[float]) -> torch.Tensor:
        """A restorer with a fidelity weight of its own (CodeFormer): one pass per weight the
        batch asks for (known on the host), each crop taking the pass of its own weight."""
        if crops.shape[0] == 0:
            return crops
        output = None
        for value in values:
            def run(x, value=value):
                with self._autocast():
                    return _from_network(self.gfpgan(self._network_input(x), w=value)[0])
            out = _in_passes(run, crops)
            if output is None:
                output = out
            else:
                output = torch.where((weights == value).view(-1, 1, 1, 1), out, output)
        return output

    def _restore(self, crops: torch.Tensor, random_noise: torch.Tensor, any_random: bool,
                 all_random: bool) -> torch.Tensor:
        """GFPGAN over all crops in one pass, whatever mix of noise modes they ask for."""
        if crops.shape[0] == 0:
            return crops
        if not any_random:
            return _in_passes(self._graphs.get("gfpgan", self._fixed["gfpgan"]), crops)
        if all_random:
            return _in_passes(self._gfpgan_fresh_noise, crops)
        if not hasattr(self.gfpgan, "stylegan_decoder"):  # a stand-in network: two passes
            output = torch.empty_like(crops)
            for fresh in (False, True):
                with self._autocast():
                    out = self.gfpgan(self._network_input(crops), return_rgb=False, randomize_noise=fresh)[0]
                output = torch.where(random_noise.view(-1, 1, 1, 1) == fresh, _from_network(out), output)
            return output
        outputs = []
        for start in range(0, crops.shape[0], MAX_NETWORK_FACES):
            part = slice(start, start + MAX_NETWORK_FACES)
            with self._noise_plan.mixed(random_noise[part]), self._autocast():
                output = self.gfpgan(self._network_input(crops[part]), return_rgb=False,
                                     randomize_noise=False)[0]
            outputs.append(_from_network(output))
        return torch.cat(outputs)

    def _gfpgan_fresh_noise(self, crops: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            output = self.gfpgan(self._network_input(crops), return_rgb=False, randomize_noise=True)[0]
        return _from_network(output)

    def _parse_masks(self, restored: torch.Tensor) -> torch.Tensor:
        """Soft face masks in [0, 1] from ParseNet, feathered like facexlib's paste-back."""
        with self._autocast():
            logits = parse_logits(self.parser, self._network_input(restored, gfpgan=False))
        masks = self._face_mask_lut[logits.float().argmax(dim=1)].unsqueeze(1) * 255.0
        masks = imageops.apply_matrices(masks, *self._mask_blur)
        masks[..., :_MASK_FRAME, :] = 0.0
        masks[..., -_MASK_FRAME:, :] = 0.0
        masks[..., :, :_MASK_FRAME] = 0.0
        masks[..., :, -_MASK_FRAME:] = 0.0
        return masks / 255.0

    def _face_masks(self, restored: torch.Tensor) -> torch.Tensor:
        """The paste mask of each restored face, in template space: ParseNet's or the box."""
        if self.speed.paste_mask == "box":
            return self._box_mask.expand(restored.shape[0], -1, -1, -1)
        return _in_passes(self._graphs.get("parse", self._fixed["parse"]), restored)

    def _planned_masks(self, plan: _Group) -> torch.Tensor:
        """The paste masks of a group's faces: each its own, except with steady video's
        mask_every > 1, where the rows in plan.mask_reused take the mask they name, an earlier
        frame's, and the masks of the rows in plan.mask_made are kept for their stream's next
        frames. Which row takes which is decided on the host: nothing here waits for the device."""
        faces = plan.pasted_faces
        made_by = {id(mask): row for row, mask in plan.mask_made.items()}
        # A mask that was to come from a batch that failed since is not there: that row computes its own.
        reused = plan.mask_reused = {row: mask for row, mask in plan.mask_reused.items()
                                     if id(mask) in made_by or mask.tensor is not None}
        if not reused:
            masks = own_masks = self._face_masks(faces)
            position = {row: row for row in plan.mask_made}
        else:
            own = [row for row in range(faces.shape[0]) if row not in reused]
            position = {row: k for k, row in enumerate(own)}
            stored = list({id(m): m for m in reused.values() if id(m) not in made_by}.values())
            stored_at = {id(m): len(own) + k for k, m in enumerate(stored)}
            source = []  # per row: where its mask is in cat([own_masks, *stored])
            for row in range(faces.shape[0]):
                mask = reused.get(row)
                if mask is None:
                    source.append(position[row])  # its own
                elif id(mask) in made_by:
                    source.append(position[made_by[id(mask)]])  # an earlier frame's in this batch
                else:
                    source.append(stored_at[id(mask)])  # kept from an earlier batch
            index = self._staging.upload(plan.key + "masks", np.array(own + source, np.int64))
            if own:
                own_masks = self._face_masks(faces.index_select(0, index[:len(own)]))
            else:
                own_masks = stored[0].tensor.new_zeros((0, *stored[0].tensor.shape[1:]))
            masks = torch.cat([own_masks] + [m.tensor for m in stored]).index_select(0, index[len(own):])
        for row, mask in plan.mask_made.items():
            mask.tensor = own_masks[position[row]:position[row] + 1].clone()
        return masks

    def _finish(self, plan: _Group, restored: torch.Tensor):
        """Paste restored faces back, blend with the original and resize, on the device."""
        faces = plan.faces
        num_faces = faces.image.shape[0]
        plan.pasted_faces, plan.aligned_faces = restored[:num_faces], restored[num_faces:]
        if num_faces:
            with self._stage("parse"):
                plan.masks = self._planned_masks(plan)
        # ENHANCED: an image with at least one face aligned and pasted (or given as aligned).
        if num_faces:
            pasted = torch.zeros(plan.n, device=self.device).index_add_(0, faces.image, plan.aligns.float())
            status = torch.where(pasted > 0, int(FaceStatus.ENHANCED), int(FaceStatus.NO_FACE)).to(torch.uint8)
        else:
            status = torch.full((plan.n,), int(FaceStatus.NO_FACE), dtype=torch.uint8, device=self.device)
        if plan.aligned_host:
            status[plan.aligned_index] = int(FaceStatus.ENHANCED)
        if plan.settled is not None:  # never reported: _Launched.result() runs these again
            status = torch.where(plan.settled, status, REDETECT)
        outputs = {size: _to_uint8_nhwc(self._compose(plan, size))
                   for size in sorted({o.output_size for o in plan.options})}
        return plan, outputs, status

    def _compose(self, plan: _Group, out_size: int) -> torch.Tensor:
        """Output canvases, at out_size, of the group's images that asked for that size.

        Which images go to which canvas row is known on the host; faces are pasted with masks
        rather than selections, so nothing here waits for the device.
        """
        images, faces = plan.images, plan.faces
        chosen_host = [i for i, o in enumerate(plan.options) if o.output_size == out_size]
        row_host = np.full(plan.n, -1, np.int64)
        row_host[chosen_host] = np.arange(len(chosen_host))
        rows_index = self._staging.upload(f"{plan.key}rows{out_size}", np.concatenate([chosen_host, row_host]))
        chosen, row_of = rows_index[:len(chosen_host)], rows_index[len(chosen_host):]
        scale = out_size / images.shape[-1]

        with self._stage("blend"):
            background = imageops.resize_for_output(images[chosen], out_size)
        upsample = [k for k, i in enumerate(chosen_host) if plan.options[i].background is Background.REALESRGAN]
        if upsample:
            if self.upsampler is None:
                raise ValueError("background realesrgan asked of a pipeline with no upsampler loaded")
            with self._stage("background"):
                rows = self._staging.upload(f"{plan.key}bg{out_size}", np.array(upsample, np.int64))
                background = background.index_copy(0, rows, self.upsampler(images[chosen][rows], out_size))
        canvas = background
        if faces.image.numel():
            with self._stage("paste"):
                # template -> output canvas: undo the alignment, then map input pixels to output
                # pixels centre to centre (q = s * p + (s - 1) / 2; facexlib adds s / 2, which
                # shifts the face half an output pixel right and down when upscaling).
                # The warp needs canvas -> template: p = (q - (s - 1) / 2) / s, then the alignment.
                linear = plan.affines[:, :, :2].double() / scale
                offset = plan.affines[:, :, 2].double() - linear.sum(-1) * ((scale - 1.0) / 2.0)
                from_canvas = torch.cat([linear, offset.unsqueeze(-1)], dim=2)
                # the face and its mask in one warp (one grid, one sampling pass)
                both = imageops.warp_affine_inverse(
                    torch.cat([plan.pasted_faces, plan.masks.to(plan.pasted_faces.dtype)], 1),
                    from_canvas, out_size, 0.0)
                face_px, face_alpha = both[:, :3].round(), both[:, 3:]
                target = row_of[faces.image]  # -1: this face's image wants another size
                face_alpha = face_alpha * ((target >= 0) & plan.aligns).view(-1, 1, 1, 1)
                target = target.clamp_min(0)
                all_centre = all(o.only_center_face or o.alignment is not Alignment.DETECT
                                 for o in plan.options)
                rank = None if all_centre else _rank_within_image(faces.image, plan.n)
                # One face per image and pass: several faces of one image paste in turn.
                for r in range(1 if all_centre else MAX_FACES_PER_IMAGE):
                    alpha = face_alpha if all_centre else face_alpha * (rank == r).view(-1, 1, 1, 1)
                    cover = torch.zeros_like(canvas[:, :1]).index_add_(0, target, alpha)
                    paint = torch.zeros_like(canvas).index_add_(0, target, alpha * face_px)
                    canvas = paint + (1 - cover) * canvas
        with self._stage("blend"):
            f = plan.fidelity[chosen].view(-1, 1, 1, 1)
            canvas = (1 - f) * canvas + f * background
            aligned_rows = [row_host[i] for i in plan.aligned_host if row_host[i] >= 0]
            if aligned_rows:
                pick = [k for k, i in enumerate(plan.aligned_host) if row_host[i] >= 0]
                sel = self._staging.upload(f"{plan.key}aligned{out_size}", np.array(pick + aligned_rows))
                sel, rows = sel[:len(pick)], sel[len(pick):]
                f = plan.fidelity[plan.aligned_index[sel]].view(-1, 1, 1, 1)
                blended = (1 - f) * plan.aligned_faces[sel] + f * plan.aligned_inputs[sel]
                canvas = canvas.index_copy(0, rows, imageops.resize_for_output(blended, out_size))
        return canvas


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors), without the copy when all but one are empty (a DETECT-only batch has
    no ALIGNED crops, a batch of one size group one piece)."""
    pieces = [t for t in tensors if t.shape[0]]
    return pieces[0] if len(pieces) == 1 else torch.cat(tensors)


def _first_line(error: Exception) -> str:
    """The error's type and the first line of its message (200 characters at most), for
    pipeline.fallbacks."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


#: What a RuntimeError says when an allocation failed outside torch's own OutOfMemoryError: the
#: CPU's allocator (Windows commits memory up front, so a batch too large fails here rather
#: than in the kernel's OOM killer), cuDNN's and cuBLAS's workspaces, and CUDA's runtime.
_OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED",
                           "out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the device (or the host) running out of memory for a batch."""
    if isinstance(error, (DeviceOutOfMemory, torch.OutOfMemoryError, MemoryError)):  # MemoryError: numpy's
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and any(text.lower() in message.lower()
                                                   for text in _OUT_OF_MEMORY_MESSAGES)


def enhance_within_memory(run: Callable[[], _T], jobs: Sequence[Job], device: torch.device,
                          what: str | None = None) -> _T:
    """run(), the pipeline's pass over `jobs` (or its start); when the device runs out of memory in it, nothing
    is left changed and DeviceOutOfMemory says so: the steady-video filters the pass moved go
    back to where they were, the failed pass's tensors are released (its frames go with the
    error, which is not kept) and so is the allocator's cache, so that the batcher can run the
    same faces again in smaller batches and other programs on the GPU get the memory back.
    `what` names the work in the error ("a batch of N faces" unless given)."""
    videos = {id(job.video): (job.video, job.video.snapshot()) for job in jobs
              if isinstance(job.video, VideoState)}
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - only memory is handled, the rest goes on up
        if not is_out_of_memory(error):
            raise
        detail = error.detail if isinstance(error, DeviceOutOfMemory) else _first_line(error)
    for video, snapshot in videos.values():
        video.restore(snapshot)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    what = what or f"on a batch of {sum(job.faces.shape[0] for job in jobs)} faces"
    raise DeviceOutOfMemory(f"the device ran out of memory {what} ({detail})", detail)


def _face_bytes(batch: torch.Tensor) -> int:
    """Bytes of one face's row of a batch tensor."""
    return batch[0].numel() * batch.element_size()


def _in_passes(run, batch: torch.Tensor) -> torch.Tensor:
    """run(batch) in passes of at most MAX_NETWORK_FACES."""
    if batch.shape[0] <= MAX_NETWORK_FACES:
        return run(batch)
    return torch.cat([run(batch[start:start + MAX_NETWORK_FACES])
                      for start in range(0, batch.shape[0], MAX_NETWORK_FACES)])


#: CodeFormer's own default w, for requests that leave fidelity_weight unset.
DEFAULT_NETWORK_WEIGHT = 0.5


def _network_weight(options: EnhanceOptions) -> float:
    """The request's network fidelity weight as the device sees it (float32, so that host and
    device compare equal)."""
    value = DEFAULT_NETWORK_WEIGHT if options.fidelity_weight is None else options.fidelity_weight
    return float(np.float32(value))


def _skipped_detections(jobs: Sequence[Job], indices: list[int]) -> dict[int, object]:
    """Steady video with detect_every > 1: the images of a size group not to detect (image ->
    the stream's VideoState, whose alignment they take), planned in frame order per stream."""
    held: dict[int, object] = {}
    planned: dict[int, int] = defaultdict(int)  # frames of each stream already planned here
    for start, i in zip(_starts(jobs, indices), indices):
        job = jobs[i]
        if job.video is None or job.options.detect_every <= 1:
            continue
        count = job.faces.shape[0]
        plan = job.video.plan(count, job.options.detect_every, planned[id(job.video)])
        planned[id(job.video)] += count
        held.update((start + k, job.video) for k, detect in enumerate(plan) if not detect)
    return held


def _starts(jobs: Sequence[Job], indices: list[int]) -> list[int]:
    """Each job's first image within its size group."""
    starts, start = [], 0
    for i in indices:
        starts.append(start)
        start += jobs[i].faces.shape[0]
    return starts


def _keep_style_input_contiguous(gfpgan: torch.nn.Module) -> None:
    """GFPGAN flattens its last encoder feature map with .view(), which a channels-last tensor
    refuses: hand the flattening a contiguous tensor (a no-op in the default layout)."""
    if getattr(gfpgan, "_contiguous_hook", None) is None:
        gfpgan._contiguous_hook = gfpgan.final_conv.register_forward_hook(
            lambda _module, _inputs, output: output.contiguous())


def _rank_within_image(image: torch.Tensor, n_images: int, among: torch.Tensor | None = None) -> torch.Tensor:
    """0 for each image's first face, 1 for its second, ... (image ids sorted ascending).

    With `among`, faces are counted only where the mask is set (the others get ranks too, which
    the caller ignores). `n_images` bounds the ids, so nothing is read back from the device.
    """
    if image.numel() == 0:
        return image
    counted = torch.ones_like(image) if among is None else among.to(torch.int64)
    before = torch.cumsum(counted, 0) - counted  # counted faces before each face, batch-wide
    position = torch.arange(image.numel(), device=image.device)
    first = torch.full((n_images,), image.numel(), device=image.device).scatter_reduce(
        0, image, position, reduce="amin")
    return before - before[first[image]]


def _to_uint8_nhwc(canvas: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) float 0..255 -> (N, S, S, 3) uint8, still on the device."""
    return canvas.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _usable_alignments(affines: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(affines, usable): each fit checked (finite, scale in ALIGN_SCALE_RANGE) on the device,
    without a wait; an unusable one is replaced by the plain resize to the template, so that
    the batch's warps stay finite, and is left out of the paste and the status."""
    scale = affines[:, :, 0].norm(dim=1)  # NaN fails both comparisons
    total = affines.sum(dim=(1, 2))  # x - x is 0 for a finite x, NaN for an infinite or NaN one
    usable = ((total - total) == 0) & (scale >= ALIGN_SCALE_RANGE[0]) & (scale <= ALIGN_SCALE_RANGE[1])
    return torch.where(usable.view(-1, 1, 1), affines, _plain_resize(size, affines.dtype, affines.device)), usable


@functools.lru_cache(maxsize=16)
def _plain_resize(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2, 3): the resize of a size x size image to the template, made on the device once
    (torch.tensor from a list would be a blocking upload)."""
    return torch.eye(2, 3, dtype=dtype, device=device) * (FACE_SIZE / size)


def _download_start(parts, device: torch.device):
    """Queue the copy of every (status, {size: outputs}) to the host: (the copies, an event
    the device reaches when they are done; None on the CPU, where they are the arrays)."""
    if device.type != "cuda":
        return [(status.numpy(), {size: t.numpy() for size, t in outputs.items()})
                for status, outputs in parts], None
    copies = [(status.to("cpu", non_blocking=True),
               {size: t.to("cpu", non_blocking=True) for size, t in outputs.items()})
              for status, outputs in parts]
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    return copies, done


def _download_wait(copies, done) -> list:
    """_download_start's copies as numpy arrays, after one wait for the device (none on the CPU)."""
    if done is None:
        return copies
    done.synchronize()
    return [(status.numpy(), {size: t.numpy() for size, t in outputs.items()})
            for status, outputs in copies]


class _Launched:
    """A batch FacePipeline.start() queued on the device; result() waits for it and reads its
    faces. Safe to call from another thread than the one that queued it, while that thread
    queues the next batch: it only waits on its own event and reads its own copies."""

    def __init__(self, pipeline: FacePipeline, jobs: Sequence[Job], plans: list[_Group], copies, done):
        self._pipeline = pipeline
        self._jobs = jobs
        # Only what result() reads of each size group: its jobs, and the streams whose frames
        # paste with an earlier frame's mask. Not the groups themselves: their device tensors
        # (images, crops, masks: about 10 MB a face) would stay allocated while the next batch
        # computes.
        self._groups = [(plan.indices, [mask.video for mask in plan.mask_reused.values()]) for plan in plans]
        self._copies = copies
        self._done = done

    def result(self) -> list[JobResult]:
        pipeline, jobs = self._pipeline, self._jobs
        with pipeline._stage("download"):
            if pipeline.profiler is not None:
                pipeline.profiler.note_sync("download")
            host = _download_wait(self._copies, self._done)
        for _, videos in self._groups:  # pasted now: steady video's reused masks count
            for video in videos:
                video.masks_reused += 1
        results: list[JobResult | None] = [None] * len(jobs)
        again = []  # (job, its images to detect again)
        for (indices, _), (status, outputs) in zip(self._groups, host):
            rows = defaultdict(int)  # next unread row of each output size
            start = 0
            for i in indices:
                count, size = jobs[i].faces.shape[0], jobs[i].options.output_size
                out = outputs[size][rows[size]:rows[size] + count]
                rows[size] += count
                codes = status[start:start + count]
                results[i] = JobResult(out, [FaceStatus(int(c)) if c != REDETECT else None for c in codes])
                redo = np.flatnonzero(codes == REDETECT)
                if redo.size:
                    again.append((i, redo))
                start += count
        if again:  # only those images run again, each job's as a job of its own
            redone = pipeline._detect_again([Job(jobs[i].faces[rows], jobs[i].options) for i, rows in again])
            for (i, rows), result in zip(again, redone):
                results[i].faces[rows] = result.faces  # (downloaded arrays: writable, the job's own rows)
                for row, state in zip(rows, result.status):
                    results[i].status[row] = state
        return results  # type: ignore[return-value]


def resolve_device(name: str) -> torch.device:
    """"auto" -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 (fp16 is unsafe for GFPGAN) where the device computes it natively:
    CUDA, and CPUs with AVX512-BF16 or AMX; float32 on other CPUs, where bf16 is emulated and
    slower than float32."""
    if name == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_computes_bfloat16())
        return torch.bfloat16 if native else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX tiles) for oneDNN's bf16
    convolutions: on an AMD EPYC with AVX512-BF16 they ran GFPGAN in 0.64x and ParseNet in
    0.50x of their float32 time (BENCHMARKS.md). torch.cpu's probes are private, hence the
    care: a torch without them counts as no."""
    if not torch.backends.mkldnn.is_available():
        return False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except Exception:  # noqa: BLE001 - absent or failing probe: not known to have it
            continue
    return False


class ModelRouter:
    """Several resident restorers behind the one Pipeline door: each job goes to the pipeline of
    the model its options name ("" is the default), and every pipeline shares the one detector
    and parser. A device batch from the batcher (first come, first served across models: the
    queue is one FIFO whatever the model) is cut into one pass per model, so no network pass
    mixes models; results come back in job order."""

    def __init__(self, pipelines: dict[str, FacePipeline], info: ModelInfo):
        self.pipelines = pipelines
        self.info = info
        self.default = info.default_model

    def enhance(self, jobs: Sequence[Job]) -> list[JobResult]:
        return self.start(jobs).result()

    def start(self, jobs: Sequence[Job]) -> Started:
        """Each model's pass queued on the device (FacePipeline.start), in the order the batch
        first names the models; result() reads them all. A model's pass that runs out of memory
        leaves the passes queued before it unread, and the batch's steady video as it was."""
        return enhance_within_memory(lambda: self._launch(jobs), jobs, self.device)

    def _launch(self, jobs: Sequence[Job]) -> Started:
        by_model: dict[str, list[int]] = defaultdict(list)
        for index, job in enumerate(jobs):
            by_model[job.options.model or self.default].append(index)
        parts = []
        for model, indices in by_model.items():
            pipeline = self.pipelines.get(model)
            if pipeline is None:  # the service checks requests first: this is a bug, not input
                raise KeyError(f"no pipeline for model {model!r}; loaded: {', '.join(self.pipelines)}")
            parts.append((indices, start_batch(pipeline, [jobs[i] for i in indices])))
        return _RoutedLaunch(parts, len(jobs))

    def warmup(self, faces: int = 1, size: int = 256) -> None:
        for pipeline in self.pipelines.values():
            pipeline.warmup(faces, size)

    @property
    def device(self) -> torch.device:
        return next(iter(self.pipelines.values())).device

    @property
    def redetected_images(self) -> int:
        return sum(p.redetected_images for p in self.pipelines.values())

    def batch_memory(self) -> BatchMemory:
        """Every model's (FacePipeline.batch_memory) added up: each model's graphs keep a memory
        pool of their own."""
        return functools.reduce(lambda a, b: a + b, (p.batch_memory() for p in self.pipelines.values()))

    def set_graph_max_batch(self, largest: int) -> None:
        for pipeline in self.pipelines.values():
            pipeline.set_graph_max_batch(largest)

    @property
    def graphed(self) -> list[str]:
        return sorted({name for pipeline in self.pipelines.values() for name in pipeline.graphed})

    @property
    def fallbacks(self) -> list[str]:
        """Every restorer's pipeline's fallbacks (FacePipeline.fallbacks), each named by its model."""
        return [f"{model}: {note}" for model, pipeline in self.pipelines.items() for note in pipeline.fallbacks]

    @property
    def profiler(self):
        return next(iter(self.pipelines.values())).profiler

    @profiler.setter
    def profiler(self, value) -> None:
        for pipeline in self.pipelines.values():
            pipeline.profiler = value


class _RoutedLaunch:
    """ModelRouter.start's handle: each model's queued pass, read back into job order."""

    def __init__(self, parts: list[tuple[list[int], Started]], count: int):
        self._parts = parts
        self._count = count

    def result(self) -> list[JobResult]:
        results: list[JobResult | None] = [None] * self._count
        for indices, launched in self._parts:
            for index, result in zip(indices, launched.result()):
                results[index] = result
        return results  # type: ignore[return-value]


def build_pipeline(settings) -> FacePipeline | ModelRouter:
    """Fetch missing weights (unless --no-download), load every network once, and wrap them:
    one FacePipeline, or a ModelRouter over one per resident restorer (--models)."""
    from server.model import load_restorer, load_models
    from server.weights import ensure_weights

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    extra = [m for m in settings.models.split(",") if m]
    background = [settings.bg_upsampler] if settings.bg_upsampler else []
    paths = ensure_weights(settings.model, settings.weights_dir, download=not settings.no_download,
                           extra_models=extra + background)
    models = load_models(paths, device, allow_codeformer=settings.enable_codeformer)
    restorer_paths = paths.extra_models[:len(extra)]
    restorers = [models.gfpgan] + [load_restorer(path, device, allow_codeformer=settings.enable_codeformer)
                                   for path in restorer_paths]
    upsampler = None
    if background:
        from server.background import load_realesrgan

        upsampler = load_realesrgan(paths.extra_models[-1], device)
    for restorer in restorers:
        for warning in restorer.warnings:
            log.warning("%s", warning)
    ids = [r.id for r in restorers]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two resident restorers share an id ({', '.join(ids)}): load each model once")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        problem = compile_toolchain_problem() if settings.compile == "auto" else None
        if problem:
            log.warning("--compile auto: off, torch.compile cannot build GPU code here: %s "
                        "(the passes run eagerly, at about half the speed)", problem)
    listed = tuple(r.restorer_info() for r in restorers)
    pipelines = {}
    for restorer in restorers:
        info = dataclasses.replace(restorer.model_info(dtype), models=listed, default_model=ids[0],
                                   backgrounds=("lanczos", "realesrgan") if upsampler else ("lanczos",))
        pipelines[restorer.id] = FacePipeline(
            restorer.net, models.detector, models.parser, device=device, dtype=dtype, info=info,
            speed=settings.speed_options(device.type), upsampler=upsampler,
            # auto: the app sizes it on the device before warm-up (server.memory)
            graph_max_batch=settings.max_batch_faces if isinstance(settings.max_batch_faces, int) else AUTO_CPU)
    if len(pipelines) == 1:
        return pipelines[ids[0]]
    return ModelRouter(pipelines, pipelines[ids[0]].info)
