"""The Vulkan device, through the PyPI `vulkan` package (cffi): instance and device selection,
host-visible buffers, compute pipelines (with a VkPipelineCache kept on disk) and one-shot
submission of recorded command buffers.

Create-info structs hold pointers to memory the package allocates for them (names, arrays,
nested structs); each is kept in a local variable until the call that reads it returns.

The `vulkan` module is imported on first use: a host without a Vulkan loader or driver gets a
BackendUnavailable that says what is missing, not an ImportError.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import threading
from pathlib import Path

import numpy as np

from ember.codegen.vulkan_plan import DeviceCaps
from ember.errors import BackendUnavailable, EmberError
from ember.files import atomic_write_bytes

API_VERSION = (1, 2, 0)
DEVICE_TYPE_PREFERENCE = {2: 0, 1: 1, 3: 2, 4: 3}    # discrete, integrated, virtual, cpu
DEVICE_TYPE_NAME = {0: "other", 1: "integrated GPU", 2: "discrete GPU", 3: "virtual GPU", 4: "CPU"}
INSTALL_HINT = ("install a Vulkan driver and loader (Debian/Ubuntu: `apt-get install libvulkan1 "
                "mesa-vulkan-drivers` gives lavapipe, a CPU implementation) and PyPI `vulkan`")


@functools.lru_cache(maxsize=None)
def vulkan_module():
    """The `vulkan` package, or BackendUnavailable naming what is missing."""
    try:
        import vulkan
    except ImportError as e:
        raise BackendUnavailable(f"vulkan backend: PyPI package `vulkan` is not installed ({e}); "
                                 f"{INSTALL_HINT}") from None
    except OSError as e:   # the package loads libvulkan.so.1 on import
        raise BackendUnavailable(f"vulkan backend: no Vulkan loader (libvulkan.so.1): {e}; "
                                 f"{INSTALL_HINT}") from None
    return vulkan


def _check(vk, result, what: str):
    if result != vk.VK_SUCCESS:
        raise EmberError(f"vulkan: {what} failed with VkResult {result}")


class Buffer:
    """A host-visible, host-coherent storage buffer, mapped for its whole life; `array` is a
    uint8 NumPy view of its bytes."""

    def __init__(self, device: "Device", nbytes: int):
        vk = device.vk
        self.device = device
        self.nbytes = max(16, -(-nbytes // 16) * 16)
        info = vk.VkBufferCreateInfo(
            size=self.nbytes, sharingMode=vk.VK_SHARING_MODE_EXCLUSIVE,
            usage=vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_UNIFORM_TEXEL_BUFFER_BIT
            | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT)
        self.handle = vk.vkCreateBuffer(device.handle, info, None)
        self.memory = None
        try:
            req = vk.vkGetBufferMemoryRequirements(device.handle, self.handle)
            alloc = vk.VkMemoryAllocateInfo(allocationSize=req.size,
                                            memoryTypeIndex=device.memory_type(req.memoryTypeBits))
            try:
                self.memory = vk.vkAllocateMemory(device.handle, alloc, None)
            except vk.VkError as e:
                raise EmberError(f"vulkan: cannot allocate a buffer of {self.nbytes} bytes on "
                                 f"{device.name}: {type(e).__name__}") from None
            vk.vkBindBufferMemory(device.handle, self.handle, self.memory, 0)
            mapped = vk.vkMapMemory(device.handle, self.memory, 0, self.nbytes, 0)
            self.array = np.frombuffer(mapped, dtype=np.uint8, count=self.nbytes)
        except BaseException:
            self.close()
            raise

    def view(self, offset: int, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        return self.array[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)

    def close(self):
        vk = self.device.vk
        if self.memory is not None:
            self.array = None
            vk.vkUnmapMemory(self.device.handle, self.memory)
            vk.vkFreeMemory(self.device.handle, self.memory, None)
            self.memory = None
        if self.handle is not None:
            vk.vkDestroyBuffer(self.device.handle, self.handle, None)
            self.handle = None


DESCRIPTOR_TYPE = {"storage": "VK_DESCRIPTOR_TYPE_STORAGE_BUFFER", "texel": "VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER"}


class Pipeline:
    """A compute pipeline for one SPIR-V module: bindings in set 0 (storage buffers or uniform
    texel buffers, by kind) and a push-constant range."""

    def __init__(self, device: "Device", spirv: bytes, kinds: tuple, push_bytes: int, label: str):
        vk = device.vk
        self.device = device
        self.label = label
        module_info = vk.VkShaderModuleCreateInfo(codeSize=len(spirv), pCode=spirv)
        self.module = vk.vkCreateShaderModule(device.handle, module_info, None)
        layout_bindings = [vk.VkDescriptorSetLayoutBinding(
            binding=i, descriptorType=getattr(vk, DESCRIPTOR_TYPE[kind]), descriptorCount=1,
            stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT) for i, kind in enumerate(kinds)]
        set_info = vk.VkDescriptorSetLayoutCreateInfo(bindingCount=len(kinds), pBindings=layout_bindings)
        self.set_layout = vk.vkCreateDescriptorSetLayout(device.handle, set_info, None)
        ranges = [vk.VkPushConstantRange(stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT, offset=0,
                                         size=push_bytes)] if push_bytes else []
        layout_info = vk.VkPipelineLayoutCreateInfo(setLayoutCount=1, pSetLayouts=[self.set_layout],
                                                    pushConstantRangeCount=len(ranges),
                                                    pPushConstantRanges=ranges or None)
        self.layout = vk.vkCreatePipelineLayout(device.handle, layout_info, None)
        stage = vk.VkPipelineShaderStageCreateInfo(stage=vk.VK_SHADER_STAGE_COMPUTE_BIT,
                                                   module=self.module, pName="main")
        info = vk.VkComputePipelineCreateInfo(stage=stage, layout=self.layout)
        try:
            self.handle = vk.vkCreateComputePipelines(device.handle, device.pipeline_cache, 1, [info], None)[0]
        except vk.VkError as e:
            raise EmberError(f"vulkan: creating the pipeline of {label} failed: {type(e).__name__}") from None
        del stage, info, module_info, layout_info, set_info, layout_bindings, ranges
        self.kinds = tuple(kinds)
        self.push_bytes = push_bytes


class Device:
    """One Vulkan device with a compute queue. `caps` is what the renderer may use.

    Opening it is a few named steps, in order: the instance, the physical device (with a
    compute queue family), what it supports (DeviceCaps), the logical device with the storage
    features it reported and its queue, then the command pool and pipeline cache."""

    def __init__(self, index: int | None = None, cache_dir: Path | None = None):
        self.vk = vulkan_module()
        self.lock = threading.Lock()
        self.instance = self._create_instance()
        try:
            self._choose_physical_device(index)
        except BaseException:
            self.vk.vkDestroyInstance(self.instance, None)
            raise
        self.caps = self._query_caps()
        self.handle, self.queue = self._create_logical_device()
        self.command_pool = self._create_command_pool()
        self._memory_props = self.vk.vkGetPhysicalDeviceMemoryProperties(self.physical)
        self.pipelines: dict[str, Pipeline] = {}
        self.pipelines_created = 0
        self.cache_path = None
        self.pipeline_cache = self._load_pipeline_cache(cache_dir)
        self._cache_dirty = False

    def _create_instance(self):
        vk = self.vk
        app = vk.VkApplicationInfo(pApplicationName="ember", applicationVersion=1, pEngineName="ember",
                                   engineVersion=1, apiVersion=vk.VK_MAKE_VERSION(*API_VERSION))
        info = vk.VkInstanceCreateInfo(pApplicationInfo=app)
        try:
            return vk.vkCreateInstance(info, None)
        except vk.VkError as e:
            raise BackendUnavailable(f"vulkan backend: no Vulkan driver ({type(e).__name__} from "
                                     f"vkCreateInstance); {INSTALL_HINT}") from None
        finally:
            del app, info

    def _choose_physical_device(self, index: int | None) -> None:
        """The device asked for by index, else the preferred type (discrete GPU first), among
        those with a compute queue family; sets index, physical, queue_family and what the
        properties say (name, type, versions, limits)."""
        vk = self.vk
        try:
            physical = vk.vkEnumeratePhysicalDevices(self.instance)
        except vk.VkError:
            physical = []
        candidates = []
        for i, pd in enumerate(physical):
            props = vk.vkGetPhysicalDeviceProperties(pd)
            families = vk.vkGetPhysicalDeviceQueueFamilyProperties(pd)
            queue = next((q for q, f in enumerate(families) if f.queueFlags & vk.VK_QUEUE_COMPUTE_BIT), None)
            if queue is not None:
                candidates.append((i, pd, props, queue))
        if not candidates:
            raise BackendUnavailable(f"vulkan backend: no Vulkan device with a compute queue "
                                     f"({len(physical)} device(s) found); {INSTALL_HINT}")
        if index is not None:
            chosen = [c for c in candidates if c[0] == index]
            if not chosen:
                raise BackendUnavailable(f"vulkan backend: no Vulkan device {index} "
                                         f"(devices: {[c[0] for c in candidates]})")
        else:
            chosen = sorted(candidates, key=lambda c: DEVICE_TYPE_PREFERENCE.get(c[2].deviceType, 9))
        self.index, self.physical, props, self.queue_family = chosen[0]
        self.name = props.deviceName if isinstance(props.deviceName, str) else vk.ffi.string(props.deviceName).decode()
        self.type = DEVICE_TYPE_NAME.get(props.deviceType, "other")
        self.api_version = props.apiVersion
        self.driver_version = props.driverVersion
        self.pipeline_cache_uuid = bytes(props.pipelineCacheUUID).hex()
        # limits is a view into the properties struct's memory: keep that struct alive with it
        self.properties = props
        self.limits = props.limits

    def _query_caps(self) -> DeviceCaps:
        """What the renderer may use: 8/16-bit storage (core in 1.2 / 1.1), subgroup arithmetic
        in compute, uniform texel buffers of r32ui, fp64 in shaders, and the limits it sizes bindings
        by."""
        vk = self.vk
        f16 = vk.VkPhysicalDevice16BitStorageFeatures()
        f8 = vk.VkPhysicalDevice8BitStorageFeatures(pNext=f16)
        features2 = vk.VkPhysicalDeviceFeatures2(pNext=f8)
        vk.vkGetPhysicalDeviceFeatures2(self.physical, features2)
        storage16 = bool(f16.storageBuffer16BitAccess)
        storage8 = bool(f8.storageBuffer8BitAccess)
        float64 = bool(features2.features.shaderFloat64)
        del features2, f8, f16
        sub = vk.VkPhysicalDeviceSubgroupProperties()
        props2 = vk.VkPhysicalDeviceProperties2(pNext=sub)
        vk.vkGetPhysicalDeviceProperties2(self.physical, props2)
        arithmetic = bool(sub.supportedOperations & vk.VK_SUBGROUP_FEATURE_ARITHMETIC_BIT) and \
            bool(sub.supportedStages & vk.VK_SHADER_STAGE_COMPUTE_BIT)
        subgroup_size = int(sub.subgroupSize) if arithmetic else 0
        del props2, sub
        texel_features = vk.vkGetPhysicalDeviceFormatProperties(self.physical, vk.VK_FORMAT_R32_UINT).bufferFeatures
        texel = bool(texel_features & vk.VK_FORMAT_FEATURE_UNIFORM_TEXEL_BUFFER_BIT)
        limits = self.limits
        return DeviceCaps(
            device=self.name, storage8=storage8, storage16=storage16, subgroup_size=subgroup_size,
            max_storage_range=int(limits.maxStorageBufferRange),
            offset_alignment=int(limits.minStorageBufferOffsetAlignment),
            push_bytes=min(int(limits.maxPushConstantsSize), 128),
            max_group_count=min(int(limits.maxComputeWorkGroupCount[0]), int(limits.maxComputeWorkGroupCount[1])),
            texel_buffers=texel, max_texel_bytes=4 * int(limits.maxTexelBufferElements) if texel else 0,
            texel_alignment=int(limits.minTexelBufferOffsetAlignment), float64=float64)

    def _create_logical_device(self):
        """(device, its compute queue), with the storage features the caps say it has."""
        vk = self.vk
        storage8, storage16 = self.caps.storage8, self.caps.storage16
        e16 = vk.VkPhysicalDevice16BitStorageFeatures(storageBuffer16BitAccess=storage16)
        e8 = vk.VkPhysicalDevice8BitStorageFeatures(pNext=e16, storageBuffer8BitAccess=storage8)
        extensions = []
        if storage8 and self.api_version < vk.VK_MAKE_VERSION(1, 2, 0):
            extensions.append("VK_KHR_8bit_storage")
        queue_info = vk.VkDeviceQueueCreateInfo(queueFamilyIndex=self.queue_family, queueCount=1,
                                                pQueuePriorities=[1.0])
        core = vk.VkPhysicalDeviceFeatures(shaderFloat64=self.caps.float64)
        device_info = vk.VkDeviceCreateInfo(pNext=e8, queueCreateInfoCount=1, pQueueCreateInfos=[queue_info],
                                            enabledExtensionCount=len(extensions),
                                            ppEnabledExtensionNames=extensions or None, pEnabledFeatures=core)
        handle = vk.vkCreateDevice(self.physical, device_info, None)
        del device_info, queue_info, e8, e16, core
        return handle, vk.vkGetDeviceQueue(handle, self.queue_family, 0)

    def _create_command_pool(self):
        vk = self.vk
        pool_info = vk.VkCommandPoolCreateInfo(queueFamilyIndex=self.queue_family,
                                               flags=vk.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT)
        return vk.vkCreateCommandPool(self.handle, pool_info, None)

    def __repr__(self) -> str:
        return f"<vulkan Device {self.index}: {self.name} ({self.type})>"

    # ---- memory ------------------------------------------------------------------------------
    def memory_type(self, type_bits: int) -> int:
        """A host-visible, host-coherent memory type (device-local too when there is one)."""
        vk = self.vk
        want = vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
        best = None
        for i in range(self._memory_props.memoryTypeCount):
            flags = self._memory_props.memoryTypes[i].propertyFlags
            if type_bits & (1 << i) and flags & want == want:
                if flags & vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT:
                    return i
                best = i if best is None else best
        if best is None:
            raise EmberError(f"vulkan: {self.name} has no host-visible coherent memory")
        return best

    def buffer(self, nbytes: int) -> Buffer:
        return Buffer(self, nbytes)

    # ---- pipelines ---------------------------------------------------------------------------
    def pipeline(self, spirv: bytes, kinds, push_bytes: int, label: str) -> Pipeline:
        """The pipeline of a SPIR-V module (one per module and layout in this process)."""
        kinds = tuple(kinds)
        key = hashlib.sha256(spirv + f"/{','.join(kinds)}/{push_bytes}".encode()).hexdigest()
        with self.lock:
            found = self.pipelines.get(key)
            if found is None:
                found = self.pipelines[key] = Pipeline(self, spirv, kinds, push_bytes, label)
                self.pipelines_created += 1
                self._cache_dirty = True
        return found

    def _load_pipeline_cache(self, cache_dir: Path | None):
        vk = self.vk
        data = b""
        if cache_dir is not None:
            ident = hashlib.sha256(f"{self.name}/{self.driver_version}/{self.pipeline_cache_uuid}".encode())
            self.cache_path = Path(cache_dir) / f"pipelines-{ident.hexdigest()[:16]}.bin"
            try:
                data = self.cache_path.read_bytes()
            except OSError:
                data = b""
        for initial in ((data, b"") if data else (b"",)):
            info = vk.VkPipelineCacheCreateInfo(initialDataSize=len(initial),
                                                pInitialData=vk.ffi.from_buffer(initial) if initial else None)
            try:
                return vk.vkCreatePipelineCache(self.handle, info, None)
            except vk.VkError:
                continue   # a corrupt file: start empty
        raise EmberError("vulkan: vkCreatePipelineCache failed")

    def save_pipeline_cache(self):
        """Write the pipeline cache to disk (temporary file, then rename) when it grew."""
        if self.cache_path is None or not self._cache_dirty:
            return
        vk = self.vk
        size = vk.ffi.new("size_t *")
        _check(vk, vk.lib.vkGetPipelineCacheData(self.handle, self.pipeline_cache, size, vk.ffi.NULL),
               "vkGetPipelineCacheData")
        data = vk.ffi.new("char[]", size[0])
        _check(vk, vk.lib.vkGetPipelineCacheData(self.handle, self.pipeline_cache, size, data),
               "vkGetPipelineCacheData")
        atomic_write_bytes(self.cache_path, bytes(vk.ffi.buffer(data, size[0])))
        self._cache_dirty = False

    # ---- command buffers ---------------------------------------------------------------------
    def allocate_command_buffer(self):
        """A primary command buffer from the device's pool (the pool is used under the lock:
        Vulkan wants its users synchronized)."""
        vk = self.vk
        info = vk.VkCommandBufferAllocateInfo(commandPool=self.command_pool,
                                              level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1)
        with self.lock:
            return vk.vkAllocateCommandBuffers(self.handle, info)[0]

    def free_command_buffer(self, command_buffer):
        with self.lock:
            self.vk.vkFreeCommandBuffers(self.handle, self.command_pool, 1, [command_buffer])

    # ---- submission --------------------------------------------------------------------------
    def submit_and_wait(self, command_buffer, fence):
        vk = self.vk
        submit = vk.VkSubmitInfo(commandBufferCount=1, pCommandBuffers=[command_buffer])
        try:
            with self.lock:
                vk.vkResetFences(self.handle, 1, [fence])
                vk.vkQueueSubmit(self.queue, 1, [submit], fence)
            vk.vkWaitForFences(self.handle, 1, [fence], vk.VK_TRUE, 0xFFFFFFFFFFFFFFFF)
        except vk.VkError as e:
            raise EmberError(f"vulkan: running on {self.name} failed: {type(e).__name__}") from None
        del submit


_DEVICES: dict[tuple, Device] = {}
_DEVICES_LOCK = threading.Lock()


def get_device(index: int | None = None, cache_dir: Path | None = None) -> Device:
    """The process-wide Device (created once per index; its pipeline cache is saved at exit)."""
    key = (index, str(cache_dir) if cache_dir else None)
    with _DEVICES_LOCK:
        if key not in _DEVICES:
            device = Device(index, cache_dir)
            _DEVICES[key] = device
            atexit.register(_save_quietly, device)
        return _DEVICES[key]


def _save_quietly(device: Device):
    try:
        device.save_pipeline_cache()
    except Exception:   # noqa: BLE001 - at exit, a cache that cannot be written is only lost
        pass
