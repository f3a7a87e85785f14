"""Tokenizers of the three kinds Llama-family checkpoints ship, behind one interface, and
chat prompts rendered by the checkpoint's own Jinja chat template.

`load_tokenizer` picks the kind from the files: tokenizer.model is a sentencepiece model
(Llama-2, Mistral) or a tiktoken rank file (Llama-3: lines of base64 token and rank);
otherwise tokenizer.json (Hugging Face tokenizers). tokenizer_config.json, where present,
gives the special tokens and the chat template (chat_template.jinja, where present, gives
the template instead).
"""

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]  # 256 in all
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer(ABC):
    """Subclasses encode and decode plain text; this class adds BOS, special tokens and chat.

    eos_ids, where generation stops: the tokenizer's EOS, those END_OF_TURN tokens that are
    special tokens of the vocabulary, and (added by load_tokenizer) the id or list of ids of
    generation_config.json's eos_token_id."""

    def __init__(self, special: dict[str, int], bos_id: int | None, eos_id: int | None, add_bos: bool, config: dict):
        self.special = special  # special token text -> id
        self.bos_id = bos_id
        self.eos_ids = {eos_id} - {None} | {special[t] for t in END_OF_TURN if t in special}
        self.add_bos = add_bos  # whether the model expects BOS before a prompt
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # several named templates: the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        # the special-token strings a template sees: tokenizer_config's, else the tokenizer's own BOS/EOS
        names = {i: t for t, i in special.items()}
        own = {"bos_token": names.get(bos_id), "eos_token": names.get(eos_id)}
        self.template_tokens = {k: v for k, v in own.items() if v}
        self.template_tokens |= {k: _content(config[k]) for k in TEMPLATE_TOKENS if config.get(k)}
        self._special_re = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Plain text -> ids, no special tokens, no BOS."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Ids -> text."""

    def encode(self, text: str, bos: bool, special: bool = False) -> list[int]:
        """special=False reads special token names as plain text; special=True maps them to their ids."""
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        if not special or not self.special:
            return ids + self.encode_text(text)
        for piece in self._special_re.split(text):
            if piece in self.special:
                ids.append(self.special[piece])
            elif piece:
                ids += self.encode_text(piece)
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for messages of {"role": "system"|"user"|"assistant", "content": str},
        as the checkpoint's chat template writes it (a default system prompt, BOS, turn markers)."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template (no chat_template in tokenizer_config.json, "
                             "no chat_template.jinja)")
        import jinja2

        try:
            return _compile(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                       **self.template_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template: {e}") from e

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of the chat prompt, ready for the assistant's reply: the rendered text with its
        special tokens, and no BOS but the one the template writes."""
        return self.encode(self.apply_chat_template(messages), bos=False, special=True)


@lru_cache
def _compile(template: str):
    """A chat template compiled in a sandbox, with the globals and filters chat templates use."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _content(token: str | dict) -> str:
    return token["content"] if isinstance(token, dict) else token


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: Path, config: dict):
        from sentencepiece import SentencePieceProcessor

        with _reading(model_file):
            self.sp = SentencePieceProcessor(model_file=str(model_file))
        special = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)}
        bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        eos = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        super().__init__(special, bos, eos, config.get("add_bos_token", True), config)

    def encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


class TiktokenTokenizer(Tokenizer):
    """Llama-3's tokenizer.model: its ranks, its split pattern and its 256 special tokens."""

    def __init__(self, model_file: Path, config: dict):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        with _reading(model_file):
            ranks = load_tiktoken_bpe(str(model_file))
        special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(model_file.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        super().__init__(special, special["<|begin_of_text|>"], special["<|end_of_text|>"],
                         config.get("add_bos_token", True), config)

    def encode_text(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))


class HFTokenizer(Tokenizer):
    def __init__(self, tokenizer_file: Path, config: dict):
        from tokenizers import Tokenizer as Backend

        with _reading(tokenizer_file):
            self.tok = Backend.from_file(str(tokenizer_file))
        self.tok.encode_special_tokens = True  # plain text: special token names are only text
        special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        # BOS as the tokenizer's own post-processor adds it, unless the config says otherwise
        plain, full = self.tok.encode("a", add_special_tokens=False).ids, self.tok.encode("a").ids
        prepended = full[0] if full[: len(plain)] != plain else None
        bos = self._id(config.get("bos_token"))
        bos = prepended if bos is None else bos
        add_bos = config.get("add_bos_token", prepended is not None)
        super().__init__(special, bos, self._id(config.get("eos_token")), add_bos, config)

    def _id(self, token: str | dict | None) -> int | None:
        return self.tok.token_to_id(_content(token)) if token else None

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(checkpoint_dir: Path) -> Tokenizer:
    checkpoint_dir = Path(checkpoint_dir)
    config_file = checkpoint_dir / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.exists() else {}
    if (checkpoint_dir / "chat_template.jinja").exists():
        config["chat_template"] = (checkpoint_dir / "chat_template.jinja").read_text()
    model_file = checkpoint_dir / "tokenizer.model"
    if model_file.exists():
        with open(model_file, "rb") as f:
            first_line = f.readline().strip()
        is_tiktoken = re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first_line) is not None
        tokenizer = (TiktokenTokenizer if is_tiktoken else SentencePieceTokenizer)(model_file, config)
    elif (checkpoint_dir / "tokenizer.json").exists():
        tokenizer = HFTokenizer(checkpoint_dir / "tokenizer.json", config)
    else:
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {checkpoint_dir}")
    generation_config = checkpoint_dir / "generation_config.json"
    if generation_config.exists():
        eos = _read_json(generation_config).get("eos_token_id")
        tokenizer.eos_ids |= set(eos) if isinstance(eos, list) else {eos} - {None}
    return tokenizer


def _read_json(file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file} is not a JSON object")
    return config


@contextmanager
def _reading(file: Path) -> Iterator[None]:
    """A tokenizer file that does not parse: one ValueError naming it."""
    try:
        yield
    except Exception as e:  # the tokenizers library raises bare Exceptions
        raise ValueError(f"cannot read {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
