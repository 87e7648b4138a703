"""Textual-inversion embeddings added at build time: the torch-free tokenizer gives the token ids that
transformers' tokenizer gives after diffusers' multi-vector expansion, and the image is diffusers' with
load_textual_inversion."""

import numpy as np
import pytest

from conftest import psnr
from helpers import assert_clean_error, generate, in_process

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of shiny, a <cat-toy> on a table", "shinyshiny <cat-toy><cat-toy>", "no new token here", "shiny " * 40]


def webui_embedding(path, vectors: int, dim: int = 32, seed: int = 0):
    """The WebUI's .pt layout: string_to_param["*"] (vectors, dim) and a name."""
    g = torch.Generator().manual_seed(seed)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(vectors, dim, generator=g)}, "name": path.stem,
                "step": 100}, path)
    return path


def diffusers_embedding(path, token: str, dim: int = 32, seed: int = 1):
    from safetensors.torch import save_file

    save_file({token: torch.randn(dim, generator=torch.Generator().manual_seed(seed))}, str(path))
    return path


@pytest.mark.slow
def test_embeddings_match_diffusers_load_textual_inversion(tiny_models, tiny_engines, tmp_path, capsys):
    from sdrt.tokenizer import CLIPTokenizer

    model = tiny_models["sd1"]
    shiny = webui_embedding(tmp_path / "shiny.pt", vectors=3)
    toy = diffusers_embedding(tmp_path / "learned_embeds.safetensors", "<cat-toy>")
    result = in_process(capsys, "build", model, "--embedding", shiny, "--embedding", f"{toy}:<cat-toy>", "--out", tmp_path / "E", "--quiet")
    assert result.returncode == 0, result.stderr

    ref = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    ref.load_textual_inversion(str(shiny), token="shiny")
    ref.load_textual_inversion(str(toy), token="<cat-toy>")
    ours = CLIPTokenizer(tmp_path / "E" / "tokenizer")
    for prompt in PROMPTS:
        expected = ref.tokenizer(ref.maybe_convert_prompt(prompt, ref.tokenizer), padding="max_length", max_length=77, truncation=True).input_ids
        assert ours([prompt])[0].tolist() == expected, prompt
    # the token matches in any case, as transformers matches it; diffusers expands only the exact spelling to all its
    # vectors (a case-sensitive str.replace) and leaves "Shiny" one vector: sdrt gives every spelling all three
    assert ours(["a Shiny SHINY thing"]).tolist() == ours(["a shiny shiny thing"]).tolist()

    ref.set_progress_bar_config(disable=True)
    prompt = PROMPTS[0]
    expected = (ref(prompt, num_inference_steps=8, guidance_scale=7.5, generator=torch.Generator().manual_seed(3), output_type="np")
                .images[0] * 255).round().astype(np.uint8)
    got = generate(tmp_path / "E", prompt=prompt, steps=8, scheduler="pndm")[0]
    assert psnr(got, expected) >= 60
    plain = generate(tiny_engines["sd1"], prompt=prompt, steps=8, scheduler="pndm")[0]
    assert psnr(got, plain) < 45, "the embeddings changed nothing visible: the comparison would prove nothing"  # tiny models answer weakly
    info = in_process(capsys, "info", tmp_path / "E").stdout
    assert "embedding shiny.pt as the token shiny (3 vectors)" in info and "as the token <cat-toy> (1 vector)" in info


def test_embedding_errors_are_one_line(tiny_models, tmp_path, capsys):
    model = tiny_models["sd1"]
    wide = webui_embedding(tmp_path / "wide.pt", vectors=2, dim=1024)  # an SD 2 embedding on an SD 1 model
    cases = [
        (("--embedding", wide), "--embedding " + str(wide) + ": diffusers could not add it to this model"),
        (("--embedding", tmp_path / "none.pt"), "no such file"),
        (("--embedding", f"{wide}:a", "--embedding", f"{wide}:a"), "two embeddings would be called 'a'"),
    ]
    for args, fragment in cases:
        assert_clean_error(in_process(capsys, "build", model, *args, "--out", tmp_path / "E", "--quiet"), fragment)
    assert not (tmp_path / "E").exists()
