"""The `sdrt` command in subprocesses: torch-free generation, outputs, metadata, clear errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import assert_clean_error, in_process, sdrt
from sdrt.image_io import read_metadata

BLOCKED = ("torch", "diffusers", "transformers")


@pytest.fixture(scope="module")
def no_torch_path(tmp_path_factory) -> Path:
    """A folder that, first on PYTHONPATH, makes importing torch, diffusers or transformers fail."""
    root = tmp_path_factory.mktemp("blocked")
    for name in BLOCKED:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    return root


def test_package_import_does_not_pull_torch(no_torch_path):
    code = "import sys, sdrt, sdrt.cli, sdrt.pipeline, sdrt.engines.onnxruntime; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(no_torch_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_generate_without_torch_writes_pngs_with_metadata(tiny_engines, no_torch_path, tmp_path):
    out = tmp_path / "out.png"
    result = sdrt("generate", tiny_engines["sd1"], "--prompt", "a red circle", "--negative-prompt", "blurry", "--steps", "5",
                  "--seed", "7", "--scheduler", "euler_a", "--num-images", "2", "--output", out, "--quiet", blocked=no_torch_path)
    assert result.returncode == 0, result.stderr
    assert not out.exists() and (tmp_path / "out-0.png").exists() and (tmp_path / "out-1.png").exists()
    meta = read_metadata(tmp_path / "out-1.png")
    assert meta["prompt"] == "a red circle" and meta["negative_prompt"] == "blurry" and meta["seed"] == 7
    assert meta["scheduler"] == "euler_a" and meta["steps"] == 5 and meta["image_index"] == 1
    assert meta["backend"] == "onnxruntime" and meta["precision"] == "fp32" and len(meta["model_hash"]) == 12
    assert (meta["height"], meta["width"]) == (16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0.png", "out-1.png"]  # no temporary files left


def test_refuses_to_overwrite_without_flag(tiny_engines, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"user data")
    result = sdrt("generate", tiny_engines["sd1"], "--prompt", "x", "--steps", "2", "--output", out)
    assert_clean_error(result, "already exists", "--overwrite")
    assert out.read_bytes() == b"user data"
    assert sdrt("generate", tiny_engines["sd1"], "--prompt", "x", "--steps", "2", "--output", out, "--overwrite").returncode == 0
    assert read_metadata(out)["prompt"] == "x"


def test_info_shows_the_build(tiny_engines):
    result = sdrt("info", tiny_engines["sd2"])
    assert result.returncode == 0, result.stderr
    assert "v_prediction" in result.stdout and "onnxruntime" in result.stdout and "hashes verified" in result.stdout
    manifest = json.loads(sdrt("info", tiny_engines["sd2"], "--json").stdout)
    assert all(c["export_max_abs_error"] < 1e-4 for c in manifest["components"].values())
    stages = manifest["build_stages"]  # fp32 onnxruntime: the export and each engine built (not those from the build cache)
    assert "export" in stages and set(stages) <= {"export", *manifest["components"]}, stages
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 50 for s in stages.values()), stages
    peak = max(stages, key=lambda name: stages[name]["peak_rss_mb"])
    assert f"build:       {manifest['build_seconds']} s, peak memory {stages[peak]['peak_rss_mb'] / 1024:.1f} GB ({peak})" in result.stdout


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--height", "33"], ["--height 33", "multiple of 2"]),
        (["--width", "0"], ["--width 0", "positive multiple"]),
        (["--scheduler", "heun"], ["--scheduler 'heun'", "accepted values are", "dpmpp_2m"]),
        (["--steps", "0"], ["--steps 0", "1 .. 1000"]),
        (["--num-images", "0"], ["--num-images 0"]),
        (["--seed", "-3"], ["--seed -3"]),
        (["--seed", "lucky"], ["--seed 'lucky'", "-1 / random"]),
        (["--steps", "1000", "--scheduler", "dpmpp_2m"], ["--steps 1000", "repeats a noise level", "use at most"]),
        (["--scheduler", "DPM++ 3M"], ["'DPM++ 3M'", "DPM++ 2M Karras"]),
        (["--prompt"], ["--prompt: expected one argument"]),
        (["--stpes", "3"], ["unrecognized arguments: --stpes"]),
        (["--karras", "--scheduler", "ddim"], ["--karras"]),
        (["--output", "out.jpg"], ["only .png"]),
        (["--output", "missing-dir/out.png"], ["does not exist"]),
        (["--device", "quantum"], ["--device 'quantum'", "cpu"]),
    ],
)
def test_bad_generate_input_is_one_clear_line(tiny_engines, tmp_path, args, fragments):
    base = ["generate", tiny_engines["sd1"], "--prompt", "x", "--steps", "2", "--output", "out.png"]
    result = sdrt(*base, *args, cwd=tmp_path)
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "out.png").exists()


def test_output_parent_is_a_file(tiny_engines, tmp_path):
    (tmp_path / "file").write_text("")
    assert_clean_error(sdrt("generate", tiny_engines["sd1"], "--prompt", "x", "--output", tmp_path / "file" / "o.png"), "does not exist")


def test_bad_engine_folders(tiny_engines, tmp_path):
    assert_clean_error(sdrt("generate", tmp_path / "nowhere", "--prompt", "x", "--output", tmp_path / "o.png"), "does not exist", "sdrt build")
    assert_clean_error(sdrt("generate", tmp_path, "--prompt", "x", "--output", tmp_path / "o.png"), "manifest.json is missing")

    copy = tmp_path / "engines"
    shutil.copytree(tiny_engines["sd1"], copy)
    with open(copy / "unet" / "model.cpu-optimized.onnx", "ab") as f:  # what generate loads
        f.write(b"\0")
    assert_clean_error(sdrt("generate", copy, "--prompt", "x", "--output", tmp_path / "o.png"), "does not match its hash", "rebuild")
    shutil.copy2(tiny_engines["sd1"] / "unet" / "model.cpu-optimized.onnx", copy / "unet")
    with open(copy / "vae_encoder" / "model.onnx", "ab") as f:  # info checks every file
        f.write(b"\0")
    assert_clean_error(sdrt("info", copy), "does not match its hash", "rebuild")

    manifest = json.loads((tiny_engines["sd1"] / "manifest.json").read_text())
    shutil.rmtree(copy)
    shutil.copytree(tiny_engines["sd1"], copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 999}))
    assert_clean_error(sdrt("info", copy), "format version 999", "rebuild")
    (copy / "manifest.json").write_text("{not json")
    assert_clean_error(sdrt("info", copy), "not valid JSON")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "vae_decoder" / "model.onnx").unlink()
    assert_clean_error(sdrt("info", copy), "is missing", "rebuild")


def test_build_errors(tiny_models, tiny_engines, tmp_path):
    assert_clean_error(sdrt("build", tiny_models["sd1"], "--out", tiny_engines["sd1"]), "already exists", "--overwrite")
    assert_clean_error(sdrt("build", tmp_path / "nope", "--out", tmp_path / "e"), "model folder", "does not exist")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["sd1"], broken)
    (broken / "unet" / "config.json").unlink()
    assert_clean_error(sdrt("build", broken, "--out", tmp_path / "e"), "unet/config.json is missing")
    assert_clean_error(sdrt("build", tiny_models["sd1"], "--out", tmp_path / "e", "--backend", "tvm"), "--backend 'tvm'", "onnxruntime")
    assert_clean_error(sdrt("build", tiny_models["sd1"], "--out", tmp_path / "e", "--precision", "fp8"), "--precision 'fp8'", "fp32")
    assert_clean_error(sdrt("build", tiny_models["sd1"], "--out", tmp_path / "e", "--precision", "fp16"), "fp16", "not available for onnxruntime")
    assert_clean_error(sdrt("build", tiny_models["sd1"], "--out", tmp_path / "e", "--static-shape", "64by64", "--backend", "openvino"), "--static-shape '64by64'", "HEIGHTxWIDTH")
    assert_clean_error(sdrt("build", tiny_models["sd1"], "--out", tmp_path / "e", "--static-shape", "63x64", "--backend", "openvino"), "--static-shape 63x64", "multiples of 2")
    assert_clean_error(sdrt("build", tiny_models["sd1"], "--out", tmp_path / "e", "--device", "cuda"), "--device cuda", "onnxruntime-gpu")
    assert not (tmp_path / "e").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".e.")], "a failed build left its staging folder"
    user = tmp_path / "user-folder"
    user.mkdir()
    (user / "precious.txt").write_text("keep")
    assert_clean_error(sdrt("build", tiny_models["sd1"], "--out", user, "--overwrite"), "not an sdrt engine folder")
    assert (user / "precious.txt").read_text() == "keep"


def test_cache_shows_and_clears_what_builds_and_loads_left(tiny_models, tmp_path):
    pytest.importorskip("openvino")
    cache, engines = tmp_path / "cache", tmp_path / "engines"
    built = sdrt("build", tiny_models["sd1"], "--out", engines, "--backend", "openvino", "--accuracy-prompts", "0", cache_dir=cache)
    assert built.returncode == 0, built.stderr
    progress = built.stderr.splitlines()  # a line per stage with its time, and no other library's notes
    assert all(line.startswith("sdrt: [") for line in progress), built.stderr
    assert "exporting unet" in built.stderr and "writing" in progress[-1]
    first = sdrt("generate", engines, "--prompt", "a red circle", "--output", tmp_path / "a.png", "--steps", "3", cache_dir=cache)
    assert first.returncode == 0, first.stderr
    shown = sdrt("cache", cache_dir=cache)
    assert shown.returncode == 0 and str(cache) in shown.stdout
    counts = {line.split()[0]: int(line.split()[1]) for line in shown.stdout.splitlines()[1:-1]}
    assert counts["exports"] == 4 and counts["engines"] == 4 and counts["openvino"] >= 3 and counts["models"] == 0  # a blob per loaded component
    cleared = sdrt("cache", "--clear", "openvino,engines", cache_dir=cache)
    assert cleared.returncode == 0 and f"deleted {counts['openvino'] + 4} entries" in cleared.stdout
    assert not any((cache / "openvino").iterdir()) and not list(cache.glob("engine-*")) and len(list(cache.glob("export-*"))) == 4
    again = sdrt("generate", engines, "--prompt", "a red circle", "--output", tmp_path / "b.png", "--steps", "3", cache_dir=cache)
    assert again.returncode == 0, again.stderr  # the engine folder does not depend on the cache
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert sdrt("cache", "--clear", "all", cache_dir=cache).returncode == 0 and not list(cache.glob("export-*"))
    assert_clean_error(sdrt("cache", "--clear", "blobs", cache_dir=cache), "--clear 'blobs'", "accepted values are exports, engines")


def test_webui_habits(tiny_engines, tmp_path):
    """--seed -1 / random, WebUI sampler names, and WebUI's `parameters` infotext in the PNG."""
    from PIL import Image

    out = tmp_path / "r.png"
    result = sdrt("generate", tiny_engines["sd1"], "--prompt", "a red circle", "--negative-prompt", "blurry", "--steps", "3", "--seed", "-1",
                  "--scheduler", "dpm++ 2m KARRAS", "--guidance", "6", "--num-images", "2", "--output", out, "--quiet", "--verbose")
    assert result.returncode == 0, result.stderr
    [seed] = [int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("seed: ")]
    meta = read_metadata(tmp_path / "r-1.png")
    assert meta["seed"] == seed and meta["scheduler"] == "dpmpp_2m" and meta["karras_sigmas"] is True
    with Image.open(tmp_path / "r-1.png") as im:
        parameters = im.text["parameters"]
    assert parameters == (f"a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.0, "
                          f"Seed: {seed}, Size: 16x16, Model hash: {meta['model_hash']}, Model: {meta['model']}, Batch size: 2, Batch pos: 1, Version: sdrt 0.1.0")
    again = sdrt("generate", tiny_engines["sd1"], "--prompt", "a red circle", "--negative-prompt", "blurry", "--steps", "3", "--seed", str(seed),
                 "--scheduler", "dpmpp_2m", "--karras", "--guidance", "6", "--num-images", "2", "--output", tmp_path / "s.png", "--quiet")
    assert again.returncode == 0 and "seed:" not in again.stderr
    assert (tmp_path / "s-1.png").read_bytes() != b"" and np.array_equal(np.asarray(Image.open(tmp_path / "s-1.png")),
                                                                         np.asarray(Image.open(tmp_path / "r-1.png")))


def test_small_first_hour_bugs(tiny_engines, tmp_path):
    engines = tiny_engines["sd1"]
    assert sdrt("info", engines, "--verbose").returncode == 0  # --verbose after the command
    reader_gone = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "info", "--json", str(engines)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    reader_gone.stdout.close()  # as `| head` does
    assert reader_gone.wait(timeout=60) == 141 and reader_gone.stderr.read() == ""
    (tmp_path / "file").write_text("")
    assert_clean_error(sdrt("info", tmp_path / "file"), "is a file, not an engine folder")
    loud = sdrt("generate", engines, "--prompt", "x", "--steps", "2", "--guidance", "1e6", "--output", tmp_path / "g.png", "--quiet")
    assert loud.returncode == 0 and "--guidance 1e+06 is far above where guidance helps" in loud.stderr
    copy = tmp_path / "E"
    shutil.copytree(engines, copy)
    (copy / "unet" / "model.cpu-optimized.onnx").unlink()  # was: a silent fall-back to the unoptimised graph
    assert_clean_error(sdrt("generate", copy, "--prompt", "x", "--output", tmp_path / "m.png"), "model.cpu-optimized.onnx is missing", "rebuild")


def test_per_image_batch_noise_makes_every_image_reproducible_alone(tiny_engines, tmp_path):
    from PIL import Image

    common = ["generate", tiny_engines["sd1"], "--prompt", "a red circle", "--steps", "3", "--scheduler", "euler_a", "--quiet"]
    assert sdrt(*common, "--seed", "5", "--num-images", "3", "--batch-noise", "per-image", "--output", tmp_path / "b.png").returncode == 0
    assert sdrt(*common, "--seed", "7", "--output", tmp_path / "alone.png").returncode == 0
    meta = read_metadata(tmp_path / "b-2.png")
    assert meta["image_seed"] == 7 and meta["batch_noise"] == "per-image"
    with Image.open(tmp_path / "b-2.png") as batch, Image.open(tmp_path / "alone.png") as alone:
        assert np.array_equal(np.asarray(batch), np.asarray(alone))  # euler_a: the step noise is per image too
        assert "Seed: 7," in batch.text["parameters"] and "Batch pos" not in batch.text["parameters"]


def test_img2img_and_inpainting_without_torch(tiny_engines, no_torch_path, tmp_path):
    from conftest import half_mask, picture

    picture(70, 54).save(tmp_path / "in.png")
    half_mask(70, 54).save(tmp_path / "mask.png")
    result = sdrt("generate", tiny_engines["sd1"], "--prompt", "a blue circle", "--init-image", tmp_path / "in.png", "--strength", "0.6",
                  "--steps", "10", "--output", tmp_path / "a.png", "--quiet", blocked=no_torch_path)
    assert result.returncode == 0, result.stderr
    meta = read_metadata(tmp_path / "a.png")
    assert meta["task"] == "img2img" and meta["strength"] == 0.6 and (meta["width"], meta["height"]) == (70, 54)
    result = sdrt("generate", tiny_engines["sd1"], "--prompt", "a blue circle", "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                  "--mask-blur", "2", "--steps", "10", "--output", tmp_path / "b.png", "--quiet", blocked=no_torch_path)
    assert result.returncode == 0, result.stderr
    meta = read_metadata(tmp_path / "b.png")
    assert meta["task"] == "inpaint" and meta["strength"] == 1.0 and meta["mask_blur"] == 2.0
    with Image.open(tmp_path / "b.png") as png:
        assert "Denoising strength: 1.0, Mask blur: 2.0" in png.text["parameters"]


def test_task_inputs_errors_are_one_line_and_write_nothing(tiny_engines, tiny_inpaint_engines, tiny_upscaler, tiny_unclip, tmp_path, capsys):
    from conftest import half_mask, picture

    picture(70, 54).save(tmp_path / "in.png")
    half_mask(70, 54).save(tmp_path / "mask.png")
    half_mask(60, 54).save(tmp_path / "small-mask.png")
    (tmp_path / "notes.txt").write_text("hello")
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    cases = [
        (["--init-image", tmp_path / "nope.png"], ["--init-image", "does not exist"]),
        (["--init-image", tmp_path / "notes.txt"], ["--init-image", "not an image Pillow can read"]),
        (["--init-image", image, "--image", image, "--mask", mask], ["cannot be combined"]),
        (["--image", image], ["needs both --image and --mask", "--mask is missing"]),
        (["--mask", mask], ["--image is missing"]),
        (["--strength", "0.5"], ["--strength does not apply to txt2img"]),
        (["--init-image", image, "--strength", "0"], ["--strength 0 is out of range", "0 < strength <= 1"]),
        (["--init-image", image, "--strength", "1.5"], ["--strength 1.5 is out of range"]),
        (["--init-image", image, "--strength", "0.01"], ["runs no denoising step"]),
        (["--init-image", image, "--mask-blur", "3"], ["--mask-blur does not apply to img2img"]),
        (["--image", image, "--mask", tmp_path / "small-mask.png"], ["--mask is 60x54 but --image is 70x54"]),
        (["--image", image, "--mask", mask, "--mask-blur", "-1"], ["--mask-blur -1.0 must be"]),
        (["--init-image", image, "--height", "31"], ["--height 31", "multiple of 2"]),
    ]
    for extra, fragments in cases:
        result = in_process(capsys, "generate", tiny_engines["sd1"], "--prompt", "x", "--steps", "20", *extra, "--output", tmp_path / "out.png")
        assert_clean_error(result, *fragments)
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "flat.png")
    for extra, fragments in [(["--init-image", image, "--depth-map", mask], ["--depth-map does not apply to img2img"]),
                             (["--init-image", image, "--depth-map", tmp_path / "flat.png"], ["--depth-map", "is flat"])]:
        assert_clean_error(in_process(capsys, "generate", tiny_engines["sd1"], "--prompt", "x", *extra, "--output", tmp_path / "out.png"), *fragments)
    assert_clean_error(in_process(capsys, "generate", tiny_engines["sd1"], "--prompt", "x", "--noise-level", "5", "--output", tmp_path / "out.png"),
                       "--noise-level does not apply to txt2img")
    assert_clean_error(in_process(capsys, "generate", tiny_engines["sd1"], "--output", tmp_path / "out.png"), "--prompt is required")
    for extra, fragments in [(["--noise-level", "1000"], ["--noise-level 1000 is out of range", "0 .. 999"]),
                             (["--height", "36"], ["--height 36 is not accepted by unCLIP models: a multiple of 8"])]:
        assert_clean_error(in_process(capsys, "generate", tiny_unclip[1], "--image", image, *extra, "--output", tmp_path / "out.png"), *fragments)
    for extra, fragments in [(["--image", image, "--noise-level", "351"], ["--noise-level 351 is out of range", "0 .. 350"]),
                             (["--image", image, "--mask", mask], ["run upscale, not inpaint", "give --image"])]:
        assert_clean_error(in_process(capsys, "generate", tiny_upscaler[1], "--prompt", "x", *extra, "--output", tmp_path / "out.png"), *fragments)
    for extra, fragments in [([], ["run inpaint, not txt2img", "give --image and --mask"]),
                             (["--init-image", image], ["not img2img"])]:
        result = in_process(capsys, "generate", tiny_inpaint_engines["sd1-inpaint"], "--prompt", "x", *extra, "--output", tmp_path / "out.png")
        assert_clean_error(result, *fragments)
    assert not (tmp_path / "out.png").exists()


def test_installed_runtime_runs_every_task_without_torch(tiny_engines, tiny_inpaint_engines, tiny_depth, tiny_upscaler, tiny_unclip, no_torch_path,
                                                         tmp_path):
    """`pip install .` (no extras, not editable) holds every module the tasks need, and none of them imports torch."""
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", target,
                              Path(__file__).resolve().parents[1]], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    code = """
import sys
from pathlib import Path
import numpy as np
from PIL import Image
import sdrt
assert sdrt.__file__.startswith(sys.argv[1]), sdrt.__file__
from sdrt.pipeline import GenerateRequest, StableDiffusion
picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
mask = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (24, 1)))
runs = [(sys.argv[2], {}), (sys.argv[2], {"init_image": picture}), (sys.argv[2], {"image": picture, "mask": mask}),
        (sys.argv[3], {"image": picture, "mask": mask}), (sys.argv[4], {"init_image": picture}), (sys.argv[5], {"image": picture}),
        (sys.argv[6], {"image": picture})]
for folder, inputs in runs:
    pipe = StableDiffusion.from_engine_folder(Path(folder))
    image = pipe.generate(GenerateRequest(prompt="x", steps=4, **inputs), progress=False)[0]
    print(pipe.settings(GenerateRequest(prompt="x", **inputs)).task, image.shape)
    pipe.close()
assert "torch" not in sys.modules
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(no_torch_path), str(target)])}
    result = subprocess.run([sys.executable, "-c", code, str(target), tiny_engines["sd1"], tiny_inpaint_engines["sd1-inpaint"], tiny_depth[1],
                             tiny_upscaler[1], tiny_unclip[1]], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:7] == ["txt2img (16, 16, 3)", "img2img (24, 32, 3)", "inpaint (24, 32, 3)", "inpaint (24, 32, 3)",
                                              "depth (24, 32, 3)", "upscale (96, 128, 3)", "unclip (32, 32, 3)"], result.stdout
