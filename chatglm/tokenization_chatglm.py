"""ChatGLM-6B (v1) tokenizer: the released ``ice_text.model`` read by sentencepiece directly (no icetk).

What it keeps from the original, so token ids match the released model:

- Whitespace that sentencepiece would lose or mangle is spelled with the model's own pieces before encoding:
  newline -> ``<n>``, tab -> ``<|tab|>``, a run of n spaces (2..80) -> ``<|blank_n|>``. Decoding undoes each one, so
  ``decode(encode(text)) == text``.
- Token id = sentencepiece piece id + ``num_image_tokens``: 0 for the 130k release; 20000 for the first (150k)
  release, whose ids below 20000 are the image tokens ``<image_N>``. Every special id is looked up in the files.
- ``a`` becomes ``a [gMASK] <sop>`` and a pair ``a [gMASK] <sop> b <eop>``; padding is on the left.
- As in the original, text is cut at special-token strings before sentencepiece sees it, so text written after a
  literal ``[gMASK]`` (say) starts with its own dummy-prefix ``▁``. Build special tokens from ids, not strings.

Deliberate departure: the original's padding also returned a 4D attention mask and 2D position ids. Here padding
returns the usual 2D ``attention_mask`` (1 real, 0 pad) only; our model builds the GLM mask and both position rows
itself from ``input_ids`` and that mask, so collators and ``generate()`` need nothing ChatGLM-specific.
"""

from __future__ import annotations

import os
import re
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

MAX_BLANK = 80
_SPACE_RUN = re.compile(r" {2,}")
_IMAGE = re.compile(r"<image_(\d+)>")
_SPELLED = re.compile(r"<n>|<\|tab\|>|<\|blank_(\d+)\|>")


def _blanks(run: re.Match[str]) -> str:
    # A run longer than the largest piece is cut into full <|blank_80|> pieces first, as the original's
    # longest-first replacement does; a one-space remainder stays a plain space (sentencepiece's "▁").
    full, rest = divmod(len(run.group()), MAX_BLANK)
    tail = f"<|blank_{rest}|>" if rest >= 2 else " " * rest
    return f"<|blank_{MAX_BLANK}|>" * full + tail


def _unspell(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return " " * int(match.group(1))
    return "\n" if match.group() == "<n>" else "\t"


class ChatGLMTokenizer(PreTrainedTokenizer):
    """Reads a directory laid out like THUDM/chatglm-6b: ``ice_text.model`` and ``tokenizer_config.json``.

    Named special tokens (each ``*_token_id`` comes from ``piece_to_id`` plus the image offset):
    ``bos_token`` ``<sop>``, ``eos_token`` ``<eop>``, ``mask_token`` ``[MASK]``, ``gmask_token`` ``[gMASK]``,
    ``pad_token`` ``<pad>``, ``unk_token`` ``<unk>`` and ``end_token`` ``</s>``.
    """

    vocab_files_names = {"vocab_file": "ice_text.model"}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers', except that a ChatGLM2/3 directory (``tokenizer.model``, no ``ice_text.model``) gets its
        own tokenizer class: all three releases name their tokenizer ``ChatGLMTokenizer`` in tokenizer_config.json,
        so ``AutoTokenizer`` lands here for each of them."""
        path = os.fspath(pretrained_model_name_or_path)
        if (cls is ChatGLMTokenizer and os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.model"))
                and not os.path.isfile(os.path.join(path, cls.vocab_files_names["vocab_file"]))):
            from .tokenization_chatglm2 import tokenizer_class_for  # it imports nothing of v1's: no cycle

            return tokenizer_class_for(path).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    # Declared here rather than left to transformers' catch-all for unknown "*_token" keys, so that
    # gmask_token_id exists on a tokenizer built directly as well as on one loaded from a file.
    SPECIAL_TOKENS_ATTRIBUTES = [*PreTrainedTokenizer.SPECIAL_TOKENS_ATTRIBUTES, "gmask_token", "end_token"]

    def __init__(
        self,
        vocab_file: str,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        num_image_tokens: int = 0,
        remove_space: bool = False,
        do_lower_case: bool = False,
        padding_side: str = "left",
        **kwargs,
    ) -> None:
        # The official tokenizer_config.json points auto_map at remote code; this class replaces that code, and
        # keeping the entry would make save_pretrained advertise it again.
        kwargs.pop("auto_map", None)
        if not vocab_file or not os.path.isfile(vocab_file):
            # sentencepiece would only log "Model is not initialized" and encode everything to id 0. A ValueError:
            # transformers' from_pretrained replaces any OSError raised here with a message that names no file.
            where = kwargs.get("name_or_path") or os.path.dirname(vocab_file or "") or "the given directory"
            raise ValueError(f"no {self.vocab_files_names['vocab_file']} in {where}: a ChatGLM-6B model "
                                    "directory holds its tokenizer's sentencepiece model under that name")
        self.vocab_file = vocab_file
        self.num_image_tokens = num_image_tokens
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self._base_vocab: dict[str, int] | None = None
        # save_pretrained lists the special tokens with their ids; drop those entries so every piece's id is
        # re-derived from the model file and a stale config can never contradict it. User-added tokens stay.
        saved = kwargs.pop("added_tokens_decoder", None) or {}
        kwargs["added_tokens_decoder"] = {i: t for i, t in saved.items() if not self._is_piece(str(t))}
        # The base class registers the special tokens and needs the vocabulary for that, so it comes last.
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            end_token=end_token,
            mask_token=mask_token,
            gmask_token=gmask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            remove_space=remove_space,
            do_lower_case=do_lower_case,
            padding_side=padding_side,
            **kwargs,
        )

    def _is_piece(self, token: str) -> bool:
        return self.sp.piece_to_id(token) != self.sp.unk_id() or token == self.sp.id_to_piece(self.sp.unk_id())

    @property
    def vocab_size(self) -> int:
        # The 130k checkpoint's embedding has 184 more rows than this; those ids have no piece (see spec).
        return self.num_image_tokens + self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        if self._base_vocab is None:
            vocab = {f"<image_{i}>": i for i in range(self.num_image_tokens)}
            offset = self.num_image_tokens
            vocab.update({self.sp.id_to_piece(i): i + offset for i in range(self.sp.get_piece_size())})
            self._base_vocab = vocab
        return {**self._base_vocab, **self._added_tokens_encoder}

    def preprocess(self, text: str) -> str:
        """The text exactly as sentencepiece sees it: whitespace spelled as the model's pieces."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        return _SPACE_RUN.sub(_blanks, text)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(self.preprocess(text), out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        image = _IMAGE.fullmatch(token)
        if image and int(image.group(1)) < self.num_image_tokens:
            return int(image.group(1))
        # An unknown piece maps to <unk>'s piece id, so it gets the offset like every other text id.
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        piece_id = index - self.num_image_tokens
        if piece_id >= self.sp.get_piece_size():
            return str(self.unk_token)  # embedding rows past the last piece: nothing to decode to
        return self.sp.id_to_piece(piece_id)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Runs of sentencepiece pieces are decoded together so "▁" and byte pieces join up exactly as sentencepiece
        # intends (it drops only the leading dummy-prefix space); anything that is not a piece (image tokens,
        # user-added tokens) is written out verbatim between runs.
        parts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if not self._is_piece(token):
                parts += [self.sp.decode_pieces(run), token]
                run = []
            else:
                run.append(token)
        parts.append(self.sp.decode_pieces(run))
        return _SPELLED.sub(_unspell, "".join(parts))

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        # GLM's blank infilling: the context ends with the mask it fills ([gMASK]: generate to the end) and the
        # answer starts with <sop>; only a supplied answer is closed with <eop>.
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

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
