"""Ray, for real: one Ray instance on this machine (`ray start --head`), used through --ray-address by `sdrt serve
--ray` (two replicas behind Ray Serve's proxy) and `sdrt generate-batch --ray` (two workers, killed mid-way and
resumed). Without --ray-address each command starts a local instance of its own, the same code path past ray.init."""

import base64
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers import free_port, generate, start_server, stop_server

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

PROMPTS = ["a red circle on a white background", "a large blue square on a gray background", "a small green triangle on a white background"]


@pytest.fixture(scope="module")
def cluster():
    """A Ray head started here with 2 CPUs -> its address as a user on this machine gives it ("auto"); stopped, with
    everything deployed on it, after."""
    subprocess.run(["ray", "start", "--head", "--port", str(free_port()), "--num-cpus", "2", "--include-dashboard", "false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=120)
    yield "auto"
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)


def test_serve_on_ray_with_two_replicas_gives_generates_images(shapes_engines, cluster):
    process, url = start_server(shapes_engines, "--ray", "--ray-address", cluster, "--replicas", "2", "--threads", "1", "--max-queue", "2",
                                timeout=240)
    try:
        ray.init(address=cluster, log_to_driver=False, configure_logging=False)
        try:
            from ray import serve

            replicas = serve.status().applications["sdrt"].deployments["sdrt"].replica_states
        finally:
            ray.shutdown()
        assert replicas == {"RUNNING": 2}, replicas

        def one(seed):
            body = {"prompt": PROMPTS[seed % 3], "steps": 30, "width": 64, "height": 64, "seed": seed, "sampler_name": "Euler",
                    "cfg_scale": 7.5}
            return seed, httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, range(4)))
        for seed, answer in answers:
            assert answer.status_code == 200, answer.text
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB"))
            assert np.array_equal(image, generate(shapes_engines, prompt=PROMPTS[seed % 3], seed=seed, steps=30, width=64, height=64,
                                                  scheduler="euler", guidance=7.5)[0]), seed
            assert json.loads(answer.json()["info"])["seed"] == seed
        refused = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 500}, timeout=60)
        assert refused.status_code == 422 and "steps 500: this server's limit is 150" in refused.json()["detail"]
    finally:
        stop_server(process)


def test_batch_on_ray_killed_midway_resumes_without_doing_an_image_twice(shapes_engines, cluster, tmp_path):
    """Two workers; SIGKILL to the driver once some images exist (Ray ends its actors); the same command again makes
    exactly the missing ones."""
    count = 20
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": PROMPTS[i % 3], "steps": 25}) + "\n" for i in range(count)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sdrt.cli", "generate-batch", str(shapes_engines), str(prompts), "--out", str(out), "--ray",
               "--ray-address", cluster, "--workers", "2", "--threads", "1"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while len(list(out.glob("*.png"))) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    done_first = sorted(p.name for p in out.glob("*.png"))
    assert 3 <= len(done_first) < count, (len(done_first), first.stderr.read())
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"{count - len(done_first)} written, {len(done_first)} already there, 0 failed" in second.stdout, second.stdout
    assert sorted(p.name for p in out.glob("*.png")) == [f"{line:05d}.png" for line in range(1, count + 1)]
    for line in (1, count):  # the seed of a line without one is line - 1
        expected = generate(shapes_engines, prompt=PROMPTS[(line - 1) % 3], seed=line - 1, steps=25)[0]
        assert np.array_equal(np.asarray(Image.open(out / f"{line:05d}.png").convert("RGB")), expected), line
