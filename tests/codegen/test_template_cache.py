"""Compiled templates are kept in ember's cache folder, so a later process renders without
compiling them again (part of a warm start)."""
from ember.codegen.renderer import Templates, template_bytecode_cache


def test_a_compiled_template_is_kept_for_the_next_process():
    env = Templates("cpu").environment       # a new environment: nothing compiled in memory
    assert env.bytecode_cache is template_bytecode_cache() is not None
    env.get_template("sum_rows.c.j2")
    source, filename, _ = env.loader.get_source(env, "sum_rows.c.j2")
    bucket = env.bytecode_cache.get_bucket(env, "sum_rows.c.j2", filename, source)
    assert bucket.code is not None
    # an edited template is not served the old code
    assert env.bytecode_cache.get_bucket(env, "sum_rows.c.j2", filename, source + " ").code is None
