"""A session compiles what its backend's target pipeline makes, under the session's PassContext:
the Adreno layout is a pass of that pipeline (with the profile's thresholds), never the
renderer's own doing, so disabling the pass changes what runs."""
import pytest

from ember.backends import get_backend
from ember.backends.opencl.backend import OpenCLBackend
from ember.models import load_model
from ember.passes import LayoutAdreno
from ember.runtime.session import Session, SessionOptions
from model_steps import nmse
from tiny_gguf import Spec

SMALL_SOA = dict(soa_min_rows=4, soa_min_cols=32)
PROMPT = [1, 17, 42, 99, 5, 23, 64, 7]


class RecordingOpenCL(OpenCLBackend):
    """The OpenCL backend, keeping the program of every graph it compiles."""

    def __init__(self, **options):
        super().__init__(**options)
        self.programs = []

    def compile(self, graph, **options):
        executable = super().compile(graph, **options)
        self.programs.append(executable.program)
        return executable


@pytest.fixture(scope="module")
def adreno_emulated(tmp_path_factory):
    backend = RecordingOpenCL(profile="adreno-emulated", profile_options=SMALL_SOA,
                              cache_dir=tmp_path_factory.mktemp("opencl-cache"))
    ok, why = backend.available()
    if not ok:
        pytest.skip(f"opencl adreno-emulated: unavailable: {why}")
    return backend


def test_each_backend_runs_its_targets_pipeline(tiny_files, adreno_emulated):
    model = load_model(tiny_files[Spec("llama", "q8_0")])
    cpu = Session(model, get_backend("cpu"), SessionOptions(n_ctx=32))
    assert cpu.pipeline.label == "cpu" and "layout-adreno" not in [p.name for p in cpu.pipeline.passes]
    adreno = Session(model, adreno_emulated, SessionOptions(n_ctx=32))
    # the profile's thresholds, not the pass's defaults (which would lay out no tiny weight)
    assert adreno.pipeline.label == "opencl-adreno"
    assert adreno.pipeline.passes[-1] == LayoutAdreno(min_rows=4, min_cols=32)


def test_disabling_layout_adreno_changes_what_runs(tiny_files, adreno_emulated):
    model = load_model(tiny_files[Spec("llama", "q8_0")])
    runs = {}
    for disabled in (frozenset(), frozenset({"layout-adreno"})):
        adreno_emulated.programs.clear()
        session = Session(model, adreno_emulated, SessionOptions(n_ctx=32, disabled_passes=disabled))
        logits = session.eval(PROMPT, all_logits=True)
        templates = {k.template for p in adreno_emulated.programs for k in p.kernels}
        laid_out = [n for p in adreno_emulated.programs for n in p.constants if n.type.layout != "row"]
        runs[disabled] = logits, templates, laid_out
    (on, on_templates, on_laid_out), (off, off_templates, off_laid_out) = runs.values()
    assert on_laid_out and any("soa" in t for t in on_templates)
    assert not off_laid_out and not any("soa" in t for t in off_templates)
    # the same model either way, within the Adreno kernels' half-precision activations
    assert nmse(on, off) < 1e-3
