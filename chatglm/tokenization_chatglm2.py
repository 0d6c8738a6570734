"""ChatGLM2-6B and ChatGLM3-6B tokenizers: the released ``tokenizer.model`` read by sentencepiece directly.

Both versions ship the same sentencepiece file (64789 pieces: ``<unk>`` 0 = pad, ``<s>`` 1, ``</s>`` 2 = eos, byte
pieces ``<0x00>``.. from 3, so newline is 13 and tab 12). What the original Python code adds, kept here so ids match
the released models (pinned by ``../shared/fixtures/tokenizers/``):

- Special tokens appended after the pieces, in this order: ``[MASK] [gMASK] [sMASK] sop eop`` (64789..64793), and for
  ChatGLM3 ``<|system|> <|user|> <|assistant|> <|observation|>`` (64794..64797). An input starts ``[gMASK] sop``; a
  pair ``a, b`` becomes ``[gMASK] sop a b </s>``.
- Text goes to sentencepiece as it is: whitespace runs, tabs and newlines are kept by the model itself, and a
  special-token string typed in text is ordinary text. ChatGLM3's ``encode_special_tokens=True`` is the one
  exception: it turns typed role tokens into their ids, as the original's flag of that name does.
- ``decode`` drops ``<unk> <s> </s>``; ChatGLM2 also drops the appended specials, ChatGLM3 writes them by name
  (``[gMASK]sop 你好``: a piece run after a written special keeps its leading space).
- Padding is on the left by default. Deliberate departure: ``position_ids`` (``[0]*pad + range(n)``) are returned only
  when asked for with ``model_input_names=["input_ids", "attention_mask", "position_ids"]``; rotary positions are
  relative, so a model that counts positions from the attention mask computes the same thing.
- The chat formats, for training examples and ``chat`` alike: ``build_prompt`` (ChatGLM2's ``[Round N]`` text) and
  ``ChatGLM3Tokenizer.build_chat_ids`` (role tokens).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

GLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
# Sentencepiece control/unknown pieces the original decodes to nothing (its convert_id_to_token returns "").
_SILENT = ("<unk>", "<s>", "</s>")


def build_prompt(query: str, history: list[tuple[str, str]] | None = None) -> str:
    """ChatGLM2's chat text: one ``[Round N]`` block per past (query, response), counted from 1, then the open one."""
    rounds = [f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history or [], start=1)]
    return "".join(rounds) + f"[Round {len(rounds) + 1}]\n\n问：{query}\n\n答："


class ChatGLM2Tokenizer(PreTrainedTokenizer):
    """Reads a directory laid out like THUDM/chatglm2-6b: ``tokenizer.model`` (+ an optional tokenizer_config.json).

    Ids: ``pad_token_id`` = ``unk_token_id`` 0, ``eos_token_id`` 2, then right after the last piece
    ``mask_token_id`` ([MASK]), ``gmask_token_id``, ``smask_token_id``, ``sop_token_id``, ``eop_token_id``; every
    appended special by name in ``special_ids``.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    APPENDED = GLM_SPECIALS
    WRITES_SPECIALS = False  # ChatGLM2's decode drops the appended specials

    def __init__(
        self,
        vocab_file: str,
        eos_token: str = "</s>",
        pad_token: str = "<unk>",
        unk_token: str = "<unk>",
        mask_token: str = "[MASK]",
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ) -> None:
        kwargs.pop("auto_map", None)  # the official config points at remote code this class replaces
        if not vocab_file or not os.path.isfile(vocab_file):
            # A ValueError, not OSError: from_pretrained would replace the latter with a message naming no file.
            where = kwargs.get("name_or_path") or os.path.dirname(vocab_file or "") or "the given directory"
            raise ValueError(f"no tokenizer.model in {where}: a ChatGLM2/3 model directory holds its tokenizer's "
                             "sentencepiece model under that name")
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        first = self.sp.get_piece_size()
        self.special_ids = {token: first + i for i, token in enumerate(self.APPENDED)}
        self._special_tokens = {i: token for token, i in self.special_ids.items()}
        self._base_vocab: dict[str, int] | None = None
        # Saved configs list the specials with their ids; those are re-derived from the file, user tokens stay.
        saved = kwargs.pop("added_tokens_decoder", None) or {}
        kwargs["added_tokens_decoder"] = {i: t for i, t in saved.items() if not self._in_base_vocab(str(t))}
        extras = [t for t in self.APPENDED if t != mask_token]
        kwargs.setdefault("extra_special_tokens", extras)
        super().__init__(
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            mask_token=mask_token,
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def _in_base_vocab(self, token: str) -> bool:
        return token in self.special_ids or self._is_piece(token)

    def _is_piece(self, token: str) -> bool:
        return self.sp.piece_to_id(token) != self.sp.unk_id() or token == self.sp.id_to_piece(self.sp.unk_id())

    # The appended specials the example layouts need, by id (mask_token_id, eos_token_id: the base class's).
    @property
    def gmask_token_id(self) -> int:
        return self.special_ids["[gMASK]"]

    @property
    def smask_token_id(self) -> int:
        return self.special_ids["[sMASK]"]

    @property
    def sop_token_id(self) -> int:
        return self.special_ids["sop"]

    @property
    def eop_token_id(self) -> int:
        return self.special_ids["eop"]

    @property
    def vocab_size(self) -> int:
        # As the original reports it: pieces + appended specials (the model's embedding is padded to 65024).
        return self.sp.get_piece_size() + len(self.APPENDED)

    def get_vocab(self) -> dict[str, int]:
        if self._base_vocab is None:
            vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
            self._base_vocab = {**vocab, **self.special_ids}
        return {**self._base_vocab, **self._added_tokens_encoder}

    def tokenize(self, text: str, **kwargs) -> list[str]:
        # The original hands the whole text to sentencepiece: "</s>", "sop" or "[gMASK]" typed in a text are
        # ordinary characters (transformers would cut them out as special tokens, so "sopping" -> sop + ping).
        # Tokens added with add_tokens get ids after the specials but are not matched in text either.
        return self._tokenize(text)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._special_tokens:
            return self._special_tokens[index]
        if 0 <= index < self.sp.get_piece_size():
            return self.sp.id_to_piece(index)
        return str(self.unk_token)  # embedding rows past the vocabulary: nothing to decode to

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Piece runs are decoded together so "▁" and byte pieces join as sentencepiece intends. Sentencepiece drops
        # a run's leading dummy-prefix space; after written text the original keeps it (" 你好" after "sop").
        text, run = "", []
        for token in tokens:
            if token in _SILENT or (token in self.special_ids and not self.WRITES_SPECIALS):
                continue
            if self._is_piece(token):
                run.append(token)
                continue
            text += self._decode_run(run, after_text=bool(text)) + token  # a written special or a user token
            run = []
        return text + self._decode_run(run, after_text=bool(text))

    def _decode_run(self, run: list[str], after_text: bool) -> str:
        lead = " " if after_text and run and run[0].startswith("▁") else ""
        return lead + self.sp.decode_pieces(run)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = [self.gmask_token_id, self.sop_token_id, *token_ids_0]
        if token_ids_1 is not None:
            ids += [*token_ids_1, self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=None, pad_to_multiple_of=None,
             padding_side=None, return_attention_mask=None) -> dict:
        wants_positions = "position_ids" in self.model_input_names
        length = len(encoded_inputs[self.model_input_names[0]])
        positions = list(encoded_inputs.pop("position_ids", range(length)))
        padded = super()._pad(encoded_inputs, max_length, padding_strategy, pad_to_multiple_of, padding_side,
                              return_attention_mask)
        if wants_positions:  # the original's: [0] * pad + range(n), pads at position 0
            gap = [0] * (len(padded[self.model_input_names[0]]) - length)
            left = (padding_side or self.padding_side) == "left"
            padded["position_ids"] = gap + positions if left else positions + gap
        return padded

    def build_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """ChatGLM2's chat text (module-level ``build_prompt``), here as on the original tokenizer."""
        return build_prompt(query, history)

    RELEASE = 2

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', with tokenizer_config.json naming ``ChatGLMTokenizer`` as the official files do (the one
        name ``AutoTokenizer`` resolves after ``import chatglm``) and ``chatglm_release`` saying which of the two."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "tokenizer_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config.update(tokenizer_class="ChatGLMTokenizer", chatglm_release=self.RELEASE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        return files

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (f"{filename_prefix}-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        target = os.path.join(save_directory, name)
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(target):
                shutil.copyfile(self.vocab_file, target)
        else:  # the file went away after loading: the processor still holds the model
            with open(target, "wb") as f:
                f.write(self.sp.serialized_model_proto())
        return (target,)


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B: the same file, four role tokens more (64794..64797), specials written out by ``decode``.

    ``chat`` stops on ``chat_eos_token_ids`` (``</s>``, ``<|user|>``, ``<|observation|>``), as the original does.
    """

    APPENDED = GLM_SPECIALS + ROLE_TOKENS
    WRITES_SPECIALS = True
    RELEASE = 3
    _ROLE_TEXT = re.compile("|".join(re.escape(t) for t in ROLE_TOKENS))

    def __init__(self, vocab_file: str, encode_special_tokens: bool = False, **kwargs) -> None:
        self.encode_special_tokens = encode_special_tokens
        super().__init__(vocab_file, encode_special_tokens=encode_special_tokens, **kwargs)

    @property
    def chat_eos_token_ids(self) -> list[int]:
        return [self.eos_token_id, self.special_ids["<|user|>"], self.special_ids["<|observation|>"]]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        if not self.encode_special_tokens:
            return self.sp.encode(text, out_type=str)
        # Each stretch between typed role tokens is its own sentencepiece encode (its own dummy prefix "▁").
        tokens, start = [], 0
        for match in self._ROLE_TEXT.finditer(text):
            tokens += self.sp.encode(text[start:match.start()], out_type=str) + [match.group()]
            start = match.end()
        return tokens + self.sp.encode(text[start:], out_type=str)

    def build_single_message(self, role: str, metadata: str, content: str) -> list[int]:
        """One turn, no prefix: role token, then ``metadata + "\\n"`` and the content, each encoded on its own."""
        if f"<|{role}|>" not in self.special_ids:
            raise ValueError(f"role {role!r}: ChatGLM3 knows the roles system, user, assistant and observation")
        encode = self.sp.encode  # piece ids, no prefix; a role token typed in content stays text
        return [self.special_ids[f"<|{role}|>"], *encode(f"{metadata}\n"), *encode(content)]

    def build_chat_ids(self, query: str, history: list[dict] | None = None, role: str = "user") -> list[int]:
        """``[gMASK] sop``, every history message, the query as ``role``, then ``<|assistant|>`` for the reply.

        ``history`` holds ``{"role", "content"}`` dicts (optional ``metadata``; a system message's ``tools`` are
        appended to its content as indented JSON), as the original ``build_chat_input`` takes them.
        """
        ids = []
        for message in history or []:
            content = message["content"]
            if message["role"] == "system" and "tools" in message:
                content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(message["role"], message.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query) + [self.special_ids["<|assistant|>"]]
        return self.build_inputs_with_special_tokens(ids)

    def build_chat_input(self, query: str, history: list[dict] | None = None, role: str = "user"):
        """``build_chat_ids`` as a one-row batch of tensors, ready for ``generate(**...)``."""
        return self.pad({"input_ids": [self.build_chat_ids(query, history, role)]}, return_tensors="pt")


def tokenizer_class_for(directory: str | os.PathLike) -> type[ChatGLM2Tokenizer]:
    """ChatGLM3Tokenizer or ChatGLM2Tokenizer for a model directory. The two releases' config.json files differ only
    in ``_name_or_path`` (``THUDM/chatglm3-6b``, which the official file keeps) and ``seq_length``, and their
    tokenizer_config.json files name the same remote class; a directory saved by this project says
    ``chatglm_release``."""

    def read(name: str) -> dict:
        path = os.path.join(directory, name)
        return json.loads(open(path, encoding="utf-8").read()) if os.path.isfile(path) else {}

    config, tokenizer_config = read("config.json"), read("tokenizer_config.json")
    if "chatglm_release" in tokenizer_config:  # saved by this project
        return ChatGLM3Tokenizer if tokenizer_config["chatglm_release"] == 3 else ChatGLM2Tokenizer
    names = (config.get("_name_or_path", ""), tokenizer_config.get("name_or_path", ""))
    if tokenizer_config.get("tokenizer_class") == "ChatGLM3Tokenizer" or any("chatglm3" in str(n).lower()
                                                                            for n in names):
        return ChatGLM3Tokenizer
    return ChatGLM2Tokenizer
