"""Loading an artifact: the manifest checked (ember.artifact.format), then the target's loader
(ember/artifact/<target>.py) makes the executables and the session."""
from __future__ import annotations

from pathlib import Path

from ember.artifact.format import MANIFEST, ArtifactError, read_manifest, target_module
from ember.artifact.session import check_cache_request


def load_artifact(folder, model_path=None, threads: int | None = None, cache_request=None):
    """(model, session) from an artifact folder; the model from model_path or the manifest's
    path, checked against the manifest's sha256. threads: CPU threads (cpu artifacts).
    cache_request: {"k", "v", "rotation"} settings the caller asks for (None: the artifact's);
    one that differs from the artifact's is an ArtifactError before anything is loaded."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        check_cache_request(folder, manifest, dict(cache_request or {}))
        return target_module(manifest["target"]).load(folder, manifest, model_path, threads)
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{folder / MANIFEST}: corrupt: malformed manifest ({e!r})") from None
