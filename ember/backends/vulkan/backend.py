"""The Vulkan backend: a graph becomes shaders and a launch plan (ember.codegen.vulkan), SPIR-V
(glslc, cached), pipelines, and ONE command buffer recorded at compile time and resubmitted on
every run.

An executable owns its buffers: the inputs packed into one buffer, the outputs into another,
the arena, the status word and the renderer's tables; constants (weights) live in buffers the
backend shares between executables (the step graphs of a session use the same weights), each
uploaded once. Buffers are host-visible (on lavapipe all memory is), so a run is: copy the
inputs in, reset the status word, submit, wait, check the status word, copy the outputs out.

A session binds each step graph once (VulkanExecutable.bind): the inputs a graph updates in
place (the KV caches) then live in device buffers the backend keeps, one per host cache array
and shared by every graph (a graph of fewer KV rows binds a prefix; ember.backends.resident),
and the bound run records its own command buffer once, with descriptors pointing into them, and
resubmits it each step: only the small inputs are copied in and the logits out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
import weakref
from pathlib import Path
from typing import Mapping

import numpy as np

from ember.backends.base import Backend, Executable, host_storage
from ember.files import default_cache_dir
from ember.backends.resident import (BoundInputs, ResidentStore, ResidentSync, TransferStats, bind_resident,
                                     plain_run_done, plain_run_inputs, root_bytes)
from ember.backends.vulkan.compiler import SpirvCache, program_spirv
from ember.codegen.vulkan import render_graph, supports_node
from ember.codegen.vulkan_plan import BASELINE_CAPS, PLAN_FORMAT, DeviceCaps, VulkanProgram
from ember.errors import BackendUnavailable, EmberError
from ember.ir.graph import Graph
from ember.ir.node import Node

REGION_ALIGNMENT = 256


class VulkanBackend(ResidentSync, Backend):
    """options: device (index; default: the first GPU, else the CPU implementation),
    features ("device": what the device reports; "baseline": no 8/16-bit storage, no
    subgroup arithmetic, no texel buffers and no fp64, the fallbacks every Vulkan 1.1 device runs),
    cache_dir (SPIR-V and pipeline caches), glslc (the compiler's path), max_binding_bytes
    (bind at most this many bytes at once, below the device's limits: tests the splitting of
    big weights without big weights)."""

    name = "vulkan"

    def __init__(self, device: int | None = None, features: str = "device", cache_dir=None,
                 glslc: str | None = None, max_binding_bytes: int | None = None):
        if features not in ("device", "baseline"):
            raise EmberError(f"vulkan backend: features must be 'device' or 'baseline', got {features!r}")
        self.device_index = device
        self.features = features
        self.max_binding_bytes = max_binding_bytes
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.spirv_cache = SpirvCache(self.cache_dir / "vulkan" / "spirv", glslc)
        self._device = None
        self._constants = _ConstantStore()
        self._resident: VulkanResidentStore | None = None
        self.transfers = TransferStats()    # bytes copied to and from device memory

    def __repr__(self) -> str:
        return f"<VulkanBackend device={self.device_index} features={self.features}>"

    @property
    def device(self):
        """The Vulkan device (opened on first use)."""
        if self._device is None:
            from ember.backends.vulkan.device import get_device
            self._device = get_device(self.device_index, self.cache_dir / "vulkan")
        return self._device

    @property
    def caps(self) -> DeviceCaps:
        caps = self.device.caps
        if self.features == "baseline":
            caps = dataclasses.replace(caps, storage8=False, storage16=False, subgroup_size=0,
                                       texel_buffers=False, max_texel_bytes=0, float64=False)
        if self.max_binding_bytes:
            caps = dataclasses.replace(caps, max_storage_range=min(caps.max_storage_range, self.max_binding_bytes),
                                       max_texel_bytes=min(caps.max_texel_bytes, self.max_binding_bytes))
        return caps

    @property
    def resident(self) -> "VulkanResidentStore":
        """The device copies of the caches bound runs update in place."""
        if self._resident is None:
            self._resident = VulkanResidentStore(self.device, self.transfers)
        return self._resident

    def available(self) -> tuple[bool, str]:
        try:
            device = self.device
        except BackendUnavailable as e:
            return False, str(e)
        if self.spirv_cache.glslc is None:
            return False, (f"vulkan backend: device {device.name} found, but not the shader compiler "
                           f"glslc (Debian/Ubuntu: `apt-get install glslc`)")
        return True, ""

    def supports_op(self, node: Node) -> tuple[bool, str]:
        try:
            caps = self.caps
        except BackendUnavailable:
            caps = BASELINE_CAPS
        return supports_node(node, caps)

    def compile(self, graph: Graph, **options) -> "VulkanExecutable":
        if options:
            raise EmberError(f"vulkan backend: unknown compile options {sorted(options)}")
        self.require_available()
        self.require_supported(graph)
        program = render_graph(graph, self.caps)
        spirv = program_spirv(program, self.spirv_cache)
        return self._executable(graph, program, spirv)

    def load_executable(self, graph: Graph, plan: dict, blobs: Mapping[str, bytes]) -> "VulkanExecutable":
        """The executable of a launch plan and SPIR-V exported earlier
        (ember.backends.vulkan.compiler.export_graph): no shader compiler. The graph is
        rendered again (cheap) and must give the very same plan."""
        if plan.get("format") != PLAN_FORMAT:
            raise EmberError(f"vulkan: not a launch plan (format {plan.get('format')!r})")
        caps = DeviceCaps.from_json(plan["caps"])
        here = self.caps
        if (caps.storage8 and not here.storage8) or (caps.storage16 and not here.storage16) or \
                (caps.subgroup_size and caps.subgroup_size != here.subgroup_size) or \
                (caps.texel_buffers and not here.texel_buffers) or caps.max_texel_bytes > here.max_texel_bytes or \
                caps.max_storage_range > here.max_storage_range or here.offset_alignment > caps.offset_alignment \
                or here.texel_alignment > caps.texel_alignment:
            raise EmberError(f"vulkan: the plan was made for {caps.device} ({caps}); this device "
                             f"({here}) cannot run it")
        program = render_graph(graph, caps)
        exported = ("file", "spirv_sha256")
        stored = dict(plan, shaders=[{k: v for k, v in s.items() if k not in exported} for s in plan["shaders"]],
                      regions=dict(plan["regions"], aux=[{k: v for k, v in a.items() if k != "file"}
                                                         for a in plan["regions"]["aux"]]))
        # compared as JSON stores it (a tuple-valued template parameter reads back as a list)
        if stored != json.loads(json.dumps(program.launch_plan())):
            raise EmberError(f"vulkan: the launch plan does not match graph {graph.name!r} as rendered now")
        spirv = {}
        for s, entry in zip(program.shaders, plan["shaders"]):
            blob = blobs.get(entry.get("file", f"spirv/{s.sha256}.spv"))
            if blob is None:
                raise EmberError(f"vulkan: the plan's SPIR-V for {s.describe()} is missing")
            if "spirv_sha256" in entry and hashlib.sha256(blob).hexdigest() != entry["spirv_sha256"]:
                raise EmberError(f"vulkan: the SPIR-V of {s.describe()} does not match its checksum")
            spirv[s.sha256] = blob
        return self._executable(graph, program, spirv)

    def _executable(self, graph, program, spirv) -> "VulkanExecutable":
        device = self.device
        pipelines = [device.pipeline(spirv[s.sha256], s.binding_kinds, s.push_bytes, s.describe())
                     for s in program.shaders]
        device.save_pipeline_cache()
        return VulkanExecutable(self, graph, program, pipelines)


class _ConstantStore:
    """Device buffers of constant arrays, shared by executables and freed with the last user.
    A read-only array that does not own its data (a weight in the memory-mapped GGUF) is found
    by its identity; any other (an array a pass made anew, e.g. fused weights, or one a caller
    may still change) by a digest of its bytes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_identity: dict[tuple, str] = {}
        self.entries: dict[str, list] = {}          # digest -> [buffer, users, arrays]

    @staticmethod
    def _identity(a: np.ndarray) -> tuple:
        return (a.__array_interface__["data"][0], a.nbytes, a.dtype.str, a.shape, a.strides)

    def acquire(self, device, array: np.ndarray):
        data = np.ascontiguousarray(array)
        with self.lock:
            ident = self._identity(array)
            immutable = not array.flags.writeable and not array.flags.owndata
            digest = self.by_identity.get(ident) if immutable else None
            if digest is None:
                digest = hashlib.blake2b(data.view(np.uint8).reshape(-1), digest_size=20).hexdigest() + \
                    f"/{data.nbytes}" if not immutable else f"id/{ident}"
                if immutable:
                    self.by_identity[ident] = digest
            entry = self.entries.get(digest)
            if entry is None:
                buffer = device.buffer(data.nbytes)
                buffer.array[:data.nbytes] = data.view(np.uint8).reshape(-1)
                entry = self.entries[digest] = [buffer, 0, []]
            entry[1] += 1
            if immutable:
                entry[2].append(array)   # keeps the identity valid while the entry lives
            return digest, entry[0]

    def release(self, digest: str):
        with self.lock:
            entry = self.entries.get(digest)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                for a in entry[2]:
                    if self.by_identity.get(self._identity(a)) == digest:
                        del self.by_identity[self._identity(a)]
                del self.entries[digest]
                entry[0].close()


class VulkanResidentStore(ResidentStore):
    """Resident cache arrays as device buffers (host-visible, as every ember Vulkan buffer: a
    sync is a copy through the mapping). A buffer has REGION_ALIGNMENT spare bytes, as an input
    region has, since a binding's range may be rounded past the view's last byte."""

    def __init__(self, device, transfers: TransferStats):
        super().__init__(transfers)
        self.device = device

    def _allocate(self, root: np.ndarray):
        buffer = self.device.buffer(root.nbytes + REGION_ALIGNMENT)
        buffer.array[:root.nbytes] = root_bytes(root)
        return buffer

    def _upload(self, entry, root: np.ndarray):
        entry.buffer.array[:entry.nbytes] = root_bytes(root)

    def _download(self, entry, root: np.ndarray):
        root_bytes(root)[...] = entry.buffer.array[:entry.nbytes]

    def _free(self, entry):
        entry.buffer.close()


class VulkanExecutable(Executable):
    backend_name = "vulkan"

    def __init__(self, backend: VulkanBackend, graph: Graph, program: VulkanProgram, pipelines):
        self.backend = backend
        self.graph = graph
        self.program = program
        self.planned_peak_bytes = program.plan.peak_bytes
        self.status_messages = program.status_messages
        self.transfers = backend.transfers
        self.device = backend.device
        self._lock = threading.Lock()
        g = program.graph
        self._declare_signature(g.inputs, [host_storage(node.type) for node in g.outputs])
        self.in_place_outputs = {k: g.inputs[i].name for k, i in program.in_place.items()}
        # Set before anything can fail, so that close() finds them whatever __init__ reached.
        self._resources = []   # closed in reverse order
        self._runs = weakref.WeakSet()   # bound runs, closed with the executable
        self._finalizer = None
        self._single = None    # profile's command buffers, one per dispatch (made on first use)
        try:
            self._allocate(backend, program)
            self._record(pipelines)
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, _close_all, self._resources)

    def __repr__(self) -> str:
        return (f"<VulkanExecutable {self.graph.name!r}: {len(self.program.dispatches)} dispatches, "
                f"{len(self.program.shaders)} shaders, {self.program.n_barriers} barriers, "
                f"arena {self.planned_peak_bytes} bytes>")

    # ---- set-up ------------------------------------------------------------------------------
    def _allocate(self, backend: VulkanBackend, program: VulkanProgram):
        device = self.device
        g = program.graph
        self._regions: dict[tuple[str, int], tuple] = {}   # (region, index) -> (buffer, base)

        def pack(region, indices):
            offsets, total = [], 0
            for i in indices:
                offsets.append(total)
                total += _round_up(max(program.region_bytes(region, i), 16), REGION_ALIGNMENT)
            buffer = self._own(device.buffer(total))
            for i, off in zip(indices, offsets):
                self._regions[(region, i)] = (buffer, off)
            return buffer

        # The inputs a step updates in place (the KV caches) get their regions on first use
        # (_ensure_cache_regions): a bound run keeps them in the backend's resident store, so
        # its step graph holds no device copy of its own.
        self._lazy_inputs = sorted(set(program.in_place.values()))
        pack("in", [i for i in range(len(g.inputs)) if i not in self._lazy_inputs])
        pack("out", range(len(g.outputs)))
        pack("aux", range(len(program.aux)))
        for j, a in enumerate(program.aux):
            buffer, off = self._regions[("aux", j)]
            buffer.array[off:off + a.nbytes] = a.view(np.uint8).reshape(-1)
        self._arena = self._own(device.buffer(program.plan.peak_bytes))
        self._regions[("arena", 0)] = (self._arena, 0)
        self._status = self._own(device.buffer(4))
        self._regions[("status", 0)] = (self._status, 0)
        self._status_word = self._status.view(0, (1,), np.uint32)
        store = backend._constants
        for j, node in enumerate(program.constants):
            digest, buffer = store.acquire(device, g.constant_data(node))
            self._resources.append(_Release(store, digest))
            self._regions[("const", j)] = (buffer, 0)
        # host views of the inputs and outputs
        self._input_views = [None] * len(g.inputs)
        self._output_views = [None] * len(g.outputs)
        self._make_views()

    def _make_views(self):
        """Host views of the inputs and outputs whose regions exist (all but lazy ones)."""
        program = self.program
        for i, node in enumerate(program.graph.inputs):
            if self._input_views[i] is None and ("in", i) in self._regions:
                buffer, off = self._regions[("in", i)]
                self._input_views[i] = buffer.view(off, *host_storage(node.type))
        for k, (shape, dtype) in enumerate(self._output_specs):
            src = program.output_sources[k]
            if self._output_views[k] is None and (src.region, src.index) in self._regions:
                buffer, off = self._regions[(src.region, src.index)]
                self._output_views[k] = buffer.view(off + src.offset, shape, dtype)

    def _ensure_cache_regions(self):
        """Give the in-place inputs their own regions (a plain run, or a bound run whose
        cache could not be made resident, copies them in and out)."""
        for i in self._lazy_inputs:
            if ("in", i) not in self._regions:
                nbytes = _round_up(max(self.program.region_bytes("in", i), 16), REGION_ALIGNMENT)
                self._regions[("in", i)] = (self._own(self.device.buffer(nbytes)), 0)
        self._make_views()

    def _plain_command_buffer(self):
        """The command buffer of run(): recorded once, on first use when it needs lazy regions."""
        if self._command_buffer is None:
            self._ensure_cache_regions()
            self._sets, self._command_buffer = self._encode(self._regions, self._resources)
        return self._command_buffer

    def _own(self, resource):
        self._resources.append(resource)
        return resource

    def _record(self, pipelines):
        vk = self.device.vk
        self._pipelines = pipelines   # kept alive with the command buffers that use them
        self._sets = self._command_buffer = None
        if not self._lazy_inputs:
            self._plain_command_buffer()
        fence_info = vk.VkFenceCreateInfo()
        self._fence = vk.vkCreateFence(self.device.handle, fence_info, None)
        self._resources.append(_Destroy(vk.vkDestroyFence, self.device.handle, self._fence))

    def _encode(self, regions: Mapping[tuple, tuple], resources: list):
        """Descriptor sets over regions ((region, index) -> (buffer, base)) and the command
        buffer of every dispatch, recorded once; the objects made go to resources."""
        vk = self.device.vk
        dev = self.device.handle
        pipelines = self._pipelines
        dispatches = self.program.dispatches
        n_storage = sum(b.kind == "storage" for d in dispatches for b in d.bindings)
        n_texel = sum(b.kind == "texel" for d in dispatches for b in d.bindings)
        pool_sizes = [vk.VkDescriptorPoolSize(type=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                              descriptorCount=max(1, n_storage)),
                      vk.VkDescriptorPoolSize(type=vk.VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER,
                                              descriptorCount=max(1, n_texel))]
        pool_info = vk.VkDescriptorPoolCreateInfo(maxSets=max(1, len(dispatches)), poolSizeCount=2,
                                                  pPoolSizes=pool_sizes)
        pool = vk.vkCreateDescriptorPool(dev, pool_info, None)
        resources.append(_Destroy(vk.vkDestroyDescriptorPool, dev, pool))
        sets = []
        if dispatches:
            layouts = [pipelines[d.shader].set_layout for d in dispatches]
            alloc = vk.VkDescriptorSetAllocateInfo(descriptorPool=pool, descriptorSetCount=len(layouts),
                                                   pSetLayouts=layouts)
            sets = vk.vkAllocateDescriptorSets(dev, alloc)
            infos, writes, views = [], [], {}
            for d, ds in zip(dispatches, sets):
                for i, b in enumerate(d.bindings):
                    buffer, base = regions[(b.region, b.index)]
                    if b.kind == "texel":
                        key = (id(buffer), base + b.offset, b.size)
                        if key not in views:
                            view_info = vk.VkBufferViewCreateInfo(buffer=buffer.handle, format=vk.VK_FORMAT_R32_UINT,
                                                                  offset=base + b.offset, range=b.size)
                            views[key] = vk.vkCreateBufferView(dev, view_info, None)
                            resources.append(_Destroy(vk.vkDestroyBufferView, dev, views[key]))
                        writes.append(vk.VkWriteDescriptorSet(
                            dstSet=ds, dstBinding=i, descriptorCount=1,
                            descriptorType=vk.VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER,
                            pTexelBufferView=[views[key]]))
                        continue
                    info = vk.VkDescriptorBufferInfo(buffer=buffer.handle, offset=base + b.offset, range=b.size)
                    infos.append(info)
                    writes.append(vk.VkWriteDescriptorSet(
                        dstSet=ds, dstBinding=i, descriptorCount=1,
                        descriptorType=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, pBufferInfo=[info]))
            vk.vkUpdateDescriptorSets(dev, len(writes), writes, 0, None)
            del infos, writes, alloc

        cb = self.device.allocate_command_buffer()
        resources.append(_FreeCommandBuffer(self.device, cb))
        vk.vkBeginCommandBuffer(cb, vk.VkCommandBufferBeginInfo())
        compute = vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT
        between = vk.VkMemoryBarrier(srcAccessMask=vk.VK_ACCESS_SHADER_WRITE_BIT,
                                     dstAccessMask=vk.VK_ACCESS_SHADER_READ_BIT | vk.VK_ACCESS_SHADER_WRITE_BIT)
        bound = None
        for d, ds in zip(dispatches, sets):
            pipeline = pipelines[d.shader]
            if d.barrier:
                vk.vkCmdPipelineBarrier(cb, compute, compute, 0, 1, [between], 0, None, 0, None)
            if bound is not pipeline:
                vk.vkCmdBindPipeline(cb, vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipeline.handle)
                bound = pipeline
            vk.vkCmdBindDescriptorSets(cb, vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipeline.layout, 0, 1, [ds], 0, None)
            if d.push:
                push = vk.ffi.from_buffer(d.push)
                vk.vkCmdPushConstants(cb, pipeline.layout, vk.VK_SHADER_STAGE_COMPUTE_BIT, 0, len(d.push), push)
            vk.vkCmdDispatch(cb, *d.groups)
        to_host = vk.VkMemoryBarrier(srcAccessMask=vk.VK_ACCESS_SHADER_WRITE_BIT,
                                     dstAccessMask=vk.VK_ACCESS_HOST_READ_BIT)
        vk.vkCmdPipelineBarrier(cb, compute, vk.VK_PIPELINE_STAGE_HOST_BIT, 0, 1, [to_host], 0, None, 0, None)
        vk.vkEndCommandBuffer(cb)
        return sets, cb

    # ---- running -----------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray],
            outputs: Mapping[int, np.ndarray] | None = None) -> list[np.ndarray]:
        """Copy every input in, run, copy every output out. An input that is resident (a bound
        run's cache) is brought to the host first, and written back after an in-place update,
        so the host arrays are the truth for this path."""
        store = self.backend._resident
        arrays, results = plain_run_inputs(self, store, inputs, outputs)
        with self._lock:
            command_buffer = self._plain_command_buffer()
            for view, value in zip(self._input_views, arrays):
                view[...] = value
            self._status_word[0] = 0
            self.device.submit_and_wait(command_buffer, self._fence)
            self._check_status(int(self._status_word[0]))
            for out, view in zip(results, self._output_views):
                out[...] = view
        self.transfers.uploaded += sum(a.nbytes for a in arrays)
        self.transfers.downloaded += sum(r.nbytes for r in results)
        plain_run_done(self, store, outputs)
        return results

    def bind(self, inputs: Mapping[str, np.ndarray],
             outputs: Mapping[int, np.ndarray] | None = None) -> "VulkanRun":
        """The inputs and outputs checked once: a callable run(fresh=(), inputs=None) -> outputs,
        as Executable.bind. An output given as the very array of the input it updates in place
        (in_place_outputs: the caches) makes that input resident on the device; see VulkanRun."""
        def acquire(array):
            # a binding's offset into the view stays aligned as it is in the packed input buffer
            return self.backend.resident.acquire(array, alignment=REGION_ALIGNMENT)
        run = VulkanRun(self, *bind_resident(self, inputs, outputs, acquire))
        self._runs.add(run)
        return run

    def profile(self, inputs: Mapping[str, np.ndarray], repeats: int = 1) -> list[tuple[str, str, float]]:
        """(op, label, seconds) of each dispatch, each submitted alone (after the ones before it,
        so its inputs are real) and timed on the host: the mean of `repeats` submits. Slower than
        run (a submit per dispatch); for benchmarks."""
        arrays = self._checked_inputs(inputs)
        with self._lock:
            self._plain_command_buffer()     # the descriptor sets _record_one binds
            for view, value in zip(self._input_views, arrays):
                view[...] = value
            self._status_word[0] = 0
            if self._single is None:
                self._single = [self._record_one(i) for i in range(len(self.program.dispatches))]
            times = []
            for d, cb in zip(self.program.dispatches, self._single):
                start = time.perf_counter()
                for _ in range(repeats):
                    self.device.submit_and_wait(cb, self._fence)
                times.append((d.op, d.label, (time.perf_counter() - start) / repeats))
        return times

    def _record_one(self, i: int):
        vk = self.device.vk
        d = self.program.dispatches[i]
        pipeline = self._pipelines[d.shader]
        cb = self.device.allocate_command_buffer()
        self._resources.append(_FreeCommandBuffer(self.device, cb))
        vk.vkBeginCommandBuffer(cb, vk.VkCommandBufferBeginInfo())
        vk.vkCmdBindPipeline(cb, vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipeline.handle)
        vk.vkCmdBindDescriptorSets(cb, vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipeline.layout, 0, 1,
                                   [self._sets[i]], 0, None)
        if d.push:
            vk.vkCmdPushConstants(cb, pipeline.layout, vk.VK_SHADER_STAGE_COMPUTE_BIT, 0, len(d.push),
                                  vk.ffi.from_buffer(d.push))
        vk.vkCmdDispatch(cb, *d.groups)
        vk.vkEndCommandBuffer(cb)
        return cb

    def close(self):
        """Free the executable's device objects now (else when it is garbage collected)."""
        for run in list(self._runs):
            run.close()
        if self._finalizer is not None:
            self._finalizer()
        else:
            _close_all(self._resources)


class VulkanRun(BoundInputs):
    """A VulkanExecutable bound to its arrays (VulkanExecutable.bind), with its own descriptor
    sets and command buffer, recorded once and resubmitted on every call. A resident input (a
    KV cache) is bound where its device copy lies, so a call copies in only the other inputs and
    out only the outputs that are not resident. The output list holds the resident targets'
    host arrays as given, whose contents are stale until backend.sync_to_host. `fresh` outputs
    get new arrays each call; `inputs` replaces bound non-resident inputs by name."""

    def __init__(self, executable: VulkanExecutable, inputs: list[np.ndarray], outputs: list[np.ndarray],
                 resident: Mapping[int, tuple]):
        self.executable = executable
        self.inputs, self.outputs = inputs, outputs    # referenced: resident roots stay alive
        self.resident = {i: entry for i, (entry, _) in resident.items()}
        if any(i not in self.resident for i in executable._lazy_inputs):
            executable._ensure_cache_regions()
        regions = dict(executable._regions)
        for i, (entry, offset) in resident.items():
            regions[("in", i)] = (entry.buffer, offset)
        self._resources = []
        self._finalizer = weakref.finalize(self, _close_all, self._resources)
        _, self._command_buffer = executable._encode(regions, self._resources)
        in_place = executable.program.in_place
        self._copies_in = [i for i in range(len(inputs)) if i not in self.resident]
        self._copies_out = [k for k in range(len(outputs)) if in_place.get(k) not in self.resident]

    def __call__(self, fresh=(), inputs: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        exe = self.executable
        self._begin(fresh, inputs)
        up = down = 0
        with exe._lock:
            for i in self._copies_in:
                exe._input_views[i][...] = self.inputs[i]
                up += self.inputs[i].nbytes
            exe._status_word[0] = 0
            exe.device.submit_and_wait(self._command_buffer, exe._fence)
            for entry in self.resident.values():
                entry.device_newer = True
            exe._check_status(int(exe._status_word[0]))
            for k in self._copies_out:
                self.outputs[k][...] = exe._output_views[k]
                down += self.outputs[k].nbytes
        exe.transfers.uploaded += up
        exe.transfers.downloaded += down
        return list(self.outputs)


    def close(self):
        """Free the run's descriptor sets and command buffer now."""
        self._finalizer()


def _close_all(resources: list):
    while resources:
        resources.pop().close()


class _Destroy:
    def __init__(self, fn, device, handle):
        self.fn, self.device, self.handle = fn, device, handle

    def close(self):
        self.fn(self.device, self.handle, None)


class _FreeCommandBuffer:
    def __init__(self, device, cb):
        self.device, self.cb = device, cb

    def close(self):
        self.device.free_command_buffer(self.cb)


class _Release:
    def __init__(self, store: _ConstantStore, digest: str):
        self.store, self.digest = store, digest

    def close(self):
        self.store.release(self.digest)



def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m
