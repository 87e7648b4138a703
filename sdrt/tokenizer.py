"""CLIP tokenizer without torch or transformers: the `tokenizers` library configured as
transformers' `CLIPTokenizer` configures it, from a model's `vocab.json` + `merges.txt`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import SdrtError
from .model_info import read_json

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


def _token_text(value) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


class CLIPTokenizer:
    def __init__(self, folder: Path):
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise SdrtError(f"tokenizer file {folder / name} is missing")
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                settings.update(read_json(folder / name))
        self.bos = _token_text(settings.get("bos_token", "<|startoftext|>"))
        self.eos = _token_text(settings.get("eos_token", "<|endoftext|>"))
        unk = _token_text(settings.get("unk_token", "<|endoftext|>"))
        self.pad = _token_text(settings.get("pad_token", self.eos))
        max_length = settings.get("model_max_length", 77)
        if isinstance(max_length, bool) or not isinstance(max_length, (int, float)) or max_length < 3:
            raise SdrtError(f"tokenizer in {folder}: model_max_length {max_length!r} is not accepted: an integer >= 3")
        self.max_length = int(max_length)
        if self.max_length > 10_000:  # transformers' "no limit" sentinel; CLIP encoders take 77
            self.max_length = 77

        vocab = read_json(folder / "vocab.json")
        try:
            merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
                      if line and not line.startswith("#version")]
            tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                                fuse_unk=False, unk_token=unk))
        except Exception as exc:  # tokenizers raises plain Exception; the file may not be UTF-8
            raise SdrtError(f"tokenizer in {folder}: vocab.json and merges.txt do not make a BPE tokenizer ({exc})") from None
        tok.normalizer = clip_normalizer()
        tok.pre_tokenizer = clip_pre_tokenizer()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys((self.bos, self.eos, unk, self.pad))])
        self._tok = tok
        self.bos_id, self.eos_id, self.pad_id = (tok.token_to_id(t) for t in (self.bos, self.eos, self.pad))
        if None in (self.bos_id, self.eos_id, self.pad_id):
            raise SdrtError(f"tokenizer in {folder}: special tokens {self.bos!r}, {self.eos!r}, {self.pad!r} must be in vocab.json")

    def chunks(self, prompt: str) -> np.ndarray:
        """The AUTOMATIC1111 WebUI's long prompts: -> (k, max_length) int32, the tokens cut into chunks of
        max_length - 2, each with bos, eos and padding (k >= 1; without its comma backtracking and
        emphasis weights)."""
        room = self.max_length - 2
        tokens = self._tok.encode(prompt, add_special_tokens=False).ids
        pieces = [tokens[i : i + room] for i in range(0, len(tokens), room)] or [[]]
        ids = np.full((len(pieces), self.max_length), self.pad_id, dtype=np.int32)
        for row, piece in enumerate(pieces):
            ids[row, : len(piece) + 2] = [self.bos_id, *piece, self.eos_id]
        return ids

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """-> (len(prompts), max_length) int32: bos, tokens, eos, padding; over-long prompts truncated."""
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        room = self.max_length - 2
        for row, encoding in enumerate(self._tok.encode_batch(prompts, add_special_tokens=False)):
            tokens = encoding.ids
            if len(tokens) > room:
                dropped = prompts[row][encoding.offsets[room][0]:]
                log.warning("prompt is %d tokens long; the text encoder takes %d, so this end of it was dropped: %r "
                            "(--long-prompts chunk keeps it)", len(tokens), room, dropped)
                tokens = tokens[:room]
            ids[row, : len(tokens) + 2] = [self.bos_id, *tokens, self.eos_id]
        return ids
