"""Chat templates (ember/models/chat_template.py): tiny random-weight GGUFs carrying templates
in the Gemma, ChatML (Qwen) and Llama 3 formats render the expected prompts; BOS is not doubled;
hostile templates are refused or bounded with one line; `generate --chat` and `ember chat`
(multi-turn on piped stdin, only each new turn's tokens prefilled)."""
import datetime
import re
import subprocess
import sys
import time

import pytest

import ember
from ember.models.chat_template import ChatTemplate, ChatTemplateError

from chat_formats import FORMATS, write_chat_gguf
from tiny_gguf import Spec

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "the model"},
    {"role": "user", "content": "run it"},
]


def expected(name: str) -> str:
    """The prompt of CONVERSATION with a generation prompt, in each model card's format."""
    if name == "gemma":
        return ("<s><start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n<start_of_turn>model\nthe model"
                "<end_of_turn>\n<start_of_turn>user\nrun it<end_of_turn>\n<start_of_turn>model\n")
    if name == "chatml":
        return ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                "<|im_start|>assistant\nthe model<|im_end|>\n<|im_start|>user\nrun it<|im_end|>\n"
                "<|im_start|>assistant\n")
    today = datetime.datetime.now().strftime("%d %b %Y")
    return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: " + today +
            "\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nthe model<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nrun it<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    return {name: write_chat_gguf(folder / f"{name}.gguf", fmt) for name, fmt in FORMATS.items()}


@pytest.fixture(scope="module")
def models(chat_files):
    return {name: ember.load(path, threads=1, n_ctx=256) for name, path in chat_files.items()}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_gguf_template_renders_the_model_card_format(models, name):
    llm = models[name]
    template = llm.chat_template
    assert template.render(CONVERSATION) == expected(name)
    without = template.render(CONVERSATION, add_generation_prompt=False)
    assert expected(name).startswith(without) and len(without) < len(expected(name))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_bos_is_not_doubled_and_control_tokens_are_parsed(models, name):
    llm = models[name]
    ids = llm.tokenize(llm.apply_chat_template(CONVERSATION), special=True)
    tokenizer = llm.tokenizer
    if tokenizer.add_bos:
        assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    else:
        assert tokenizer.bos_id not in ids
    controls = FORMATS[name].controls or ("<|im_start|>", "<|im_end|>")
    for text in controls:
        assert tokenizer.piece_to_id[text] in ids


def test_the_template_can_raise(models):
    with pytest.raises(ChatTemplateError, match="the template raised: Conversation roles must alternate"):
        models["gemma"].chat_template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_a_model_without_template_says_so_in_one_line(tiny_files):
    llm = ember.load(tiny_files[Spec("llama", "q8_0")], threads=1, n_ctx=64)
    with pytest.raises(ChatTemplateError) as e:
        llm.chat([{"role": "user", "content": "hi"}])
    assert "no chat template" in str(e.value) and "\n" not in str(e.value)


def test_malformed_messages_are_one_line():
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]"):
        ChatTemplate("{{ messages }}").render([{"role": "user"}])


HOSTILE = {
    "class escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals escape": "{{ cycler.__init__.__globals__.os }}",
    "mutation": "{{ messages.append({'role': 'x'}) }}",
    "huge range": "{% for i in range(10 ** 9) %}{% endfor %}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge product": "{{ 'x' * 100000000 }}",
    "huge output": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "huge method argument": "{{ 'x'.center(100000000) }}",
    "huge filter argument": "{{ 'x' | indent(100000000, true) }}",
    "huge format width": "{{ '%0200000000d' % 1 }}",
    "huge power": "{{ 10 ** 100000000 }}",
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "syntax": "{% for %}",
}


@pytest.mark.parametrize("source", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_template_is_refused_in_one_line(source):
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - start < 20
    message = str(e.value)
    assert message.startswith("tokenizer.chat_template: ") and "\n" not in message and len(message) < 400


def test_str_format_cannot_reach_attributes():
    # the sandbox's formatter looks attributes up through the sandbox: nothing leaks
    assert ChatTemplate("{{ '{0.__class__}'.format(1) }}").render([]) == ""


def test_a_chat_turn_keeps_the_cache(models):
    llm = models["chatml"]
    messages = [{"role": "user", "content": "hello"}]
    first = llm.chat(messages, max_tokens=6, temperature=0)
    n_first = llm.last.prompt_tokens
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "run it"}]
    second = llm.chat(messages, max_tokens=6, temperature=0)
    kept = llm.last_kept
    full = llm.tokenize(llm.apply_chat_template(messages), special=True)
    assert kept >= n_first and kept + llm.last.prompt_tokens == len(full)
    # the same reply as from an empty cache
    llm.session.reset()
    llm._cache_ids, llm._cache_text = [], None
    assert llm.generate(full, max_tokens=6, temperature=0, special=False) == second


def ember_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ember.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, input=stdin)


def test_generate_chat_renders_the_template(chat_files, models):
    out = ember_cli("generate", chat_files["chatml"], "--chat", "hello", "--system", "Be brief.",
                    "-n", 4, "--temp", 0, "-t", 1, "-c", 256, "-q")
    assert out.returncode == 0, out.stderr
    llm = models["chatml"]
    prompt = llm.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hello"}])
    n = len(llm.tokenize(prompt, special=True))
    assert re.search(rf"prompt {n} tokens", out.stderr)
    assert out.stdout == llm.generate(prompt, max_tokens=4, temperature=0) + "\n"


def test_generate_chat_without_template_is_one_line(tiny_files):
    out = ember_cli("generate", tiny_files[Spec("llama", "q8_0")], "--chat", "hi", "-n", 2, "-q")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("ember: error:")]
    assert len(errors) == 1 and "no chat template" in errors[0] and "Traceback" not in out.stderr


def test_chat_command_multi_turn_on_piped_stdin(chat_files, models):
    out = ember_cli("chat", chat_files["chatml"], "--system", "Be brief.", "-n", 5, "--temp", 0,
                    "-t", 1, "-c", 256, "-q", stdin="hello\nrun it\n")
    assert out.returncode == 0, out.stderr
    replies = out.stdout.split("\n")[:2]
    kept = [int(k) for k in re.findall(r"turn \d+: (\d+) tokens kept", out.stderr)]
    prompts = [int(n) for n in re.findall(r"prompt (\d+) tokens", out.stderr)]
    assert len(kept) == len(prompts) == 2 and kept[0] == 0
    llm = models["chatml"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": replies[0]}, {"role": "user", "content": "run it"}]
    first = llm.apply_chat_template(messages[:2]) + replies[0]
    second = llm.apply_chat_template(messages)
    assert second.startswith(first)
    new = llm.tokenize(second[len(first):], add_bos=False, special=True)
    # the second turn evaluated only what it added: its messages, and the reply's last token,
    # which was sampled but not evaluated when the first turn stopped at -n
    assert kept[1] >= prompts[0] + 3 and len(new) <= prompts[1] <= len(new) + 2
