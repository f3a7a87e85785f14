"""Chat prompts rendered by the checkpoint's own template, token for token as transformers
renders and encodes them, and the sampling defaults of generation_config.json."""

import json
from pathlib import Path

import pytest

import generate
from checkpoint import resolve_checkpoint
from engine import LLM, SamplingParams, load_generation_config
from generate import sampling_from
from tokenizer import load_tokenizer

CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""  # its layout needs trim_blocks and lstrip_blocks

LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

TOJSON = "{% for message in messages %}{{ message | tojson }}\n{% endfor %}"

TEMPLATES = {  # name: (template, tokenizer_config's special tokens)
    "chatml": (CHATML, {"eos_token": "<|im_end|>"}),
    "llama3.1": (LLAMA31, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True}),
    "mistral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}),
    "tojson": (TOJSON, {}),
}
ADDED = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "[INST]", "[/INST]"]
TURNS = [{"role": "user", "content": "What is 2+2? <b>Café</b> & 🤗"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "  And 3+3?\n"}]
SYSTEM = [{"role": "system", "content": "Answer in one word, \"exactly\"."}]


@pytest.fixture(scope="module")
def tokenizer_json(smollm_dir, tmp_path_factory) -> Path:
    """The embedded model's tokenizer with the special tokens of the other templates added."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm_dir / "tokenizer.json"))
    tok.add_special_tokens(ADDED)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def checkpoint_with(tokenizer_json: Path, tmp_path: Path, template: str | None, config: dict) -> Path:
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **config}))
    return tmp_path


@pytest.mark.parametrize("messages", [TURNS, SYSTEM + TURNS], ids=["no-system", "system"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_encode_chat_matches_transformers(tokenizer_json, tmp_path, name, messages):
    from transformers import PreTrainedTokenizerFast

    template, config = TEMPLATES[name]
    ours = load_tokenizer(checkpoint_with(tokenizer_json, tmp_path, template, config))
    tokens = {k: v for k, v in config.items() if k.endswith("_token")}
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), chat_template=template, **tokens)
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(messages) == reference.apply_chat_template(messages, add_generation_prompt=True,
                                                                               tokenize=False)
    assert ours.encode_chat(messages) == expected
    if "bos_token" in config:  # the template writes BOS; encoding adds none
        assert expected.count(ours.bos_id) == 1 and expected[0] == ours.bos_id


def test_llama31_system_block(tokenizer_json, tmp_path):
    t = load_tokenizer(checkpoint_with(tokenizer_json, tmp_path, *TEMPLATES["llama3.1"]))
    text = t.apply_chat_template(SYSTEM + TURNS[:1])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: ")
    assert "\n\nAnswer in one word, \"exactly\".<|eot_id|><|start_header_id|>user" in text
    assert t.eos_ids == {t.special["<|eot_id|>"], t.special["<|im_end|>"]}


def test_template_errors_are_value_errors(tokenizer_json, tmp_path):
    from jinja2 import TemplateError
    from transformers import PreTrainedTokenizerFast

    template, config = TEMPLATES["mistral"]
    t = load_tokenizer(checkpoint_with(tokenizer_json, tmp_path, template, config))
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), chat_template=template)
    two_users = [TURNS[0], TURNS[0]]
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        t.encode_chat(two_users)
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        reference.apply_chat_template(two_users, add_generation_prompt=True)


def test_no_template_is_one_clear_error(tokenizer_json, tmp_path):
    t = load_tokenizer(checkpoint_with(tokenizer_json, tmp_path, None, {}))
    with pytest.raises(ValueError, match="no chat template") as e:
        t.encode_chat(TURNS)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("config, argv, expected", [
    ({}, [], (0.8, 200, 1.0)),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, [], (0.6, 200, 0.9)),
    ({"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.9}, ["--temperature", "1", "--top-k", "0"],
     (1.0, 0, 0.9)),
    ({"do_sample": False, "temperature": 0.6}, [], (0.0, 200, 1.0)),
    ({"do_sample": False}, ["--temperature", "0.7"], (0.7, 200, 1.0)),
    ({"temperature": None, "top_k": 5}, ["--top-p", "0.5"], (0.8, 5, 0.5)),
])
def test_generation_config_gives_sampling_defaults(config, argv, expected):
    p = SamplingParams.from_generation_config(config).update(sampling_from(generate.parse_args(argv)))
    assert (p.temperature, p.top_k, p.top_p) == expected


def test_generate_uses_generation_config(tmp_path, capsys):
    embedded = resolve_checkpoint(None)
    for f in embedded.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.5, "top_k": 7, "top_p": 0.9, "eos_token_id": [2, 5]}))
    assert load_generation_config(tmp_path)["top_k"] == 7 and load_generation_config(embedded) == {}
    llm = LLM(str(tmp_path), kv="fp16", device="cpu")
    assert (llm.defaults.temperature, llm.defaults.top_k, llm.defaults.top_p) == (0.5, 7, 0.9)
    assert {2, 5} <= llm.eos_ids
    capsys.readouterr()  # a first import of the embedded model says so
    generate.main(["--checkpoint", str(tmp_path), "--device", "cpu", "--prompt", "Hi", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.startswith("Hi")
