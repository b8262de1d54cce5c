"""OpenCL devices: listing them through pyopencl, choosing one, and what it can do.

A device is chosen by index or by part of its name (default: the first GPU, else the first
device), and a rendering profile for it (ember.codegen.opencl): "auto" picks adreno on an Adreno
GPU with fp16 and subgroups, else generic. Imports pyopencl only inside functions, so the
module loads (and says why the backend is unavailable) where pyopencl is missing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ember.codegen.opencl_plan import PROFILE_NAMES, Profile, adreno_generation, adreno_profile, generic_profile
from ember.errors import BackendUnavailable, EmberError

NO_PLATFORM = ("no OpenCL platform found: install an OpenCL driver (ICD), e.g. "
               "`apt-get install pocl-opencl-icd` for the CPU; `clinfo` lists what the ICD loader sees")


@dataclass(frozen=True)
class DeviceInfo:
    index: int                    # position in list_devices()
    platform: str
    platform_version: str
    name: str
    vendor: str
    version: str
    driver: str
    opencl_c: str
    is_gpu: bool
    extensions: frozenset
    image_support: bool
    image_max_buffer_size: int    # texels of an image1d_buffer_t
    max_alloc_bytes: int
    max_work_group_size: int
    local_mem_bytes: int

    @property
    def fp16(self) -> bool:
        return "cl_khr_fp16" in self.extensions

    @property
    def fp64(self) -> bool:
        return "cl_khr_fp64" in self.extensions

    @property
    def subgroups(self) -> bool:
        return "cl_khr_subgroups" in self.extensions

    @property
    def identity(self) -> str:
        """Everything a compiled program binary depends on besides its source and options."""
        return "\n".join((self.platform, self.platform_version, self.name, self.vendor, self.version,
                          self.driver, self.opencl_c))

    def describe(self) -> str:
        return f"{self.name} ({self.platform}, {self.version}, driver {self.driver})"


def _info(index: int, device) -> DeviceInfo:
    import pyopencl as cl
    platform = device.platform
    return DeviceInfo(
        index=index, platform=platform.name.strip(), platform_version=platform.version.strip(),
        name=device.name.strip(), vendor=device.vendor.strip(), version=device.version.strip(),
        driver=device.driver_version.strip(), opencl_c=device.opencl_c_version.strip(),
        is_gpu=bool(device.type & cl.device_type.GPU), extensions=frozenset(device.extensions.split()),
        image_support=bool(device.image_support),
        image_max_buffer_size=int(device.get_info(cl.device_info.IMAGE_MAX_BUFFER_SIZE)) if device.image_support else 0,
        max_alloc_bytes=int(device.max_mem_alloc_size), max_work_group_size=int(device.max_work_group_size),
        local_mem_bytes=int(device.local_mem_size))


def list_devices() -> list:
    """[(pyopencl device, DeviceInfo)] of every platform. Raises BackendUnavailable when pyopencl
    is missing or no platform is installed."""
    try:
        import pyopencl as cl
    except ImportError as e:
        raise BackendUnavailable(f"pyopencl is not installed (`pip install pyopencl`): {e}") from e
    try:
        platforms = cl.get_platforms()
    except cl.Error as e:
        detail = str(e).strip()
        raise BackendUnavailable(NO_PLATFORM + (f" ({detail})" if detail else "")) from e
    devices = []
    for platform in platforms:
        try:
            found = platform.get_devices()
        except cl.Error:
            continue
        for device in found:
            devices.append((device, _info(len(devices), device)))
    if not devices:
        raise BackendUnavailable(NO_PLATFORM)
    return devices


def select_device(spec=None):
    """(device, DeviceInfo) for spec: None (the first GPU, else the first device), an index into
    list_devices(), or part of a device name (case-insensitive)."""
    devices = list_devices()
    if spec is None:
        return next(((d, i) for d, i in devices if i.is_gpu), devices[0])
    if isinstance(spec, int):
        if 0 <= spec < len(devices):
            return devices[spec]
    else:
        for d, i in devices:
            if str(spec).lower() in i.name.lower():
                return d, i
    names = "; ".join(f"{i.index}: {i.name}" for _, i in devices)
    raise BackendUnavailable(f"no OpenCL device matches {spec!r}; devices: {names}")


def choose_profile(info: DeviceInfo, requested="auto", **overrides) -> Profile:
    """The rendering profile for a device. requested: "auto", a profile name or a Profile;
    overrides: Profile fields (e.g. soa_min_rows) applied to a named profile."""
    if isinstance(requested, Profile):
        profile = requested
    else:
        generation = adreno_generation(info.name)
        if requested == "auto":
            requested = "adreno" if generation and info.fp16 and info.subgroups and info.image_support else "generic"
        if requested == "generic":
            profile = generic_profile(fp64=info.fp64)
        elif requested in ("adreno", "adreno-emulated"):
            profile = adreno_profile(generation or "a7xx", emulated=requested == "adreno-emulated")
        else:
            raise EmberError(f"opencl backend: unknown profile {requested!r}; known: auto, {', '.join(PROFILE_NAMES)}")
        if profile.adreno and info.image_support:
            profile = dataclasses.replace(profile, max_image_texels=min(profile.max_image_texels,
                                                                        info.image_max_buffer_size))
        if overrides:
            profile = dataclasses.replace(profile, **overrides)
    missing = profile_requirements(profile, info)
    if missing:
        raise BackendUnavailable(f"opencl backend: profile {profile.name!r} needs {', '.join(missing)}, "
                                 f"which {info.name} lacks")
    return profile


def profile_requirements(profile: Profile, info: DeviceInfo) -> list[str]:
    """What profile needs that the device does not have."""
    missing = []
    if profile.fp16 and not info.fp16:
        missing.append("cl_khr_fp16 (half arithmetic)")
    if profile.subgroups and not info.subgroups:
        missing.append("cl_khr_subgroups")
    if profile.fp64 and not info.fp64:
        missing.append("cl_khr_fp64")
    if profile.adreno and not info.image_support:
        missing.append("images (image1d_buffer_t)")
    return missing
