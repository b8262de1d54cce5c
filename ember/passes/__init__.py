"""Graph -> graph rewrites, the context they run in, and per-target pipelines."""
from ember.passes.base import DumpIR, Instrument, Pass, PassContext, Phase, Pipeline, PrintAfter, Timing  # noqa: F401
from ember.passes.cse import CommonSubexpressionElimination  # noqa: F401
from ember.passes.dce import DeadCodeElimination  # noqa: F401
from ember.passes.fold_constants import FoldConstants  # noqa: F401
from ember.passes.fuse_elementwise import FuseElementwise  # noqa: F401
from ember.passes.fuse_qkv import FuseQKV  # noqa: F401
from ember.passes.layout import LayoutAdreno  # noqa: F401
from ember.passes.pipelines import TARGETS, known_pass_names, pipeline_for  # noqa: F401
