"""The OpenCL backend: a graph becomes one OpenCL program (ember.codegen.opencl), built through
ProgramCache, and an executable that replays the program's launch plan on one in-order queue.

An executable creates its buffers (inputs, outputs, arena, status) once and binds every kernel's
arguments once, when it is made; a run uploads the inputs, enqueues the launches, downloads the
outputs and waits. Weights are uploaded once per backend (a WeightStore shared by every graph
the backend compiles, keyed by the weight's memory and layout), so the step graphs of a model
share one copy on the device; a weight the profile re-lays out (SoA) is transformed on upload
and its quants are also bound as image1d_buffer_t.

A session binds each step graph once (OpenCLExecutable.bind): the inputs a graph updates in
place (the KV caches) then live on the device, one buffer per host cache array shared by every
graph of the backend (ember.backends.resident), and a step moves only the small inputs up and
the logits down; the bound run keeps its own kernels with their arguments set.
"""
from __future__ import annotations

import threading
from typing import Mapping

import numpy as np

from ember.backends.base import Backend, Executable, host_storage
from ember.backends.opencl.compiler import ProgramCache
from ember.backends.opencl.device import choose_profile, select_device
from ember.backends.resident import (BoundInputs, ResidentStore, ResidentSync, TransferStats, bind_resident,
                                     plain_run_done, plain_run_inputs, root_bytes)
from ember.codegen.opencl import layout_pass, render_graph, supports_node
from ember.codegen.opencl_plan import (PROFILE_NAMES, BufferArg, ImageArg, OpenCLProgram, Place, Profile, StatusArg,
                                       WeightLayout, relayout_weight)
from ember.errors import BackendUnavailable, EmberError
from ember.passes import Pipeline, pipeline_for
from ember.target import Target, target_of
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.types import TensorType


class OpenCLBackend(ResidentSync, Backend):
    """device: None (first GPU, else first device), an index or part of a name; profile: "auto",
    "generic", "adreno", "adreno-emulated" or a Profile; profile_options: Profile fields to
    override (e.g. soa_min_rows=4 to re-lay out small weights in tests); profiling: a queue that
    times each launch (OpenCLExecutable.profile); verbose: print the compiler's build logs on
    stderr (otherwise kept in cache.logs)."""

    name = "opencl"

    def __init__(self, device=None, profile="auto", cache_dir=None, profile_options: dict | None = None,
                 profiling: bool = False, verbose: bool = False):
        if not isinstance(profile, Profile) and profile not in ("auto",) + PROFILE_NAMES:
            raise EmberError(f"opencl backend: unknown profile {profile!r}; known: auto, {', '.join(PROFILE_NAMES)}")
        self.device_spec = device
        self.requested_profile = profile
        self.profile_options = dict(profile_options or {})
        self.cache_dir = cache_dir
        self.profiling = profiling
        self.verbose = verbose            # print the compiler's build logs on stderr
        self._state = None            # (device, info, profile) once selected
        self._failure: str | None = None
        self._context = None
        self._queue = None
        self._cache: ProgramCache | None = None
        self._weights: WeightStore | None = None
        self._resident: OpenCLResidentStore | None = None
        self.transfers = TransferStats()    # bytes moved by runs and resident syncs

    def __repr__(self) -> str:
        if self._state is None:
            return f"<OpenCLBackend device={self.device_spec!r} profile={self.requested_profile!r}>"
        _, info, profile = self._state
        return f"<OpenCLBackend {info.name!r} profile={profile.name}>"

    # ---- the device ----------------------------------------------------------------------
    def _select(self):
        if self._state is None and self._failure is None:
            try:
                device, info = select_device(self.device_spec)
                profile = choose_profile(info, self.requested_profile, **self.profile_options)
                self._state = (device, info, profile)
            except BackendUnavailable as e:
                self._failure = str(e)
        if self._state is None:
            raise BackendUnavailable(f"opencl backend unavailable: {self._failure}")
        return self._state

    @property
    def info(self):
        return self._select()[1]

    @property
    def profile(self) -> Profile:
        return self._select()[2]

    @property
    def context(self):
        if self._context is None:
            import pyopencl as cl
            device = self._select()[0]
            self._context = cl.Context([device])
            properties = cl.command_queue_properties.PROFILING_ENABLE if self.profiling else 0
            self._queue = cl.CommandQueue(self._context, device, properties=properties)
        return self._context

    @property
    def queue(self):
        self.context
        return self._queue

    @property
    def cache(self) -> ProgramCache:
        """The program-binary cache (`hits` and `builds` count its work)."""
        if self._cache is None:
            device, info, _ = self._select()
            self._cache = ProgramCache(self.context, device, info, self.cache_dir, self.verbose)
        return self._cache

    @property
    def weights(self) -> "WeightStore":
        if self._weights is None:
            self._weights = WeightStore(self.context, self.queue)
        return self._weights

    @property
    def resident(self) -> "OpenCLResidentStore":
        """The device copies of the caches bound runs update in place."""
        if self._resident is None:
            self._resident = OpenCLResidentStore(self.context, self.queue, self.transfers)
        return self._resident

    def available(self) -> tuple[bool, str]:
        try:
            self._select()
        except BackendUnavailable as e:
            return False, str(e).removeprefix("opencl backend unavailable: ")
        return True, ""

    def supports_op(self, node: Node) -> tuple[bool, str]:
        ok, reason = supports_node(node)
        if ok and self._state is not None:
            info = self._state[1]
            for t in [node.type] + [i.type for i in node.inputs]:
                if t.nbytes > info.max_alloc_bytes:
                    return False, (f"{node.op}: a tensor of {t.nbytes} bytes is over the device's "
                                   f"largest buffer ({info.max_alloc_bytes} bytes)")
        return ok, reason

    # ---- compiling -----------------------------------------------------------------------
    def target(self) -> Target:
        return target_of(self.name, adreno=self.profile.adreno)

    def pipeline(self) -> Pipeline:
        # An Adreno profile's pipeline ends with its own layout pass (its thresholds).
        return pipeline_for(self.target().name, layout=layout_pass(self.profile))

    def render(self, graph: Graph) -> OpenCLProgram:
        """The program this backend would build for graph (no device work)."""
        return render_graph(graph, self.profile)

    def compile(self, graph: Graph, **options) -> "OpenCLExecutable":
        if options:
            raise EmberError(f"opencl backend: unknown compile options {sorted(options)}")
        self.require_available()
        self.require_supported(graph)
        program = self.render(graph)
        built = self.cache.build(program, name=f"graph {graph.name!r}")
        return OpenCLExecutable(self, program, built)


class WeightStore:
    """Device copies of constants, uploaded once and shared by every executable of a backend.
    Keyed by the array's memory (address, size, dtype, shape, strides) and layout; the array is
    kept referenced, so its memory cannot be reused by another array while the entry lives."""

    def __init__(self, context, queue):
        self.context = context
        self.queue = queue
        self._entries: dict[tuple, tuple[np.ndarray, dict]] = {}
        self.uploads = 0

    def get(self, array: np.ndarray, layout: WeightLayout | None) -> dict:
        """{part: memory object}: "" the plain buffer; for a layout "q", "d" (buffers) and
        "img_r32ui", "img_rgba32ui" (images over q)."""
        key = (array.__array_interface__["data"][0], array.nbytes, array.dtype.str, array.shape,
               array.strides, layout)
        entry = self._entries.get(key)
        if entry is None:
            entry = (array, self._upload(array, layout))
            self._entries[key] = entry
        return entry[1]

    def get_relaid(self, parts: dict, layout: WeightLayout) -> dict:
        """As get, for a weight given already in layout: {"q", "d"} as relayout_weight makes
        them (an artifact stores them so; ember.backends.opencl.loader)."""
        q = parts["q"]
        key = (q.__array_interface__["data"][0], q.nbytes, parts["d"].__array_interface__["data"][0],
               "relaid", layout)
        entry = self._entries.get(key)
        if entry is None:
            self.uploads += 1
            entry = (parts, self._upload_parts(parts, layout))
            self._entries[key] = entry
        return entry[1]

    def _upload(self, array: np.ndarray, layout: WeightLayout | None) -> dict:
        import pyopencl as cl
        self.uploads += 1
        flags = cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR
        if layout is None:
            data = np.ascontiguousarray(array)
            if not data.nbytes:
                return {"": cl.Buffer(self.context, cl.mem_flags.READ_ONLY, 4)}
            return {"": cl.Buffer(self.context, flags, hostbuf=data)}
        return self._upload_parts(relayout_weight(array, layout), layout)

    def _upload_parts(self, parts: dict, layout: WeightLayout) -> dict:
        """Buffers of a re-laid-out weight's parts, and the images over its quants."""
        import pyopencl as cl
        flags = cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR
        mems = {name: cl.Buffer(self.context, flags, hostbuf=np.ascontiguousarray(data))
                for name, data in parts.items()}
        uint32 = cl.channel_type.UNSIGNED_INT32
        mems["img_r32ui"] = cl.create_image(self.context, cl.mem_flags.READ_ONLY,
                                            cl.ImageFormat(cl.channel_order.R, uint32),
                                            shape=(layout.texels,), buffer=mems["q"])
        mems["img_rgba32ui"] = cl.create_image(self.context, cl.mem_flags.READ_ONLY,
                                               cl.ImageFormat(cl.channel_order.RGBA, uint32),
                                               shape=(layout.texels // 4,), buffer=mems["q"])
        return mems


class OpenCLResidentStore(ResidentStore):
    """Resident cache arrays as plain read-write buffers; a view is bound as the buffer at the
    view's byte offset (kernel arguments are (buffer, byte offset) pairs)."""

    def __init__(self, context, queue, transfers: TransferStats):
        super().__init__(transfers)
        self.context, self.queue = context, queue

    def _allocate(self, root: np.ndarray):
        import pyopencl as cl
        return cl.Buffer(self.context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR,
                         hostbuf=root_bytes(root))

    def _upload(self, entry, root: np.ndarray):
        import pyopencl as cl
        cl.enqueue_copy(self.queue, entry.buffer, root_bytes(root), is_blocking=True)

    def _download(self, entry, root: np.ndarray):
        import pyopencl as cl
        cl.enqueue_copy(self.queue, root_bytes(root), entry.buffer, is_blocking=True)


class OpenCLExecutable(Executable):
    backend_name = "opencl"

    def __init__(self, backend: OpenCLBackend, program: OpenCLProgram, built):
        import pyopencl as cl
        self.backend = backend
        self.graph = program.graph
        self.program = program
        self.planned_peak_bytes = program.plan.peak_bytes
        self.status_messages = program.status_messages
        self.transfers = backend.transfers
        self._queue = backend.queue
        ctx = backend.context
        self._lock = threading.Lock()
        graph = program.graph
        self._declare_signature(graph.inputs, [host_storage(TensorType(n.dtype, n.shape)) for n in graph.outputs])
        # input buffers are made on first use (_in_buf): a bound run keeps its caches in the
        # backend's resident store, so the cache inputs of a step graph never get one
        self._in_bufs = [None] * len(graph.inputs)
        self._out_bufs = [cl.Buffer(ctx, cl.mem_flags.READ_WRITE, max(_nbytes(n.type), 4)) for n in graph.outputs]
        self._arena = cl.Buffer(ctx, cl.mem_flags.READ_WRITE, max(program.plan.peak_bytes, 4))
        self._status = cl.Buffer(ctx, cl.mem_flags.READ_WRITE, 4) if program.status_messages else None
        self._consts = []
        for j, node in enumerate(program.constants):
            data = graph.constant_data(node)
            if node.attr("value") is not None:     # a literal: small, made afresh by each graph
                self._consts.append({"": cl.Buffer(ctx, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR,
                                                   hostbuf=np.ascontiguousarray(data))})
            else:
                self._consts.append(backend.weights.get(data, program.layouts.get(j)))
        self.in_place_outputs = {k: self._inputs[i].name for k, i in program.in_place.items()}
        # the plain run's kernels get their arguments on its first call (_plain_kernels)
        self._kernels = [cl.Kernel(built, launch.kernel) for launch in program.launches]
        self._plain_args = False

    def __repr__(self) -> str:
        return (f"<OpenCLExecutable {self.graph.name!r}: {len(self.program.kernels)} kernels, "
                f"{len(self.program.launches)} launches, arena {self.planned_peak_bytes} bytes>")

    @property
    def source(self) -> str:
        return self.program.source

    def _in_buf(self, i: int):
        """The device buffer of input i, made on first use."""
        if self._in_bufs[i] is None:
            import pyopencl as cl
            self._in_bufs[i] = cl.Buffer(self.backend.context, cl.mem_flags.READ_WRITE,
                                         max(_nbytes(self._inputs[i].type), 4))
        return self._in_bufs[i]

    def _plain_kernels(self) -> list:
        """The kernels of run() and profile(), their arguments set (once)."""
        if not self._plain_args:
            for kernel, launch in zip(self._kernels, self.program.launches):
                kernel.set_args(*self._kernel_args(launch.args))
            self._plain_args = True
        return self._kernels

    def _buffer(self, place: Place, part: str = ""):
        if place.region == "in":
            return self._in_buf(place.index)
        if place.region == "out":
            return self._out_bufs[place.index]
        if place.region == "const":
            return self._consts[place.index][part]
        return self._arena

    def _kernel_args(self, args, resident: Mapping[int, tuple] | None = None) -> list:
        """The kernel arguments of a launch; resident: {input index: (buffer, byte offset)} for
        inputs bound to a resident copy instead of the executable's own input buffer."""
        values = []
        for arg in args:
            if isinstance(arg, BufferArg):
                place = arg.place
                if resident and place.region == "in" and place.index in resident:
                    buffer, base = resident[place.index]
                    values += [buffer, np.uint32(base + place.offset)]
                else:
                    values += [self._buffer(place, arg.part), np.uint32(place.offset)]
            elif isinstance(arg, ImageArg):
                values.append(self._consts[arg.index][f"img_{arg.format}"])
            elif isinstance(arg, StatusArg):
                values += [self._status, np.int32(arg.code)]
            else:
                raise EmberError(f"opencl backend: unknown kernel argument {arg!r}")
        return values

    def run(self, inputs: Mapping[str, np.ndarray],
            outputs: Mapping[int, np.ndarray] | None = None) -> list[np.ndarray]:
        """Upload every input, run, download every output. An input that is resident (a bound
        run's cache) is brought to the host first, and written back after an in-place update,
        so the host arrays are the truth for this path."""
        import pyopencl as cl
        store = self.backend._resident
        arrays, results = plain_run_inputs(self, store, inputs, outputs)
        status = np.zeros(1, np.int32)
        queue = self._queue
        with self._lock:
            try:
                for i, arr in enumerate(arrays):
                    if arr.nbytes:
                        cl.enqueue_copy(queue, self._in_buf(i), arr, is_blocking=False)
                if self._status is not None:
                    cl.enqueue_copy(queue, self._status, status, is_blocking=False)
                for kernel, launch in zip(self._plain_kernels(), self.program.launches):
                    cl.enqueue_nd_range_kernel(queue, kernel, launch.global_size, launch.local_size)
                for k, out in enumerate(results):
                    if out.nbytes:
                        source = self._in_buf(self.program.in_place[k]) if k in self.program.in_place \
                            else self._out_bufs[k]
                        cl.enqueue_copy(queue, out, source, is_blocking=False)
                if self._status is not None:
                    cl.enqueue_copy(queue, status, self._status, is_blocking=False)
                queue.finish()
            except cl.Error as e:
                raise EmberError(f"opencl backend: graph {self.graph.name!r}: running it failed: {e}") from e
        transfers = self.transfers
        transfers.uploaded += sum(a.nbytes for a in arrays) + (4 if self._status is not None else 0)
        transfers.downloaded += sum(r.nbytes for r in results) + (4 if self._status is not None else 0)
        plain_run_done(self, store, outputs)
        self._check_status(int(status[0]))
        return results

    def bind(self, inputs: Mapping[str, np.ndarray],
             outputs: Mapping[int, np.ndarray] | None = None) -> "OpenCLRun":
        """The inputs and outputs checked once: a callable run(fresh=(), inputs=None) -> outputs,
        as Executable.bind. An output given as the very array of the input it updates in place
        (in_place_outputs: the caches) makes that input resident on the device; see OpenCLRun."""
        def acquire(array):
            found = self.backend.resident.acquire(array)
            # kernel arguments take uint byte offsets
            return found if found is not None and found[1] + array.nbytes < 2 ** 32 else None
        return OpenCLRun(self, *bind_resident(self, inputs, outputs, acquire))

    def profile(self, inputs: Mapping[str, np.ndarray], repeats: int = 1) -> list[tuple]:
        """Run the graph `repeats` times (after one untimed run) and return, per launch, (Launch,
        median seconds on the device), from the queue's event timestamps. Needs a backend made
        with profiling=True."""
        import pyopencl as cl
        if not self.backend.profiling:
            raise EmberError("opencl backend: profile() needs OpenCLBackend(profiling=True)")
        self.run(inputs)
        arrays = self._checked_inputs(inputs)
        times = [[] for _ in self._kernels]
        with self._lock:
            for i, arr in enumerate(arrays):
                if arr.nbytes:
                    cl.enqueue_copy(self._queue, self._in_buf(i), arr)
            for _ in range(repeats):
                events = [cl.enqueue_nd_range_kernel(self._queue, kernel, launch.global_size, launch.local_size)
                          for kernel, launch in zip(self._plain_kernels(), self.program.launches)]
                self._queue.finish()
                for slot, event in zip(times, events):
                    slot.append((event.profile.end - event.profile.start) * 1e-9)
        return [(launch, float(np.median(t))) for launch, t in zip(self.program.launches, times)]


class OpenCLRun(BoundInputs):
    """An OpenCLExecutable bound to its arrays (OpenCLExecutable.bind). Its own kernel objects
    keep their arguments set between calls; a resident input (a KV cache) is an argument pointing
    into the backend's resident copy, so a call uploads only the other inputs and downloads only
    the outputs that are not resident. The output list holds the resident targets' host arrays
    as given, whose contents are stale until backend.sync_to_host. `fresh` outputs get new
    arrays each call (the caller may keep old ones); `inputs` replaces bound non-resident inputs
    by name (they stay bound for later calls)."""

    def __init__(self, executable: OpenCLExecutable, inputs: list[np.ndarray], outputs: list[np.ndarray],
                 resident: Mapping[int, tuple]):
        import pyopencl as cl
        self.executable = executable
        self.inputs, self.outputs = inputs, outputs    # referenced: resident roots stay alive
        self.resident = {i: entry for i, (entry, _) in resident.items()}
        places = {i: (entry.buffer, offset) for i, (entry, offset) in resident.items()}
        self._kernels = []
        for kernel, launch in zip(executable._kernels, executable.program.launches):
            own = cl.Kernel(kernel.program, kernel.function_name)
            own.set_args(*executable._kernel_args(launch.args, places))
            self._kernels.append(own)
        in_place = executable.program.in_place
        self._resident_outputs = {k for k, i in in_place.items() if i in self.resident}
        self._downloads = [(k, executable._in_buf(in_place[k]) if k in in_place else executable._out_bufs[k])
                           for k in range(len(outputs)) if k not in self._resident_outputs]

    def __call__(self, fresh=(), inputs: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        import pyopencl as cl
        exe = self.executable
        self._begin(fresh, inputs)
        status = np.zeros(1, np.int32)
        queue = exe._queue
        up = down = 0
        with exe._lock:
            try:
                for i, arr in enumerate(self.inputs):
                    if arr.nbytes and i not in self.resident:
                        cl.enqueue_copy(queue, exe._in_buf(i), arr, is_blocking=False)
                        up += arr.nbytes
                if exe._status is not None:
                    cl.enqueue_copy(queue, exe._status, status, is_blocking=False)
                for kernel, launch in zip(self._kernels, exe.program.launches):
                    cl.enqueue_nd_range_kernel(queue, kernel, launch.global_size, launch.local_size)
                for k, source in self._downloads:
                    out = self.outputs[k]
                    if out.nbytes:
                        cl.enqueue_copy(queue, out, source, is_blocking=False)
                        down += out.nbytes
                if exe._status is not None:
                    cl.enqueue_copy(queue, status, exe._status, is_blocking=False)
                    up, down = up + 4, down + 4
                queue.finish()
            except cl.Error as e:
                raise EmberError(f"opencl backend: graph {exe.graph.name!r}: running it failed: {e}") from e
            for entry in self.resident.values():
                entry.device_newer = True
        exe.transfers.uploaded += up
        exe.transfers.downloaded += down
        exe._check_status(int(status[0]))
        return list(self.outputs)




def _nbytes(t: TensorType) -> int:
    return TensorType(t.dtype, t.shape).nbytes if t.shape else t.dtype.block_bytes


__all__ = ["OpenCLBackend", "OpenCLExecutable", "OpenCLRun", "OpenCLResidentStore", "WeightStore"]
