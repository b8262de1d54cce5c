"""The OpenCL backend: device selection (device.py), the program-binary cache (compiler.py) and
the backend with its executables (backend.py). Kernels come from ember.codegen.opencl."""
