"""Sequence memory: fork, switch, remove, truncate, checkpoints (attention-only models here;
recurrent models in test_recurrent_memory.py)."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.errors import EmberError
from ember.models import load_model
from ember.runtime.memory import SequenceMemory
from ember.runtime.session import Session, SessionOptions
from tiny_gguf import Spec


@pytest.fixture(scope="module")
def session(tiny_files, tmp_path_factory):
    backend = get_backend("cpu", threads=2, cache_dir=tmp_path_factory.mktemp("mem-cache"))
    return Session(load_model(tiny_files[Spec("llama", "f32")]), backend, SessionOptions(n_ctx=32, kv_bucket=16))


def test_fork_and_switch_keep_sequences_apart(session):
    session.reset()
    mem = SequenceMemory(session)
    session.eval([1, 5, 9, 13])
    mem.fork(1)                                   # 1 = copy of the 4-token prefix
    a = session.eval([20])                        # sequence 0 continues with 20
    mem.switch(1)
    assert session.n_past == 4
    b = session.eval([30])                        # sequence 1 continues with 30
    mem.switch(0)
    assert session.n_past == 5
    again = session.eval([21])
    # the same continuation computed from scratch on a fresh prefix gives the same bits
    session.reset()
    session.eval([1, 5, 9, 13])
    np.testing.assert_array_equal(session.eval([20]), a)
    np.testing.assert_array_equal(session.eval([21]), again)
    session.reset()
    session.eval([1, 5, 9, 13])
    np.testing.assert_array_equal(session.eval([30]), b)


def test_add_remove_and_errors(session):
    session.reset()
    mem = SequenceMemory(session)
    mem.add(7)
    assert mem.sequences() == [0, 7]
    with pytest.raises(EmberError, match="exists"):
        mem.add(7)
    with pytest.raises(EmberError, match="active"):
        mem.remove(0)
    mem.remove(7)
    with pytest.raises(EmberError, match="no sequence 7"):
        mem.switch(7)


def test_checkpoint_restore_matches_redecoding(session):
    session.reset()
    mem = SequenceMemory(session)
    session.eval([1, 2, 3])
    cp = mem.checkpoint()
    first = session.eval([4])
    session.eval([5, 6])
    mem.restore(cp)
    assert session.n_past == 3
    np.testing.assert_array_equal(session.eval([4]), first)
    assert cp.nbytes == 0                        # a transformer has no recurrent state
