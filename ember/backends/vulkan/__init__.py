"""The Vulkan backend (backend.py), its device layer over PyPI `vulkan` (device.py) and its
GLSL -> SPIR-V compiler with a disk cache (compiler.py)."""
