"""Whole txt2img pipelines against diffusers' StableDiffusionPipeline: same model, seed, scheduler."""

import json
import shutil

import numpy as np
import pytest

from conftest import psnr

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.pipeline import GenerateRequest, StableDiffusion  # noqa: E402
from sdrt.schedulers import DIFFUSERS_CLASS_OF  # noqa: E402

MIN_PSNR = 40.0

CASES = [
    ("sd1", "pndm", 20, 7.5, 1, None),
    ("sd1", "dpmpp_2m", 20, 7.5, 2, None),
    ("sd1", "euler_a", 15, 5.0, 1, None),
    ("sd1", "ddim", 10, 1.0, 1, None),  # no classifier-free guidance
    ("sd1", "euler", 12, 7.5, 1, (48, 64)),  # non-square, not the default size
    ("sd1", "lms", 12, 7.5, 1, None),
    ("sd2", "ddim", 20, 7.5, 1, None),
    ("sd2", "dpmpp_2m", 20, 7.5, 1, (40, 24)),
    ("sd2", "euler_a", 15, 7.5, 2, None),
]


@pytest.fixture(scope="module")
def reference_pipes(tiny_models):
    return {kind: diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None) for kind, path in tiny_models.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind,scheduler,steps,guidance,num_images,size", CASES)
def test_image_matches_diffusers(kind, scheduler, steps, guidance, num_images, size, tiny_engines, reference_pipes):
    ref = reference_pipes[kind]
    ref.scheduler = getattr(diffusers, DIFFUSERS_CLASS_OF[scheduler]).from_config(ref.scheduler.config)
    height, width = size or (None, None)
    prompt, negative, seed = "a lighthouse at dusk", "blurry", 42
    expected = ref(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, height=height,
                   width=width, num_images_per_prompt=num_images, generator=torch.Generator().manual_seed(seed),
                   output_type="np").images
    expected = (expected * 255).round().astype(np.uint8)

    pipe = StableDiffusion.from_engine_folder(tiny_engines[kind])
    got = pipe.generate(GenerateRequest(prompt=prompt, negative_prompt=negative, steps=steps, guidance=guidance, seed=seed,
                                        scheduler=scheduler, height=height, width=width, num_images=num_images), progress=False)
    pipe.close()
    assert len(got) == num_images
    for ours, theirs in zip(got, expected):
        assert ours.shape == theirs.shape
        assert theirs.std() > 2, "reference image is flat: the comparison would prove nothing"
        assert psnr(ours, theirs) >= MIN_PSNR, psnr(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a", "ddim"])
def test_zero_terminal_snr_model_matches_diffusers(scheduler, tiny_models, tmp_path_factory):
    """An SD2-style v-prediction model whose scheduler config asks for zero terminal SNR and trailing spacing."""
    from sdrt.engines.base import BuildConfig
    from sdrt.exporters.build import build_engines

    root = tmp_path_factory.mktemp("zero-snr")
    model = root / "model"
    shutil.copytree(tiny_models["sd2"], model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    engines = root / "engines"
    build_engines(model, engines, BuildConfig(accuracy_prompts=0))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    ref.scheduler = getattr(diffusers, DIFFUSERS_CLASS_OF[scheduler]).from_config(ref.scheduler.config)
    assert ref.scheduler.config.rescale_betas_zero_snr
    expected = ref("a lighthouse at dusk", num_inference_steps=12, guidance_scale=7.5, generator=torch.Generator().manual_seed(5),
                   output_type="np").images[0]
    expected = (expected * 255).round().astype(np.uint8)
    pipe = StableDiffusion.from_engine_folder(engines)
    got = pipe.generate(GenerateRequest(prompt="a lighthouse at dusk", steps=12, guidance=7.5, seed=5, scheduler=scheduler), progress=False)[0]
    pipe.close()
    assert expected.std() > 2
    assert psnr(got, expected) >= MIN_PSNR, psnr(got, expected)


@pytest.mark.slow
def test_chunked_long_prompts_match_diffusers_given_the_same_embeddings(tiny_engines, tiny_models, reference_pipes):
    """--long-prompts chunk against diffusers fed the WebUI-style embeddings computed with transformers:
    each 75-token chunk with bos/eos/padding through the text encoder, concatenated along the sequence;
    the shorter prompt padded with empty chunks."""
    ref = reference_pipes["sd1"]
    ref.scheduler = getattr(diffusers, DIFFUSERS_CLASS_OF["dpmpp_2m"]).from_config(ref.scheduler.config)  # other tests change it
    prompt = ", ".join(["a lighthouse at dusk", "stormy sea", "dramatic clouds", "oil painting"] * 12)  # 3 chunks
    negative = "blurry"
    tok, encoder = ref.tokenizer, ref.text_encoder
    room = tok.model_max_length - 2

    def chunks(text: str) -> list[list[int]]:
        ids = tok(text, add_special_tokens=False).input_ids
        pieces = [ids[i : i + room] for i in range(0, len(ids), room)] or [[]]
        return [[tok.bos_token_id, *p, tok.eos_token_id] + [tok.pad_token_id] * (room - len(p)) for p in pieces]

    pos, neg = chunks(prompt), chunks(negative)
    assert len(pos) >= 3
    neg += chunks("") * (len(pos) - len(neg))
    with torch.no_grad():
        embed = [encoder(torch.tensor(c))[0].reshape(1, -1, encoder.config.hidden_size) for c in (pos, neg)]
    expected = ref(prompt_embeds=embed[0], negative_prompt_embeds=embed[1], num_inference_steps=10, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    expected = (expected * 255).round().astype(np.uint8)
    pipe = StableDiffusion.from_engine_folder(tiny_engines["sd1"])
    try:
        request = GenerateRequest(prompt=prompt, negative_prompt=negative, steps=10, guidance=7.5, seed=3, scheduler="dpmpp_2m",
                                  long_prompts="chunk")
        got = pipe.generate(request, progress=False)[0]
        truncated = pipe.generate(GenerateRequest(**{**request.__dict__, "long_prompts": "truncate"}), progress=False)[0]
    finally:
        pipe.close()
    assert expected.std() > 2 and psnr(got, expected) >= MIN_PSNR, psnr(got, expected)
    assert psnr(truncated, expected) < MIN_PSNR  # the chunks beyond the first change the image
