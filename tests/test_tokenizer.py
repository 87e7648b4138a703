"""Token-for-token parity of sdrt's CLIP tokenizer with transformers.CLIPTokenizer on the real CLIP vocabulary."""

import logging
import random

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from sdrt.exporters.clip_vocab import write_clip_tokenizer  # noqa: E402
from sdrt.tokenizer import CLIPTokenizer  # noqa: E402

FIXED = [
    "", " ", "   ", "\t\n", "a", "A photo of a cat", "a lighthouse at dusk, highly detailed, 8k",
    "An astronaut riding a horse on Mars!!!", "café crème brûlée", "naïve résumé Ångström",
    "Straße über Köln", "東京の夜景", "北京 故宫", "서울의 밤", "Москва зимой", "παλιά Αθήνα",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "🙂 happy dog 🐶🐕", "👩‍🚀 astronaut ❤️", "🏳️‍🌈 flag",
    "3.14159 and 42 and 1,000,000", "1024x768 resolution", "hello...world", "what?!", "((masterpiece)), [best quality]",
    "<|startoftext|> a cat <|endoftext|>", "a cat <|endoftext|>", "it's, they're, we've, I'm, you'll, he'd",
    "DON'T SHOUT", "tabs\tand\nnewlines\r\nand  double  spaces", "emoji👍without spaces", "a---b___c***d",
    "@user #hashtag $100 % ^ & * ( ) = + { } | \\ / < > ~ `", "ﬁne ligature", "full－width　ｓｐａｃｅ", "e\u0301 combining",
    "zero\u200bwidth", "a" * 300, "word " * 100, "😀" * 80, "supercalifragilisticexpialidocious " * 10,
]
WORDS = ["red", "cat", "Painting", "of", "a", "castle", "neon", "cyberpunk", "city", "ÉTÉ", "forêt", "日本", "🌸", "!!", ",", "42",
         "x", "portrait", "by", "greg", "rutkowski", "octane", "render", "4k", "...", "'s", "-", "—", "“quoted”", "mañana"]


def prompts():
    rng = random.Random(0)
    out = list(FIXED)
    while len(out) < 320:
        n = rng.choice([1, 3, 8, 20, 90])
        out.append(rng.choice([" ", "  ", ", "]).join(rng.choice(WORDS) for _ in range(n)))
    return out


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1-pad-eos", "sd2-pad-bang"])
def tokenizer_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_clip_tokenizer(folder, pad_token=request.param)
    return folder


def test_matches_transformers_token_for_token(tokenizer_dir):
    ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    ours = CLIPTokenizer(tokenizer_dir)
    batch = prompts()
    assert len(batch) >= 300
    expected = np.array(ref(batch, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids)
    got = ours(batch)
    assert got.shape == (len(batch), 77)
    for prompt, e, g in zip(batch, expected, got):
        assert g.tolist() == e.tolist(), prompt


def test_overlong_prompt_warns_quoting_what_is_dropped(tokenizer_dir, caplog):
    ours = CLIPTokenizer(tokenizer_dir)
    with caplog.at_level(logging.WARNING):
        ids = ours(["word " * 75 + "and THIS is lost"])
    assert "79 tokens long" in caplog.text and "this end of it was dropped: 'and THIS is lost'" in caplog.text
    assert ids[0, 0] == ours.bos_id and ids[0, -1] == ours.eos_id


def test_missing_vocab_is_a_clear_error(tmp_path):
    from sdrt.errors import SdrtError

    with pytest.raises(SdrtError, match="vocab.json is missing"):
        CLIPTokenizer(tmp_path)
