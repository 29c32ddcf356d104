"""`--max-batch-faces auto`: the batch limit sized on the device at start (server/memory.py).

The choice (pure arithmetic, for the cards a user has); the measurement, on the test device,
against the peak of a larger batch it predicts; the service, which sizes before the warm-up,
hands the number to the graphs, the batcher and GetInfo, and so runs MuseTalk's realtime batch
of 20 in one pass where the budget allows. On CUDA (the GPU check) the real allocator is measured
and the pipeline's graphs share one pool.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from contract.pb import face_enhance_pb2 as pb
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import Alignment, EnhanceOptions
from server import memory
from server.jobs import DeviceOutOfMemory, Job
from server.memory import (AUTO_CPU, AUTO_MOST, HEADROOM, BatchMemory, auto_max_batch_faces, choose,
                           fit_batch_faces, measure_passes, peak_meter)
from server.pipeline import MAX_NETWORK_FACES, ModelRouter
from server.settings import Settings
from server.speed import SpeedOptions, graph_buckets
from tests.device import ON_CUDA, TEST_DEVICE, needs_cuda
from tests.fakes import FakePipeline, random_faces
from tests.test_server import assert_answers, channel, request, running
from tests.test_speed import make_pipeline, nets, weights  # noqa: F401 - fixtures

MIB, GIB = 2 ** 20, 2 ** 30
#: GFPGAN's pass at bf16, counted (BENCHMARKS.md "Memory a batch takes"), and a little more
FULL_SIZE = BatchMemory(per_face=390 * MIB, fixed=300 * MIB)


# --- the choice ----------------------------------------------------------------------------------

@pytest.mark.parametrize("budget_gib, faces", [
    (40 - 0.6, 32),   # an H100's half, less the weights: the most auto takes
    (12 - 0.6, 20),   # a 24 GiB desk card: MuseTalk's 20; 24 faces would take 11.8 GiB with the headroom
    (6 - 0.6, 8),     # a 12 GiB card
    (4 - 0.6, 6),     # an 8 GiB laptop card
    (0.2, 1),         # nothing fits: one face, which the batcher can always try
])
def test_auto_takes_the_largest_graph_bucket_whose_batch_fits_the_budget_with_headroom(budget_gib, faces):
    chosen, why = fit_batch_faces(FULL_SIZE, budget_gib * GIB, "the budget")
    assert chosen == faces
    assert chosen in graph_buckets(AUTO_MOST)  # no graph pads a batch of the limit
    assert why.startswith(f"{faces} faces: a batch takes 390 MiB a face and 300 MiB more") and "the budget" in why
    if faces > 1:
        assert FULL_SIZE.at(faces) * HEADROOM <= budget_gib * GIB
    bigger = [b for b in graph_buckets(AUTO_MOST) if b > faces]
    assert not bigger or FULL_SIZE.at(bigger[0]) * HEADROOM > budget_gib * GIB


def test_a_batch_that_fits_exactly_is_taken_and_one_byte_less_is_not():
    need = BatchMemory(per_face=100.0, fixed=0.0)
    assert choose(need, 12 * 100 * HEADROOM, [1, 8, 12, 16]) == 12
    assert choose(need, 12 * 100 * HEADROOM - 1, [1, 8, 12, 16]) == 8


def test_auto_stops_where_the_networks_run_in_passes():
    assert AUTO_MOST == MAX_NETWORK_FACES
    assert fit_batch_faces(BatchMemory(1.0, 0.0), 1e15, "")[0] == MAX_NETWORK_FACES


def test_the_graphs_buffers_count_for_every_face_of_every_bucket_up_to_the_limit():
    need = BatchMemory(per_face=100.0, fixed=40.0, graph_face=10.0)
    assert sum(graph_buckets(32)) == 153
    assert need.at(32) == 40 + 100 * 32 + 10 * 153
    assert need.at(20) == 40 + 100 * 20 + 10 * (1 + 2 + 4 + 6 + 8 + 12 + 16 + 20)
    assert BatchMemory(100.0, 40.0).at(32) == 40 + 100 * 32  # no graphs
    both = need + BatchMemory(50.0, 0.0, 5.0)
    assert both == BatchMemory(150.0, 40.0, 15.0)
    faces, why = fit_batch_faces(need, need.at(20) * HEADROOM, "the budget")
    assert faces == 20 and "the graphs' buffers 0.0 MiB a face of every bucket" in why


def test_with_cuda_graphs_a_pipeline_counts_each_graph_s_static_input_and_output(nets):  # noqa: F811
    """The three graphs _capture_graphs makes keep, per face of each bucket, a float32 input
    (a 512x512 crop, for RetinaFace a 256x256 frame) and the pass's output: GFPGAN's restored
    crop, ParseNet's mask, RetinaFace's 2,688 anchors of 16 values."""
    plain = make_pipeline(nets, SpeedOptions()).batch_memory()
    graphed = make_pipeline(nets, SpeedOptions(cuda_graphs=True)).batch_memory()
    crop, mask, frame, anchors = 3 * 512 * 512 * 4, 512 * 512 * 4, 3 * 256 * 256 * 4, 2688 * 16 * 4
    assert plain.graph_face == 0
    assert graphed.graph_face == (crop + crop) + (crop + mask) + (frame + anchors)
    # with wait-free detection the detect graph also returns each image's centre row (17 values)
    wait_free = make_pipeline(nets, SpeedOptions(cuda_graphs=True, fixed_selection=True,
                                                 fixed_detection=True)).batch_memory()
    assert wait_free.graph_face == graphed.graph_face + 17 * 4
    # the same passes measured again (on CUDA the allocator may round a little differently)
    assert graphed.per_face == pytest.approx(plain.per_face, rel=0.05)


def test_the_line_goes_through_the_largest_pass_at_each_size():
    # two passes that take turns: the larger one at each size decides
    peaks = {("a", 2): 500, ("a", 4): 900, ("b", 2): 700, ("b", 4): 800}
    seen = []

    def pass_(name):
        def run(n):
            seen.append((name, n))
            return peaks[name, n]
        return run

    need = measure_passes({"a": pass_("a"), "b": pass_("b")}, lambda fn: fn())
    assert sorted(seen) == sorted(peaks)
    assert need == BatchMemory(per_face=(900 - 700) / 2, fixed=700 - 100 * 2)
    assert need.at(4) == 900 and need.at(2) == 700


# --- the measurement, on the test device ----------------------------------------------------------

def test_the_measured_line_holds_a_larger_batch_within_the_headroom(nets):  # noqa: F811
    """batch_memory() measures the networks at 2 and 4 faces; a DETECT batch of 8 real faces
    through the whole pipeline, measured the same way, fits in the line's prediction at 8 with
    HEADROOM, and the prediction is not wildly above it. On the CPU the tensors the operators
    make are counted (as a GPU's allocator would have to hold them); on CUDA, the allocator's own
    peak."""
    from tests.faces import make_faces

    pipeline = make_pipeline(nets, SpeedOptions())
    need = pipeline.batch_memory()
    assert need.per_face > 0
    faces = make_faces(8, size=256)
    batch = peak_meter(pipeline.device)(lambda: pipeline.enhance([Job(faces, EnhanceOptions())]))
    aligned = peak_meter(pipeline.device)(
        lambda: pipeline.enhance([Job(faces, EnhanceOptions(alignment=Alignment.ALIGNED))]))
    predicted = need.at(8)
    print(f"a face {need.per_face / MIB:.1f} MiB, fixed {need.fixed / MIB:.1f} MiB; batch of 8: "
          f"predicted {predicted / MIB:.1f}, DETECT {batch / MIB:.1f}, ALIGNED {aligned / MIB:.1f} MiB")
    assert max(batch, aligned) <= predicted * HEADROOM
    assert predicted <= 2 * max(batch, aligned)


def test_auto_is_8_on_the_cpu_and_for_a_pipeline_that_does_not_measure(nets):  # noqa: F811
    if ON_CUDA:
        pytest.skip("the CPU's value; on CUDA the next tests measure")
    faces, why = auto_max_batch_faces(make_pipeline(nets, SpeedOptions()))
    assert (faces, why) == (AUTO_CPU, "8 faces, auto's value on the CPU")
    assert auto_max_batch_faces(FakePipeline()) == (AUTO_CPU, "8 faces, auto's value on a pipeline that "
                                                              "does not measure its batches")


def test_a_router_adds_up_its_models_each_with_graphs_of_its_own():
    class Measured:
        def __init__(self, need):
            self.need, self.largest = need, None
            self.device = torch.device("cuda")

        def batch_memory(self):
            return self.need

        def set_graph_max_batch(self, largest):
            self.largest = largest

    a, b = Measured(BatchMemory(100.0, 50.0)), Measured(BatchMemory(80.0, 90.0))
    router = ModelRouter({"a": a, "b": b}, FakePipeline.info)
    assert router.batch_memory() == BatchMemory(180.0, 140.0)
    assert router.device.type == "cuda"
    router.set_graph_max_batch(24)
    assert (a.largest, b.largest) == (24, 24)


# --- the service ----------------------------------------------------------------------------------

class _MeasuredFake(FakePipeline):
    """A fake "CUDA" pipeline that says what its batches take, and notes the graph limit it is
    given and whether that came before the warm-up."""

    device = torch.device("cuda")

    def __init__(self, need: BatchMemory | Exception, **kwargs):
        super().__init__(**kwargs)
        self.need = need
        self.events: list[tuple[str, int | None]] = []

    def batch_memory(self) -> BatchMemory:
        self.events.append(("measured", None))
        if isinstance(self.need, Exception):
            raise self.need
        return self.need

    def set_graph_max_batch(self, largest: int) -> None:
        self.events.append(("graphs", largest))

    def warmup(self, *args, **kwargs) -> None:
        self.events.append(("warmup", None))
        super().warmup(*args, **kwargs)


@pytest.mark.parametrize("budget_gib, limit, batches", [
    (39.4, 32, [20]),        # an H100: MuseTalk's realtime batch in one pass
    (5.4, 8, [8, 8, 4]),     # a 12 GiB card: the limit it always had
])
async def test_the_service_sizes_auto_before_its_warm_up_and_batches_to_it(monkeypatch, budget_gib, limit, batches):
    monkeypatch.setattr(memory, "cuda_budget", lambda device: (budget_gib * GIB, f"{budget_gib} GiB (test)"))
    pipeline = _MeasuredFake(FULL_SIZE)
    rng = np.random.default_rng(7)
    faces = random_faces(rng, 20)
    async with running(pipeline, max_batch_faces="auto", max_faces_per_request=32, max_delay_ms=50,
                       max_queue_faces=64, warmup=True) as app, channel(app) as ch:
        stub = pb_grpc.FaceEnhancerStub(ch)
        response = await stub.Enhance(request(1, faces))
        info = await stub.GetInfo(pb.GetInfoRequest())
    assert_answers(response, 1, faces)
    assert pipeline.events == [("measured", None), ("graphs", limit), ("warmup", None)]
    assert app.batcher.max_batch_faces == limit and info.max_batch_faces == limit
    assert [sum(n for n, _ in batch) for batch in pipeline.batches if batch] == batches


async def test_a_number_is_taken_as_it_is_and_nothing_is_measured():
    pipeline = _MeasuredFake(FULL_SIZE)
    async with running(pipeline, max_batch_faces=6) as app, channel(app) as ch:
        info = await pb_grpc.FaceEnhancerStub(ch).GetInfo(pb.GetInfoRequest())
    assert info.max_batch_faces == 6 and app.batcher.max_batch_faces == 6
    assert ("measured", None) not in pipeline.events


async def test_a_card_with_no_memory_for_the_measurement_starts_with_batches_of_one(monkeypatch, caplog):
    monkeypatch.setattr(memory, "cuda_budget", lambda device: pytest.fail("no budget without a measurement"))
    pipeline = _MeasuredFake(DeviceOutOfMemory("the device ran out of memory measuring a batch of 4 faces (CUDA)"))
    with caplog.at_level("INFO", logger="gfpgan-serve"):
        async with running(pipeline, max_batch_faces="auto") as app:
            assert app.batcher.max_batch_faces == 1
    assert pipeline.events[:2] == [("measured", None), ("graphs", 1)]
    assert any("--max-batch-faces auto: 1 face: the device ran out of memory measuring" in r.getMessage()
               for r in caplog.records)


def test_the_setting_takes_auto_or_a_number():
    assert Settings.from_args([], environ={}).max_batch_faces == "auto"
    assert Settings.from_args(["--max-batch-faces", "AUTO"], environ={}).max_batch_faces == "auto"
    assert Settings.from_args([], environ={"GFPGAN_MAX_BATCH_FACES": "24"}).max_batch_faces == 24
    with pytest.raises(ValueError, match=r"--max-batch-faces: must be in 1..1024, got 0 \(or auto\)"):
        Settings(max_batch_faces=0)
    with pytest.raises(SystemExit):
        Settings.from_args(["--max-batch-faces", "most"], environ={})


# --- on CUDA ----------------------------------------------------------------------------------------

@needs_cuda
def test_on_cuda_auto_measures_the_card_and_a_batch_at_its_limit_stays_within_the_budget(nets):  # noqa: F811
    """The real allocator: what auto chose, with its graphs captured and a batch of that size
    run, reserves no more than the budget it was chosen for."""
    pipeline = make_pipeline(nets, SpeedOptions(cuda_graphs=True, modconv="unfused", channels_last=True,
                                                fixed_selection=True))
    budget, how = memory.cuda_budget(TEST_DEVICE)
    resident = torch.cuda.memory_allocated(TEST_DEVICE)
    faces, why = auto_max_batch_faces(pipeline)
    print(why)
    assert faces in graph_buckets(AUTO_MOST) and "of the card's" in why
    pipeline.set_graph_max_batch(faces)
    torch.cuda.reset_peak_memory_stats(TEST_DEVICE)
    pipeline.warmup()
    assert {"gfpgan", "parse", "detect"} <= set(pipeline.graphed)
    batch = random_faces(np.random.default_rng(3), faces, size=256)
    results = pipeline.enhance([Job(batch, EnhanceOptions()),
                                Job(batch, EnhanceOptions(alignment=Alignment.ALIGNED))])
    assert [r.faces.shape[0] for r in results] == [faces, faces]
    used = torch.cuda.max_memory_reserved(TEST_DEVICE) - resident
    print(f"{faces} faces: {used / MIB:.0f} MiB reserved at the most; {how}")
    assert used <= budget


@needs_cuda
def test_on_cuda_graphs_in_one_pool_keep_about_the_largest_s_memory_and_replay_to_their_eager_outputs():
    """Two networks' graphs, each with a 64 MiB intermediate at its largest bucket: in one pool
    (as FacePipeline captures its three networks) they reserve less than in a pool each, and
    replayed in any order each still gives its eager output."""
    from server.speed import GraphedForward

    def network():
        up = torch.nn.Conv2d(3, 64, 3, padding=1).to(TEST_DEVICE).eval()
        down = torch.nn.Conv2d(64, 3, 3, padding=1).to(TEST_DEVICE).eval()
        return lambda x: down(torch.relu(up(x)))
    fns = [network(), network()]
    reserved, kept = {}, {}
    for name in ("separate", "shared"):
        torch.cuda.synchronize(TEST_DEVICE)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(TEST_DEVICE)
        graphs = [GraphedForward(fn, (3, 256, 256), [2, 4], TEST_DEVICE) for fn in fns]
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for graph in graphs:
                graph.capture(pool if name == "shared" else None)
        torch.cuda.empty_cache()  # the warm-up runs' blocks, outside the pools
        reserved[name] = torch.cuda.memory_reserved(TEST_DEVICE) - before
        kept[name] = graphs
    print({k: f"{v / MIB:.0f} MiB" for k, v in reserved.items()})
    assert reserved["shared"] < 0.8 * reserved["separate"]
    graphs = kept["shared"]
    x = [torch.randn(n, 3, 256, 256, device=TEST_DEVICE) for n in (3, 1, 4)]
    with torch.no_grad():
        for order in ((0, 1), (1, 0), (1, 1, 0, 0)):
            outputs = [(which, step, graphs[which](x[step % 3])) for step, which in enumerate(order)]
            for which, step, out in outputs:  # each still its own after the replays that followed
                torch.testing.assert_close(out, fns[which](x[step % 3]), rtol=1e-4, atol=1e-4)
