"""The dynamic loader tried on an artifact's libraries in a child process before this one loads
them.

glibc's loader does not always report a damaged ELF file as a dlopen error: some damage (a
version-needed entry that points nowhere, found by the artifact fuzzer with one flipped byte)
fails an assertion inside ld.so, which ends the whole process with status 127 and a message of
its own. A library whose checksum holds but whose bytes were edited must not take the caller's
process down, so a short-lived child opens the libraries first, in the order the loader will
(the kernel library with RTLD_GLOBAL, then each step library, all RTLD_NOW), and says which one
it was opening when it failed. It costs one interpreter start (~20 ms) per artifact load.

This checks that the loader accepts the files, nothing more: checksums detect corruption, not
tampering (README: deployments sign the artifact folder).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ember.artifact.format import ArtifactError

# The child prints each path before opening it, so the last line names the library at fault
# whatever way the child ends.
_CHILD = """
import ctypes, os, sys
for i, path in enumerate(sys.argv[1:]):
    print(path, flush=True)
    try:
        ctypes.CDLL(path, mode=(ctypes.RTLD_GLOBAL if i == 0 else ctypes.RTLD_LOCAL) | os.RTLD_NOW)
    except OSError as e:
        print("refused", str(e).splitlines()[0] if str(e) else "", flush=True)
        sys.exit(3)
print("ok", flush=True)
"""


def probe_libraries(kernels: Path, steps: list[Path]) -> None:
    """Raise ArtifactError naming the first of kernels, *steps that the dynamic loader refuses or
    dies on."""
    paths = [str(kernels)] + [str(p) for p in steps]
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, *paths], capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    if proc.returncode == 0 and lines[-1:] == ["ok"]:
        return
    if lines and lines[-1].startswith("refused"):
        culprit, why = lines[-2], lines[-1][len("refused "):]
    else:
        culprit = lines[-1] if lines else paths[0]
        loader = next((line for line in proc.stderr.splitlines() if line.strip()), "")
        why = f"the dynamic loader fails on it (exit status {proc.returncode}{': ' + loader if loader else ''})"
    raise ArtifactError(f"{culprit}: cannot be loaded: {why}: the file is damaged; compile the model again")
