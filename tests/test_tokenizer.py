import base64
import io
import json
from pathlib import Path

import pytest

from checkpoint import embedded_gguf
from tokenizer import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, Apollo 11 landed on the Moon; about 600 million people watched.\n\nIt was July 20th.",
    "naïve café résumé — “quotes”, emoji 🤗🚀 and 日本語のテキスト",
    "  leading spaces\tand\ttabs\n\n\n  trailing   ",
    "def f(x):\n    return x**2  # I'm sure it's fine, they've said we'll see",
]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm(smollm_dir):
    return load_tokenizer(smollm_dir)


def test_smollm_ids(smollm):
    assert isinstance(smollm, HFTokenizer)
    assert (smollm.bos_id, smollm.eos_ids, smollm.add_bos) == (1, {2}, False)
    assert smollm.template_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_round_trip(smollm, text):
    ids = smollm.encode(text, bos=False)
    assert smollm.decode(ids) == text
    assert smollm.encode(text, bos=True) == [1] + ids


def test_special_tokens_are_text_unless_asked(smollm):
    text = "a<|im_end|>b"
    plain = smollm.encode(text, bos=False)
    assert 2 not in plain and smollm.decode(plain) == text
    assert smollm.encode(text, bos=False, special=True) == smollm.encode("a", bos=False) + [2] + smollm.encode("b", bos=False)


def test_smollm_chat_template(smollm):
    user = [{"role": "user", "content": "Hi"}]
    assert smollm.apply_chat_template(user) == (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}] + user
    assert smollm.apply_chat_template(with_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smollm.encode_chat(with_system)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert smollm.decode(ids) == smollm.apply_chat_template(with_system)


def test_smollm_matches_transformers(smollm):
    from transformers import AutoTokenizer

    gguf = embedded_gguf()
    reference = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for text in TEXTS:
        assert smollm.encode(text, bos=False) == reference(text, add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks!"}]
    for messages in (chat, [{"role": "system", "content": "Be brief."}] + chat):
        rendered = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert smollm.apply_chat_template(messages) == rendered
        assert smollm.encode_chat(messages) == reference(rendered, add_special_tokens=False)["input_ids"]


def test_hf_tokenizer_bos_from_post_processor(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<|begin_of_text|>": 1, "<|eot_id|>": 2, "<|end_of_text|>": 3, "hello": 4, "world": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 2]}))
    t = load_tokenizer(tmp_path)
    assert (t.bos_id, t.add_bos, t.eos_ids) == (1, True, {2, 3})  # <|eot_id|> ends a turn, 3 from generation_config
    assert t.template_tokens == {"bos_token": "<|begin_of_text|>"}
    assert t.encode("hello world", bos=True) == [1, 4, 5]


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny corpus for a tiny model",
    "[INST] <<SYS>> </s> <s> [/INST] are only text here",
    "we need just enough text: 0123456789.",
] * 5


@pytest.fixture
def spm_dir(tmp_path) -> Path:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=64,
                                             character_coverage=1.0, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    return tmp_path


def test_sentencepiece(spm_dir):
    t = load_tokenizer(spm_dir)
    assert isinstance(t, SentencePieceTokenizer)
    assert (t.bos_id, t.eos_ids, t.add_bos, t.template_tokens) == (1, {2}, True, {"bos_token": "<s>", "eos_token": "</s>"})
    text = "hello world, the lazy fox: 42."
    ids = t.encode(text, bos=True)
    assert ids[0] == 1 and 1 not in ids[1:] and t.decode(ids) == text
    assert t.encode(text, bos=False) == ids[1:]
    assert 1 not in t.encode("<s>", bos=False) and t.encode("<s>", bos=False, special=True) == [1]


LLAMA2_TEMPLATE = (  # Llama-2-chat's
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def test_sentencepiece_chat(spm_dir):
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(spm_dir).encode_chat(messages)
    (spm_dir / "chat_template.jinja").write_text(LLAMA2_TEMPLATE)
    t = load_tokenizer(spm_dir)
    assert t.apply_chat_template(messages) == (
        "<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] bye [/INST]"
    )
    ids = t.encode_chat(messages)
    assert ids.count(1) == 2 and ids.count(2) == 1 and ids[0] == 1


@pytest.fixture
def tiktoken_dir(tmp_path) -> Path:
    ranks = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world"]
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(ranks)]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_tiktoken(tiktoken_dir):
    t = load_tokenizer(tiktoken_dir)
    assert isinstance(t, TiktokenTokenizer)
    begin, end, eom, eot = 264, 265, 264 + 8, 264 + 9  # special tokens follow the 264 ranks
    assert (t.bos_id, t.eos_ids, t.add_bos) == (begin, {end, eom, eot}, True)
    assert len(t.special) == 256 and t.special["<|reserved_special_token_246|>"] == 264 + 255
    assert t.encode("hello world", bos=True) == [begin, 259, 263]
    for text in TEXTS:
        assert t.decode(t.encode(text, bos=False)) == text
    assert eot not in t.encode("<|eot_id|>", bos=False) and t.encode("<|eot_id|>", bos=False, special=True) == [eot]


LLAMA3_TEMPLATE = (  # Llama-3-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_llama3_chat(tiktoken_dir):
    (tiktoken_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE}))
    t = load_tokenizer(tiktoken_dir)
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello world "}]
    text = t.apply_chat_template(messages)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhello world<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = t.encode_chat(messages)
    assert ids[:2] == [264, 264 + 6] and ids.count(264 + 9) == 2 and t.decode(ids) == text


def test_no_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
