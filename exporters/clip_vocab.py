"""Write CLIP tokenizer files (vocab.json, merges.txt, configs) from CLIP's byte-pair merge list.

The merge list is `data/clip-bpe/bpe_simple_vocab_16e6.txt.gz` (open_clip, MIT license): line 1 is
a header, the next 48,894 lines are the merges CLIP uses. The vocabulary is the 256 byte-to-unicode
characters, the same with "</w>", each merge joined, then the start and end tokens (49,408 in all).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

CLIP_BPE = Path(__file__).parent / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = [], 0
    for b in range(256):
        if b in printable:
            codes.append(b)
        else:
            codes.append(256 + extra)
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    return [chr(codes[b]) for b in order]


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> None:
    """CLIP's own tokenizer files (49,408 tokens)."""
    merges = gzip.open(CLIP_BPE, "rt", encoding="utf-8").read().split("\n")[1 : CLIP_MERGES + 1]
    write_tokenizer(folder, merges, pad_token, model_max_length)


def learn_merges(texts: list[str]) -> list[str]:
    """Byte-pair merges learnt from `texts` with CLIP's normalisation and word splitting, until
    every word of the texts is one token."""
    import tempfile

    from tokenizers import Tokenizer, trainers
    from tokenizers.models import BPE

    from sdrt.tokenizer import clip_normalizer, clip_pre_tokenizer

    tok = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer, tok.pre_tokenizer = clip_normalizer(), clip_pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
                                  initial_alphabet=_bytes_to_unicode())
    tok.train_from_iterator(texts, trainer)
    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        lines = (Path(tmp) / "merges.txt").read_text(encoding="utf-8").split("\n")
    return [line for line in lines if line and not line.startswith("#version")]


def write_tokenizer(folder: Path, merges: list[str], pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> None:
    """vocab.json (bytes, bytes + "</w>", each merge joined, start, end), merges.txt and configs."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
