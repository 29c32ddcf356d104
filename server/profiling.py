"""Where a batch's time goes: per-stage device time, operators (about one kernel launch each) and
host synchronisations, on any device.

The pipeline wraps each stage in `profiler.stage(name)`; with no profiler attached that is a
no-op. `gfpgan-bench --profile` attaches one. Time comes from CUDA events on CUDA (from the host
clock on the CPU, where work is synchronous). Operators and syncs come from a dispatch mode that
sees every ATen operator the stage runs. A sync is an operator after which the host must wait for
the device: a scalar read (`int(t)`, `.item()`), an output whose shape depends on the data
(`nonzero`, boolean-mask indexing, `masked_select`, `unique`), a tensor built on the host and
copied in (`torch.tensor(list, device=...)`), a copy to the host, a checked `linalg.inv`, and
torchvision's NMS (which reads its mask on the host). On CUDA, `torch.cuda.set_sync_debug_mode`
counts the real ones as well (`cuda_syncs`).
"""
from __future__ import annotations

import contextlib
import functools
import time
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Operators after which the host waits for the device (see the module docstring).
SYNC_OPS = {
    _aten.nonzero.default, _aten.nonzero_static.default, _aten._local_scalar_dense.default,
    _aten.masked_select.default, _aten.lift_fresh.default, _aten._linalg_check_errors.default,
    _aten.unique_dim.default, _aten._unique2.default, _aten.unique_consecutive.default,
    _aten.repeat_interleave.Tensor,
}
_NMS_NAMES = ("torchvision::nms",)
# Data movement and views: not kernels of their own (views) or counted as syncs instead.
_NOT_LAUNCHES = {"aten::view", "aten::_unsafe_view", "aten::expand", "aten::permute", "aten::t",
                 "aten::transpose", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select",
                 "aten::alias", "aten::detach", "aten::reshape", "aten::as_strided", "aten::unbind",
                 "aten::split", "aten::chunk", "aten::lift_fresh", "aten::_local_scalar_dense",
                 "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::_reshape_alias",
                 "aten::view_as", "aten::expand_as", "aten::narrow", "aten::view_as_real",
                 "aten::view_as_complex", "aten::_conj", "aten::real", "aten::imag"}


def _is_sync(func, args) -> bool:
    if func in SYNC_OPS:
        return True
    name = func.name()
    if name.startswith(_NMS_NAMES):
        return True
    if func in (_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default):
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False  # copies between devices are judged by OpCounter, which sees their arguments


#: Operators whose first argument is only written (its old values are not read).
_WRITE_ONLY = {_aten.copy_.default, _aten.fill_.Scalar, _aten.fill_.Tensor, _aten.zero_.default}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements t spans: a broadcast dimension (stride 0) counts once."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0 or size == 0:
            elements *= size
    return elements * t.element_size()


def op_bytes(func, args, kwargs, out) -> int:
    """Device memory an operator reads and writes at the least: each distinct tensor argument
    read once (not the target of a copy or fill), each distinct output written once. A kernel
    that reads its input more than once (a convolution's tiles) moves more; fused work (a
    compiled kernel, a graph replay) is not an operator here."""
    written = _out_arguments(func)
    if written:  # an `.out` form: its out tensors are written, not read
        kwargs = {name: value for name, value in kwargs.items() if name not in written}
    leaves = torch.utils._pytree.tree_leaves((args[1:] if func in _WRITE_ONLY else args, kwargs))
    return _distinct_bytes(leaves) + _distinct_bytes(torch.utils._pytree.tree_leaves(out))


@functools.lru_cache(maxsize=None)
def _out_arguments(func) -> frozenset[str]:
    """The names of an operator's out arguments (`out=` of an `.out` overload)."""
    return frozenset(a.name for a in func._schema.arguments if a.is_out)


def _distinct_bytes(leaves) -> int:
    seen, total = set(), 0
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += tensor_bytes(t)
    return total


def op_flops(func, args, kwargs, out) -> int:
    """Floating-point operations of a matrix operator (convolutions, matrix products: two per
    multiply-add, as torch.utils.flop_counter counts them); 0 for any other."""
    from torch.utils.flop_counter import flop_registry

    count = flop_registry.get(func._overloadpacket)
    return int(count(*args, **kwargs, out_val=out)) if count is not None else 0


@dataclass
class StageCounts:
    ops: int = 0
    syncs: int = 0
    bytes: int = 0  # read and written by the operators (op_bytes)
    sync_ops: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class OpCounter(TorchDispatchMode):
    """Counts ATen operators (launches), the bytes they move and syncs, attributed to the
    current stage."""

    def __init__(self, record: bool = False):
        super().__init__()
        #: with record: (operator, FLOPs, bytes) of every launch, in order
        self.record: list[tuple[str, int, int]] | None = [] if record else None
        self.stage = "other"
        self.counts: dict[str, StageCounts] = defaultdict(StageCounts)
        #: Set while the pipeline stages a host array for an asynchronous upload (pinned buffer,
        #: non_blocking copy): the tensor it wraps is not a host-built tensor copied in.
        self.uploading = False

    def note_sync(self, what: str) -> None:
        """A wait the pipeline makes on purpose (its one download), counted like the others."""
        counts = self.counts[self.stage]
        counts.syncs += 1
        counts.sync_ops[what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counts = self.counts[self.stage]
        name = func.name()
        base = name.split(".")[0]
        launch = base not in _NOT_LAUNCHES
        if launch:
            counts.ops += 1
        sync = _is_sync(func, args) and not (self.uploading and func is _aten.lift_fresh.default)
        if func is _aten._to_copy.default or func is _aten.copy_.default:
            source = args[1] if func is _aten.copy_.default else args[0]
            target = kwargs.get("device") if func is _aten._to_copy.default else args[0].device
            blocking = not (kwargs.get("non_blocking") or (func is _aten.copy_.default and len(args) > 2 and args[2]))
            if isinstance(source, torch.Tensor) and target is not None and blocking and \
                    torch.device(target).type == "cpu" and source.device.type != "cpu":
                sync = True  # a blocking copy to the host (a non-blocking one waits at a sync)
        out = func(*args, **kwargs)
        if launch:
            moved = op_bytes(func, args, kwargs, out)
            counts.bytes += moved
            if self.record is not None:
                self.record.append((base, op_flops(func, args, kwargs, out), moved))
        if sync and func is _aten.lift_fresh.default and out.dim() == 0:
            sync = False  # a Python number as a 0-d tensor (t[i] = 3): passed as a scalar
        if sync:
            counts.syncs += 1
            counts.sync_ops[base] += 1
        return out


class StageProfiler:
    """Per-stage time (and, with `count=True`, operators and syncs) over the batches it sees."""

    def __init__(self, device: torch.device, count: bool = False):
        self.device = torch.device(device)
        self.count = count
        self.batches = 0
        self._events: list[tuple[str, object, object]] = []
        self.times_ms: dict[str, list[float]] = defaultdict(list)
        self.counter = OpCounter() if count else None
        self.cuda_syncs = 0

    @contextlib.contextmanager
    def batch(self):
        """Wrap one `pipeline.enhance(...)` call."""
        with contextlib.ExitStack() as stack:
            if self.counter is not None:
                stack.enter_context(self.counter)
                if self.device.type == "cuda":
                    caught = stack.enter_context(warnings.catch_warnings(record=True))
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    stack.callback(torch.cuda.set_sync_debug_mode, "default")
                    stack.callback(self._count_cuda_syncs, caught)
            yield
        self.batches += 1
        self._collect()

    def _count_cuda_syncs(self, caught) -> None:
        self.cuda_syncs += sum("synchroniz" in str(w.message) for w in caught)

    @contextlib.contextmanager
    def stage(self, name: str):
        previous = None
        if self.counter is not None:
            previous, self.counter.stage = self.counter.stage, name
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                end.record()
            else:
                end = time.perf_counter()
            self._events.append((name, start, end))
            if previous is not None:
                self.counter.stage = previous

    @contextlib.contextmanager
    def uploading(self):
        """Around a staged asynchronous upload (see OpCounter.uploading)."""
        if self.counter is None:
            yield
            return
        self.counter.uploading = True
        try:
            yield
        finally:
            self.counter.uploading = False

    def note_sync(self, what: str) -> None:
        if self.counter is not None:
            self.counter.note_sync(what)

    def _collect(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        per_batch: dict[str, float] = defaultdict(float)
        for name, start, end in self._events:
            if self.device.type == "cuda":
                per_batch[name] += start.elapsed_time(end)
            else:
                per_batch[name] += (end - start) * 1000.0
        for name, ms in per_batch.items():
            self.times_ms[name].append(ms)
        self._events.clear()

    # -- report -----------------------------------------------------------------------------

    def per_batch_counts(self) -> dict[str, tuple[float, float]]:
        """stage -> (operators per batch, syncs per batch)."""
        if self.counter is None or not self.batches:
            return {}
        return {stage: (c.ops / self.batches, c.syncs / self.batches)
                for stage, c in self.counter.counts.items()}

    def per_batch_bytes(self) -> dict[str, float]:
        """stage -> bytes its operators read and wrote per batch (op_bytes; what runs inside a
        CUDA graph replay or a compiled kernel is not seen)."""
        if self.counter is None or not self.batches:
            return {}
        return {stage: c.bytes / self.batches for stage, c in self.counter.counts.items()}

    def totals(self) -> tuple[float, float]:
        counts = self.per_batch_counts()
        return (sum(ops for ops, _ in counts.values()), sum(s for _, s in counts.values()))

    def sync_sources(self) -> dict[str, float]:
        """operator -> syncs per batch, over every stage."""
        if self.counter is None or not self.batches:
            return {}
        merged: dict[str, float] = defaultdict(float)
        for c in self.counter.counts.values():
            for op, n in c.sync_ops.items():
                merged[op] += n / self.batches
        return dict(merged)

    def median_ms(self) -> dict[str, float]:
        import statistics
        return {name: statistics.median(values) for name, values in self.times_ms.items()}


class LiveTensors(TorchDispatchMode):
    """The bytes of the tensors the operators inside make that are alive at once, and their
    peak: what a device's allocator would have to hold for them at the least. A storage counts
    once however many views share it, until the last tensor on it is gone. Not counted: what
    exists before (weights, inputs), a library's own scratch memory (cuDNN's workspaces,
    layout copies), and an allocator's rounding and caching."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[tuple, list[int]] = {}  # (device, address) -> [tensors on it, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in torch.utils._pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() == 0:
            return  # no memory (an empty tensor)
        key = (str(tensor.device), storage.data_ptr())
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: tuple) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.live -= entry[1]


@dataclass
class PassCounts:
    ops: int
    bytes: int
    flops: int
    #: (operator, FLOPs, bytes) of each launch, in order
    entries: list[tuple[str, int, int]] = field(default_factory=list)


def count_pass(fn, *args) -> PassCounts:
    """Operators, bytes moved (op_bytes) and FLOPs (op_flops) of one eager call of fn(*args),
    each launch's too. A compiled pass (server.speed.CompiledForward) must be counted through
    its eager function (its `fn`): torch.compile refuses to trace under a dispatch mode."""
    counter = OpCounter(record=True)
    with torch.no_grad(), counter:
        fn(*args)
    entries = counter.record
    return PassCounts(ops=len(entries), bytes=sum(b for _, _, b in entries),
                      flops=sum(f for _, f, _ in entries), entries=entries)


@dataclass
class Traffic:
    """What a network pass computes and moves, split into what grows with the batch (a face)
    and what it does once (a pass: its weights' casts), launch by launch."""
    #: (operator, FLOPs a face, bytes a face, bytes a pass) of each launch
    launches: list[tuple[str, float, float, float]]

    @property
    def flops(self) -> float:
        return sum(f for _, f, _, _ in self.launches)

    @property
    def face_bytes(self) -> float:
        return sum(b for _, _, b, _ in self.launches)

    @property
    def pass_bytes(self) -> float:
        return sum(p for _, _, _, p in self.launches)

    def floor_ms(self, batch: int, tflops: float, gbs: float) -> float:
        """Milliseconds a face, in a pass of `batch`, if every launch ran at its roofline: the
        longer of its FLOPs at `tflops` TFLOP/s and its bytes at `gbs` GB/s (launches one after
        the other, as eager kernels run)."""
        total = sum(max(batch * f / tflops / 1e9, (p + batch * b) / gbs / 1e6)
                    for _, f, b, p in self.launches)
        return total / batch


def pass_traffic(fn, face: torch.Tensor) -> Traffic:
    """fn's Traffic over a batch, from its launches at one and at two copies of `face` (a batch
    of one): the same launches, whose bytes grow by a face's and FLOPs double. After one call
    not counted: what a pass makes once and keeps (ParseNet's phase weights: speed._derived) is
    made at warm-up, not in the passes a service runs."""
    one, two = face[:1], face[:1].expand(2, *face.shape[1:]).contiguous()
    with torch.no_grad():
        fn(one)
    small, large = count_pass(fn, one).entries, count_pass(fn, two).entries
    if [name for name, _, _ in small] != [name for name, _, _ in large]:
        raise ValueError("the pass launches other operators for two faces than for one; its "
                         "bytes cannot be split into a face's and a pass's")
    return Traffic([(name, f1, b2 - b1, 2 * b1 - b2) for (name, f1, b1), (_, _, b2) in zip(small, large)])


#: Operators CUDA autocast runs in float32 (its fp32 list) and CPU autocast in their input's type,
#: among those that move a network's activations here: GFPGAN's and ParseNet's resampling.
CUDA_FLOAT32_OPS = ("upsample_bilinear2d", "upsample_nearest2d")


@contextlib.contextmanager
def cuda_autocast_policy():
    """Inside, CPU autocast casts as CUDA autocast does where that moves these networks' bytes:
    an operator with a CPU autocast rule and no CUDA one (reflection and replication padding
    run in float32 on the CPU; cat, stack) runs as it comes, and CUDA_FLOAT32_OPS run in float32.
    For counting on the CPU the bytes a GPU moves; on leaving, CPU autocast is itself again."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in torch._C._dispatch_get_all_op_names():
                if name.startswith("aten::") and has(name, "AutocastCPU") and not has(name, "AutocastCUDA"):
                    library.impl(name[len("aten::"):], torch.library.fallthrough_kernel, "AutocastCPU")
            for name in CUDA_FLOAT32_OPS:
                library.impl(name, _in_float32(getattr(torch.ops.aten, name).default), "AutocastCPU")
        yield
    finally:
        library._destroy()


def _in_float32(op):
    def run(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            return op(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                        for a in args], **kwargs)
    return run
