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

ADDED_TOKENS = "added_tokens.json"  # {token: id}: textual-inversion tokens, ids after the vocabulary's (transformers' file)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", ADDED_TOKENS)
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
        self._vectors = self._add_tokens(folder / ADDED_TOKENS) if (folder / ADDED_TOKENS).is_file() else {}

    def _add_tokens(self, path: Path) -> dict[int, list[int]]:
        """Textual-inversion tokens, matched whole before BPE as transformers matches added tokens; -> each
        token's id -> the ids of its vectors (a multi-vector embedding `t` is t, t_1, t_2, ... as diffusers
        names and expands them)."""
        added = read_json(path)
        order = sorted(added, key=added.get)
        first = self._tok.get_vocab_size()
        if not all(isinstance(added[t], int) for t in order) or [added[t] for t in order] != list(range(first, first + len(order))):
            raise SdrtError(f"{path}: token ids must be {first}, {first + 1}, ... (following vocab.json), in any order")
        self._tok.add_tokens([AddedToken(t, normalized=True) for t in order])
        vectors = {}
        for token in order:
            ids, i = [added[token]], 1
            while f"{token}_{i}" in added:
                ids.append(added[f"{token}_{i}"])
                i += 1
            vectors[added[token]] = ids
        return vectors

    def _ids(self, ids: list[int]) -> list[int]:
        return [v for i in ids for v in self._vectors.get(i, (i,))] if self._vectors else ids

    def chunks(self, prompt: str) -> np.ndarray:
        """The AUTOMATIC1111 WebUI's long prompts: -> (k, max_length) int32, the tokens cut into chunks of
        max_length - 2, each with bos, eos and padding (k >= 1; without its comma backtracking and
        emphasis weights)."""
        room = self.max_length - 2
        tokens = self._ids(self._tok.encode(prompt, add_special_tokens=False).ids)
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
            tokens = self._ids(encoding.ids)
            if len(tokens) > room:
                kept = next(j for j in range(len(encoding.ids) + 1) if len(self._ids(encoding.ids[: j + 1])) > room)
                dropped = prompts[row][encoding.offsets[kept][0]:]
                log.warning("prompt is %d tokens long; the text encoder takes %d, so this end of it was dropped: %r "
                            "(--long-prompts chunk keeps it)", len(tokens), room, dropped)
                tokens = tokens[:room]
            ids[row, : len(tokens) + 2] = [self.bos_id, *tokens, self.eos_id]
        return ids
