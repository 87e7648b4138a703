"""`sdrt serve` with the real clients (the `webuiapi` package, the official `openai` package, httpx) against a
server started on 127.0.0.1 with the default model: the same seed gives `sdrt generate`'s image; queue,
limits, interrupts, authentication and bad requests answer as documented."""

import base64
import concurrent.futures
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import half_mask, picture
from helpers import generate, start_server, stop_server

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("fastapi")

KEY = "test-key"


@pytest.fixture(scope="module")
def server(shapes_engines):
    """-> base URL of `sdrt serve` on the default model: API key, one request waiting at most, small limits."""
    process, url = start_server(shapes_engines, "--api-key", KEY, "--max-queue", "1", "--max-images", "2", "--max-steps", "200",
                                "--threads", "1")
    yield url
    stop_server(process)


def _webui(url):
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), username="any", password=KEY)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_webuiapi_txt2img_gives_generates_images(server, shapes_engines):
    api = _webui(server)
    result = api.txt2img(prompt="a red circle on a white background", seed=5, steps=12, width=64, height=64, cfg_scale=7.0,
                         sampler_name="DPM++ 2M", batch_size=2)
    assert result.info["all_seeds"] == [5, 6] and result.info["sampler_name"] == "DPM++ 2M" and result.info["scheduler"] == "Karras"
    for index, seed in enumerate((5, 6)):  # the WebUI's seed + i, which sdrt generate --seed S+i makes alone
        expected = generate(shapes_engines, prompt="a red circle on a white background", seed=seed, steps=12, width=64, height=64,
                            guidance=7.0, scheduler="dpmpp_2m", karras=True)[0]
        assert np.array_equal(np.asarray(result.images[index].convert("RGB")), expected)
    assert "Seed: 5" in result.info["infotexts"][0] and "Sampler: DPM++ 2M" in result.info["infotexts"][0]
    assert result.images[0].text["parameters"] == result.info["infotexts"][0]


def test_webuiapi_img2img_and_inpainting(server, shapes_engines):
    api = _webui(server)
    image, mask = picture(64, 64), half_mask(64, 64)
    result = api.img2img(images=[image], prompt="a blue square", seed=3, steps=10, width=64, height=64, denoising_strength=0.6,
                         sampler_name="Euler a", cfg_scale=7.5)
    expected = generate(shapes_engines, prompt="a blue square", seed=3, steps=10, width=64, height=64, guidance=7.5, scheduler="euler_a",
                        init_image=image, strength=0.6)[0]
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), expected)
    result = api.img2img(images=[image], mask_image=mask, prompt="a blue square", seed=3, steps=10, width=64, height=64,
                         denoising_strength=1.0, sampler_name="Euler", mask_blur=0, inpaint_full_res=False, cfg_scale=7.5)
    expected = generate(shapes_engines, prompt="a blue square", seed=3, steps=10, width=64, height=64, guidance=7.5, scheduler="euler",
                        image=image, mask=mask, strength=1.0, mask_blur=0)[0]
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), expected)
    with pytest.raises(RuntimeError, match="inpaint_full_res: inpainting only the masked area"):  # the client's default
        api.img2img(images=[image], mask_image=mask, prompt="a blue square", steps=2, width=64, height=64)


def test_openai_client_gives_generates_image(server, shapes_engines):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY)
    result = client.images.generate(prompt="a green square", size="64x64", response_format="b64_json", n=1, extra_body={"seed": 11})
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    assert np.array_equal(image, generate(shapes_engines, prompt="a green square", seed=11, width=64, height=64)[0])
    with pytest.raises(openai.BadRequestError, match="steps 500: this server's limit is 200"):
        client.images.generate(prompt="x", size="64x64", extra_body={"steps": 500})
    with pytest.raises(openai.BadRequestError, match="3 images per request: this server's limit is 2"):
        client.images.generate(prompt="x", size="64x64", n=3)
    with pytest.raises(openai.BadRequestError, match="response_format 'url' is not supported"):
        client.images.generate(prompt="x", size="64x64", response_format="url")
    with pytest.raises(openai.BadRequestError, match="width 60 is not accepted: it must be a positive multiple of 8"):
        client.images.generate(prompt="x", size="60x64")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong").images.generate(prompt="x", size="64x64")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_openai_edits_inpaint_where_transparent_else_rework_the_image(server, shapes_engines):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY)
    image, mask = picture(64, 64), half_mask(64, 64)  # mask: white = repaint (sdrt's convention)
    transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    transparent.putalpha(Image.eval(mask, lambda v: 255 - v))  # OpenAI's convention: alpha 0 = edit here
    result = client.images.edit(image=("in.png", _png(image), "image/png"), mask=("mask.png", _png(transparent), "image/png"),
                                prompt="a red circle", size="64x64", response_format="b64_json", extra_body={"seed": 4, "steps": 10})
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    assert np.array_equal(got, generate(shapes_engines, prompt="a red circle", seed=4, steps=10, width=64, height=64, image=image, mask=mask)[0])
    result = client.images.edit(image=("in.png", _png(image), "image/png"), prompt="a red circle", size="64x64",
                                extra_body={"seed": 4, "steps": 10})
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    assert np.array_equal(got, generate(shapes_engines, prompt="a red circle", seed=4, steps=10, width=64, height=64, init_image=image,
                                        strength=0.8)[0])
    with pytest.raises(openai.BadRequestError, match="mask: it has no fully transparent pixels"):
        client.images.edit(image=("in.png", _png(image), "image/png"), mask=("m.png", _png(image), "image/png"), prompt="x", size="64x64")


def test_progress_and_interrupt(server):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{server}/sdapi/v1/txt2img", headers=_auth(), timeout=120,
                              json={"prompt": "a red circle", "steps": 200, "width": 64, "height": 64, "seed": 1})
        deadline, state = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            state = httpx.get(f"{server}/sdapi/v1/progress", headers=_auth()).json()
            if state["state"]["sampling_step"] >= 2:
                break
            time.sleep(0.05)
        assert 0 < state["progress"] < 1 and state["state"]["sampling_steps"] == 200 and state["eta_relative"] > 0
        while state["current_image"] is None and time.monotonic() < deadline:  # asked for above: made at a coming step
            state = httpx.get(f"{server}/sdapi/v1/progress", headers=_auth()).json()
            time.sleep(0.05)
        preview = Image.open(io.BytesIO(base64.b64decode(state["current_image"])))
        assert preview.size == (64, 64) and state["textinfo"].startswith("preview of step ")
        assert httpx.get(f"{server}/sdapi/v1/progress", headers=_auth(), params={"skip_current_image": "true"}).json()["current_image"] is None
        assert httpx.post(f"{server}/sdapi/v1/interrupt", headers=_auth()).status_code == 200
        response = running.result()
    assert response.status_code == 200 and len(response.json()["images"]) == 1  # the latents reached, decoded
    assert httpx.get(f"{server}/sdapi/v1/progress", headers=_auth()).json()["state"]["job_count"] == 0


def test_preview_decodes_the_running_latents(shapes_engines):
    """pipe.preview of the last step's latents is the image itself (no averaging at 8x8 latents); larger latents
    are averaged down to <= 16x16 first and decoded by the same VAE."""
    from sdrt.pipeline import GenerateRequest, StableDiffusion

    pipe = StableDiffusion.from_engine_folder(shapes_engines)
    try:
        seen = []
        image = pipe.generate(GenerateRequest(prompt="a red circle on a white background", seed=4, steps=8),
                              progress=False, on_step=lambda done, total, latents: seen.append(latents.copy()) or True)[0]
        assert len(seen) == 8 and seen[-1].shape == (1, 4, 8, 8)
        assert np.array_equal(pipe.preview(seen[-1]), image)
        assert pipe.preview(seen[-1], max_side=4).shape == (32, 32, 3)  # 2x2 blocks averaged: a 4x4 latent
        big = np.repeat(np.repeat(seen[-1], 5, axis=2), 5, axis=3)  # (1, 4, 40, 40): blocks of 3 -> 13x13 latents
        assert pipe.preview(big).shape == (104, 104, 3)
    finally:
        pipe.close()


def test_a_full_queue_answers_429_and_loses_nothing(server):
    body = {"prompt": "a red circle", "steps": 40, "width": 64, "height": 64, "seed": 2}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{server}/sdapi/v1/txt2img", headers=_auth(), json=body, timeout=120), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and 429 in codes, codes  # one running, one waiting (--max-queue 1)
    assert all(r.headers["retry-after"] for r in responses if r.status_code == 429)
    images = {r.json()["images"][0] for r in responses if r.status_code == 200}
    assert len(images) == 1  # the same request, the same image, each time
    health = httpx.get(f"{server}/health").json()
    assert health == {"status": "ok", "waiting": 0, "busy": False}


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_load_50_at_once_then_150_more_without_growing(shapes_engines):
    """50 concurrent requests against --max-queue 8: each gets its own image (its seed) or a 429, nothing lost,
    nothing twice; the server stays up; 150 more requests (200 in all) do not grow its memory."""
    process, url = start_server(shapes_engines, "--max-queue", "8", "--threads", "1")
    try:
        def one(seed):
            body = {"prompt": "a red circle on a white background", "steps": 4, "width": 64, "height": 64, "seed": seed}
            return seed, httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(one, range(50)))
        codes = [r.status_code for _, r in answers]
        assert set(codes) <= {200, 429} and codes.count(200) >= 9 and 429 in codes, codes  # one running + 8 waiting at least
        served = {seed: r.json() for seed, r in answers if r.status_code == 200}
        assert all(body["parameters"]["seed"] == seed and json.loads(body["info"])["all_seeds"] == [seed] for seed, body in served.items())
        assert len({body["images"][0] for body in served.values()}) == len(served)  # 50 seeds, as many different images
        before = _rss_mb(process.pid)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # as many at once as the queue holds: none refused
            answers = list(pool.map(one, range(100, 250)))
        assert [r.status_code for _, r in answers] == [200] * 150
        assert [json.loads(r.json()["info"])["seed"] for _, r in answers] == list(range(100, 250))
        grown = _rss_mb(process.pid) - before
        print(f"RSS {before:.0f} MB after 50 requests, +{grown:.1f} MB after 150 more")
        assert grown < 40, f"RSS grew {grown:.0f} MB over 150 requests"
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "waiting": 0, "busy": False}
    finally:
        stop_server(process)


def test_a_client_that_goes_away_frees_its_place(server):
    body = {"prompt": "a red circle", "steps": 150, "width": 64, "height": 64, "seed": 2}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{server}/sdapi/v1/txt2img", headers=_auth(), json=body, timeout=120)
        while not httpx.get(f"{server}/health").json()["busy"]:
            time.sleep(0.05)
        with pytest.raises(httpx.ReadTimeout):  # waits behind the running one, then hangs up
            httpx.post(f"{server}/sdapi/v1/txt2img", headers=_auth(), json=body, timeout=0.5)
        deadline = time.monotonic() + 5
        while httpx.get(f"{server}/health").json()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{server}/health").json()["waiting"] == 0
        httpx.post(f"{server}/sdapi/v1/interrupt", headers=_auth())
        assert running.result().status_code == 200


def test_metrics_and_authentication(server):
    assert httpx.get(f"{server}/metrics").status_code == 401
    text = httpx.get(f"{server}/metrics", headers=_auth()).text
    assert "sdrt_images_total" in text and "sdrt_step_seconds_bucket" in text and "sdrt_queue_depth" in text
    for path in ("/sdapi/v1/sd-models", "/sdapi/v1/samplers", "/sdapi/v1/options", "/sdapi/v1/scripts", "/sdapi/v1/progress"):
        assert httpx.get(f"{server}{path}").status_code == 401, path
        assert httpx.get(f"{server}{path}", headers=_auth()).status_code == 200, path
    assert httpx.get(f"{server}/sdapi/v1/sd-models", auth=("user", KEY)).json()[0]["model_name"] == "sdrt-shapes"
    assert httpx.get(f"{server}/sdapi/v1/sd-models", auth=("user", "wrong")).status_code == 401


@pytest.mark.parametrize("body,status,fragment", [
    ({"prompt": "x", "sampler_name": "Heun"}, 422, "sampler_name 'Heun' is not supported: accepted values are DDIM"),
    ({"prompt": "x", "scheduler": "exponential"}, 422, "scheduler 'exponential' is not supported"),
    ({"prompt": "x", "enable_hr": True}, 422, "enable_hr: hires fix is not supported"),
    ({"prompt": "x", "steps": 500}, 422, "steps 500: this server's limit is 200"),
    ({"prompt": "x", "width": 60}, 422, "width 60 is not accepted: it must be a positive multiple of 8"),
    ({"prompt": "x", "seed": 2**40}, 422, "seed 1099511627776 is out of range"),
    ({"prompt": "x", "steps": "many"}, 422, "steps: Input should be a valid integer"),
])
def test_bad_webui_requests_name_the_field(server, body, status, fragment):
    response = httpx.post(f"{server}/sdapi/v1/txt2img", headers=_auth(), json={"width": 64, "height": 64, **body})
    assert response.status_code == status and fragment in response.json()["detail"], response.text


def test_bad_json_oversize_and_bad_images(server):
    response = httpx.post(f"{server}/sdapi/v1/txt2img", headers={**_auth(), "content-type": "application/json"}, content=b"{not json")
    assert response.status_code == 422
    response = httpx.post(f"{server}/sdapi/v1/img2img", headers=_auth(), content=b"x" * (51 * 1024 * 1024))
    assert response.status_code == 413 and "limit is 52428800" in response.json()["detail"]
    for image, fragment in (("%%%", "init_images[0]: not base64 image data"), (base64.b64encode(b"not an image").decode(),
                                                                              "init_images[0] is not an image Pillow can read"),
                            ("../../etc/passwd", "init_images[0]: not base64 image data")):
        response = httpx.post(f"{server}/sdapi/v1/img2img", headers=_auth(), json={"prompt": "x", "init_images": [image]})
        assert response.status_code == 422 and fragment in response.json()["detail"], response.text
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_serve_without_the_extra_or_with_bad_options_says_so(shapes_engines, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "fastapi.py").write_text("raise ImportError('blocked', name='fastapi')")
    result = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", str(shapes_engines)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(blocked)})
    assert result.returncode == 2 and "needs the serve extra" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", str(shapes_engines), "--port", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and "--port" in result.stderr


def test_the_page_generates_in_a_browser(server, shapes_engines, tmp_path):
    """Debian's Chromium, headless, driven by Playwright: type a prompt, generate, watch the bar move and the image
    appear; the screenshot is kept ($SDRT_TEST_ARTIFACTS, else the test's folder)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (CI installs Debian's: apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    artifacts = os.environ.get("SDRT_TEST_ARTIFACTS") or str(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(f"{server}/")
            page.wait_for_function("document.getElementById('sampler_name').options.length === 0")  # no key yet: the list stays empty
            page.fill("#apikey", KEY)
            page.dispatch_event("#apikey", "change")
            page.wait_for_function("document.getElementById('sampler_name').value === 'DPM++ 2M'")
            for field, value in (("#prompt", "a red circle on a white background"), ("#steps", "150"), ("#seed", "7"), ("#width", "64"),
                                 ("#height", "64")):
                page.fill(field, value)
            page.click("#go")
            page.wait_for_function("(() => { const v = document.getElementById('progress').value; return v > 0 && v < 1; })()", timeout=60_000)
            page.wait_for_function("document.getElementById('preview').src.startsWith('data:image/png')", timeout=60_000)  # live preview
            page.wait_for_selector("img.result", timeout=120_000)
            page.screenshot(path=os.path.join(artifacts, "serve-page.png"))
            caption = page.inner_text("figcaption")
            src = page.get_attribute("img.result", "src")
        finally:
            browser.close()
    assert "Seed: 7" in caption and "Steps: 150" in caption
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2]))).convert("RGB"))
    assert np.array_equal(shown, generate(shapes_engines, prompt="a red circle on a white background", seed=7, steps=150, width=64, height=64,
                                          guidance=7.5, scheduler="dpmpp_2m", karras=True)[0])
