"""Tokenizers of the three kinds Llama-family checkpoints ship, behind one interface, and
the chat formats of the families the engine runs, written out by hand.

`load_tokenizer` picks the kind from the files: tokenizer.model is a sentencepiece model
(Llama-2, Mistral) or a tiktoken rank file (Llama-3: lines of base64 token and rank);
otherwise tokenizer.json (Hugging Face tokenizers). tokenizer_config.json, where present,
gives the BOS/EOS tokens and the chat template, whose markers choose the chat format.
"""

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]  # 256 in all


class Tokenizer(ABC):
    """Subclasses encode and decode plain text; this class adds BOS, special tokens and chat."""

    def __init__(self, special: dict[str, int], bos_id: int | None, eos_ids: set[int], add_bos: bool,
                 chat_format: str | None, default_system: str | None = None):
        self.special = special  # special token text -> id
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos  # whether the model expects BOS before a prompt
        self.chat_format = chat_format
        self.default_system = default_system
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
        """The prompt text for messages of {"role": "system"|"user"|"assistant", "content": str}."""
        if self.chat_format is None:
            raise ValueError("this checkpoint has no chat template")
        if self.default_system and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}] + messages
        return _CHAT[self.chat_format](messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of the chat prompt, ready for the assistant's reply (BOS included where due)."""
        return self.encode(self.apply_chat_template(messages), bos=False, special=True)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: Path, config: dict):
        from sentencepiece import SentencePieceProcessor

        self.sp = SentencePieceProcessor(model_file=str(model_file))
        special = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)}
        bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        eos = {self.sp.eos_id()} if self.sp.eos_id() >= 0 else set()
        super().__init__(special, bos, eos, config.get("add_bos_token", True), *_chat_format(config, "llama2"))

    def encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


class TiktokenTokenizer(Tokenizer):
    """Llama-3's tokenizer.model: its ranks, its split pattern and its 256 special tokens."""

    def __init__(self, model_file: Path, config: dict):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(model_file))
        special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(model_file.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        eos = {special[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
        super().__init__(special, special["<|begin_of_text|>"], eos, config.get("add_bos_token", True), *_chat_format(config, "llama3"))

    def encode_text(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))


class HFTokenizer(Tokenizer):
    def __init__(self, tokenizer_file: Path, config: dict):
        from tokenizers import Tokenizer as Backend

        self.tok = Backend.from_file(str(tokenizer_file))
        self.tok.encode_special_tokens = True  # plain text: special token names are only text
        special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        # BOS as the tokenizer's own post-processor adds it, unless the config says otherwise
        plain, full = self.tok.encode("a", add_special_tokens=False).ids, self.tok.encode("a").ids
        prepended = full[0] if full[: len(plain)] != plain else None
        bos = self._id(config.get("bos_token"))
        bos = prepended if bos is None else bos
        eos = {self._id(config.get("eos_token"))} - {None}
        add_bos = config.get("add_bos_token", prepended is not None)
        super().__init__(special, bos, eos, add_bos, *_chat_format(config, None))

    def _id(self, token: str | dict | None) -> int | None:
        return self.tok.token_to_id(token["content"] if isinstance(token, dict) else token) if token else None

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(checkpoint_dir: Path) -> Tokenizer:
    checkpoint_dir = Path(checkpoint_dir)
    config_file = checkpoint_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
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
    tokenizer.eos_ids |= _extra_eos_ids(checkpoint_dir, tokenizer)
    return tokenizer


def _extra_eos_ids(checkpoint_dir: Path, tokenizer: Tokenizer) -> set[int]:
    """generation_config.json may list several EOS ids; a chat format has its own end of turn."""
    ids = set()
    generation_config = checkpoint_dir / "generation_config.json"
    if generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids |= set(eos) if isinstance(eos, list) else {eos} - {None}
    end_of_turn = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(tokenizer.chat_format)
    if end_of_turn in tokenizer.special:
        ids.add(tokenizer.special[end_of_turn])
    return ids


def _chat_format(config: dict, fallback: str | None) -> tuple[str | None, str | None]:
    """(format, default system prompt) from the chat template's markers, else the tokenizer kind's."""
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    markers = [("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<<SYS>>", "llama2"), ("[INST]", "mistral")]
    chat_format = next((f for marker, f in markers if marker in template), fallback)
    # a ChatML template may write a fixed system prompt when the messages bring none
    system = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<]+)<\|im_end\|>", template) if chat_format == "chatml" else None
    return chat_format, system and system.group(1)


def _chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _llama3(messages: list[dict], add_generation_prompt: bool) -> str:
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
    )
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def _llama2(messages: list[dict], add_generation_prompt: bool) -> str:
    """Every [INST] turn opens with BOS; the system prompt goes into the first user turn."""
    system, messages = _split_system(messages)
    text = ""
    for i, m in enumerate(messages):
        content = m["content"].strip()
        if m["role"] == "user":
            if system is not None and i == 0:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            text += f"<s>[INST] {content} [/INST]"
        else:
            text += f" {content} </s>"
    return text


def _mistral(messages: list[dict], add_generation_prompt: bool) -> str:
    """One BOS; the system prompt goes before the text of the last user turn."""
    system, messages = _split_system(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    text = "<s>"
    for i, m in enumerate(messages):
        content = m["content"].strip()
        if m["role"] == "user":
            if system is not None and i == last_user:
                content = f"{system}\n\n{content}"
            text += f"[INST] {content} [/INST]"
        else:
            text += f" {content}</s>"
    return text


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


_CHAT = {"chatml": _chatml, "llama3": _llama3, "llama2": _llama2, "mistral": _mistral}
