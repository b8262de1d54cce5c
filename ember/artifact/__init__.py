"""Compiled artifacts: a model's step graphs compiled once for a target, kept in a folder, and
run later without the passes or the target's compiler (the GGUF still supplies the weights).

    DIR/manifest.json          format and its version, ember's version, the target (and for cpu
                               the host), the model (file name, path, size, sha256), the context,
                               the KV cache types (kv_cache: k, v, rotation), the compiled step shapes, the constants the passes made, what the
                               target adds, and the sha256 of every other file
    DIR/steps/<shape>.ir       an optimized step graph, as compiled (IR text)
    DIR/constants/<n>.npy      constants the passes made (fused Q+K, gate+up), not in the GGUF
    ...                        the target's own files: ember/artifact/<target>.py says which

Shapes: for each KV bucket of the context, the decode step (1 token) and one prompt step
(`prompt_tokens`, default 32), each with one output row. `ArtifactSession` cuts a prompt into
prompt steps and single tokens; any other shape is an error, never a compile. Loading checks
every file against its sha256. The folder is written under a temporary name and renamed into
place.

Speculation (`ember compile --spec`, `draft_max`; the manifest's `spec` block): per KV bucket
also verify steps of 1 + d tokens (d = 1, 2, 4, ... below draft_max, and draft_max) with a
logits row per token; a verify batch runs in the smallest that fits, padded. A model with
recurrent layers keeps draft_max + 2 state planes in every step, and its verify steps write the
state after every token, so `ember run --spec` rolls a rejected tail back by selecting a plane
(--spec-rollback states, the default), as a compiling session does. Opt-in, because it adds
log2(draft_max) + 1 steps per bucket (compile time and disk) and multiplies a recurrent model's
state memory by draft_max + 2 for every run, speculating or not. Without it, an artifact
verifies drafts one token at a time (a recurrent one with --spec-rollback redecode only).

Modules: format (manifest, versions, checksums, atomic folder replace), session (the session
over prebuilt steps), writer and loader (the drivers), and one module per target kind (cpu,
opencl, vulkan) with its writer and loader, named by the target list (ember.target). The
artifact floor sits on the runtime.
"""
from ember.artifact.format import FORMAT, FORMAT_VERSION, MANIFEST, ArtifactError, file_sha256, read_manifest
from ember.artifact.loader import load_artifact
from ember.artifact.session import ArtifactSession, kv_buckets, step_shapes, verify_tokens
from ember.artifact.writer import DEFAULT_CTX, DEFAULT_PROMPT_TOKENS, compile_artifact

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "ArtifactError", "file_sha256", "read_manifest",
           "load_artifact", "ArtifactSession", "kv_buckets", "step_shapes", "verify_tokens", "DEFAULT_CTX",
           "DEFAULT_PROMPT_TOKENS", "compile_artifact"]
