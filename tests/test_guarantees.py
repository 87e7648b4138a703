"""What sdrt promises about the user's files, its own caches and engine folders (README, Guarantees):
nothing overwritten or lost, nothing trusted unverified, leftovers of killed runs cleaned up, bad
input refused in one line. Concurrency cases run the real CLI in parallel processes."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_clean_error, sdrt, sdrt_background
from sdrt.engines.base import BuildConfig
from sdrt.engines.cache import BuildCache
from sdrt.errors import SdrtError
from sdrt.files import LEFTOVER_AGE_S, remove_leftovers
from sdrt.image_io import read_metadata
from sdrt.manifest import CONTENT_HASH, MANIFEST, file_sha256, load_manifest, write_manifest
from sdrt.pipeline import GenerateRequest, StableDiffusion

pytest.importorskip("diffusers")

from sdrt.exporters.build import build_engines  # noqa: E402

QUICK = BuildConfig(accuracy_prompts=0)


def image(engines: Path) -> np.ndarray:
    pipe = StableDiffusion.from_engine_folder(engines)
    try:
        return pipe.generate(GenerateRequest(prompt="a red circle", steps=3, seed=1), progress=False)[0]
    finally:
        pipe.close()


def flip_byte(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def age(path: Path) -> None:
    """Make an entry look older than a leftover must be."""
    old = time.time() - 10 * LEFTOVER_AGE_S
    os.utime(path, (old, old), follow_symlinks=False)


def wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def staging_folders(parent: Path, out_name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{out_name}.building-")]


def rewrite_manifest(root: Path, manifest: dict) -> None:
    """Write `manifest` as a build would, with a content hash that matches (what a careful forger does)."""
    write_manifest(root, {k: v for k, v in manifest.items() if k not in ("format_version", "sdrt_version", CONTENT_HASH)})


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small filesystem of its own at `path`: full after `size`, or read-only."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a tmpfs (root in a sandbox, as CI runs)")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# 1. build cache poisoning


def test_a_changed_cache_entry_is_evicted_and_rebuilt(tiny_models, tmp_path):
    model, cache = tiny_models["sd1"], tmp_path / "cache"
    e0 = tmp_path / "E0"
    clean = build_engines(model, e0, QUICK, cache=BuildCache(cache))["files"]
    clean_image = image(e0)
    for i, rel in enumerate(("unet/model.cpu-optimized.onnx", "unet/model.onnx")):  # an engine entry, then an export entry
        assert (e0 / rel).stat().st_nlink > 1  # shared with the cache: an edit here reaches it
        flip_byte(e0 / rel)
        with pytest.raises(SdrtError, match="does not match its hash"):
            load_manifest(e0)
        rebuilt = build_engines(model, tmp_path / f"E{i + 1}", QUICK, cache=BuildCache(cache))
        assert rebuilt["files"][rel] != file_sha256(e0 / rel), rel  # not the changed bytes with a fresh hash
        load_manifest(tmp_path / f"E{i + 1}")
        assert np.array_equal(image(tmp_path / f"E{i + 1}"), clean_image)
    assert rebuilt["export_cache"] == "miss"  # the re-export is the same graph, so the (clean) engine entry is reused
    build_engines(model, e0, QUICK, overwrite=True, cache=BuildCache(cache))  # the advice the error gives works
    assert load_manifest(e0)["files"]["unet/model.onnx"] == clean["unet/model.onnx"] and np.array_equal(image(e0), clean_image)


# 2. --out is never replaced without --overwrite, nor ever when it is not an engine folder


def test_a_folder_that_appears_at_out_during_the_build_is_kept(tiny_models, tmp_path):
    out = tmp_path / "E"
    build = sdrt_background("build", tiny_models["sd1"], "--out", out, "--no-cache", "--accuracy-prompts", "0", "--overwrite")
    wait_for(lambda: staging_folders(tmp_path, "E"))
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    _, stderr = build.communicate(timeout=300)
    assert build.returncode == 2 and "is not an sdrt engine folder" in stderr, stderr  # even with --overwrite
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "mine"
    assert not staging_folders(tmp_path, "E")


# 3. concurrent runs never replace each other's output


def test_concurrent_generates_to_one_output_write_it_once(tiny_engines, tmp_path):
    out = tmp_path / "out.png"
    runs = [sdrt_background("generate", tiny_engines["sd1"], "--prompt", "x", "--steps", "2", "--seed", str(seed), "--output", out, "--quiet")
            for seed in range(4)]
    ends = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    winners = [seed for seed, (code, _) in enumerate(ends) if code == 0]
    assert len(winners) == 1, ends
    for code, stderr in ends:
        assert code == 0 or (code == 2 and "already exists" in stderr), stderr
    assert read_metadata(out)["seed"] == winners[0]
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


# 4. what interrupted runs leave is recovered or cleaned up


def test_an_interrupted_overwrite_swap_is_recovered(tiny_models, tiny_engines, tmp_path):
    out, previous = tmp_path / "E1", tmp_path / ".E1.previous"
    shutil.copytree(tiny_engines["sd1"], out)
    shutil.copytree(tiny_engines["sd1"], previous)  # killed after the swap, before deleting the old folder
    build_engines(tiny_models["sd1"], out, QUICK, overwrite=True)
    assert not previous.exists()
    load_manifest(out)
    out.rename(previous)  # killed between the two renames: the old folder is all there is
    with pytest.raises(SdrtError, match="already exists"):
        build_engines(tiny_models["sd1"], out, QUICK)
    assert not previous.exists()
    load_manifest(out)


def test_a_killed_build_leaves_nothing_the_next_one_keeps(tiny_models, tmp_path):
    build = sdrt_background("build", tiny_models["sd1"], "--out", tmp_path / "E", "--no-cache", "--accuracy-prompts", "0")
    wait_for(lambda: staging_folders(tmp_path, "E"))
    build.send_signal(signal.SIGKILL)
    build.wait(timeout=60)
    [leftover] = staging_folders(tmp_path, "E")
    live = tmp_path / ".E.building-live"
    live.mkdir()
    for folder in (leftover, live):
        age(folder)
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live build holds its folder
        build_engines(tiny_models["sd1"], tmp_path / "E", QUICK)
        assert staging_folders(tmp_path, "E") == [live]  # the killed build's folder went, the live one's stays
    finally:
        os.close(fd)
    load_manifest(tmp_path / "E")
    assert remove_leftovers(tmp_path, ".E.building-") == [live]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_end_a_build_cleanly(tiny_models, tmp_path, stop):
    build = sdrt_background("build", tiny_models["sd1"], "--out", tmp_path / "E", "--no-cache", "--accuracy-prompts", "0")
    wait_for(lambda: staging_folders(tmp_path, "E"))
    build.send_signal(stop)
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == 128 + stop and stderr.strip().endswith("sdrt: interrupted"), stderr
    assert list(tmp_path.iterdir()) == []


def test_png_leftovers_are_removed_unless_a_live_run_writes_them(tiny_engines, tmp_path):
    stale, live = tmp_path / ".out.png.x1.tmp", tmp_path / ".out.png.x2.tmp"
    stale.write_bytes(b"half a png")
    live.write_bytes(b"being written")
    for path in (stale, live):
        age(path)
    with live.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the writing process holds it
        result = sdrt("generate", tiny_engines["sd1"], "--prompt", "x", "--steps", "2", "--output", tmp_path / "out.png", "--quiet")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out.png"]


# 5. trust boundaries of the model folder


def test_tokenizer_files_must_be_the_model_folders_own(tiny_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["sd1"], model)
    private = tmp_path / "private" / "vocab.json"
    private.parent.mkdir()
    shutil.move(model / "tokenizer" / "vocab.json", private)
    private.chmod(0o600)
    (model / "tokenizer" / "vocab.json").symlink_to(private)
    assert_clean_error(sdrt("build", model, "--out", tmp_path / "E"), "outside the model folder")
    (model / "tokenizer" / "vocab.json").unlink()
    (model / "tokenizer" / "vocab.json").symlink_to(Path("..") / "text_encoder" / "config.json")  # inside, but not a vocabulary
    (model / "tokenizer" / "vocab.json").unlink()
    (model / "tokenizer" / "vocab.json").write_text("{not json")
    assert_clean_error(sdrt("build", model, "--out", tmp_path / "E"), "vocab.json is not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "private"]


# 6. the manifest decides the math: it is covered too, and names only files inside the folder


def test_an_edited_manifest_is_refused(tiny_engines, tmp_path):
    copy = tmp_path / "E"
    shutil.copytree(tiny_engines["sd1"], copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    edited = {**manifest, "model": {**manifest["model"], "scaling_factor": 1.0}}
    (copy / MANIFEST).write_text(json.dumps(edited))
    assert_clean_error(sdrt("info", copy), "was changed after it was built", "rebuild")
    assert_clean_error(sdrt("info", copy, "--no-verify"), "was changed after it was built")
    (tmp_path / "secret.txt").write_text("private")
    for outside in ("../secret.txt", str(tmp_path / "secret.txt"), "unet/../../secret.txt"):
        rewrite_manifest(copy, {**manifest, "files": {**manifest["files"], outside: file_sha256(tmp_path / "secret.txt")}})
        assert_clean_error(sdrt("info", copy), "not a path inside the engine folder")
    (copy / "link.txt").symlink_to(tmp_path / "secret.txt")
    rewrite_manifest(copy, {**manifest, "files": {**manifest["files"], "link.txt": file_sha256(tmp_path / "secret.txt")}})
    assert_clean_error(sdrt("info", copy), "is a link")


def test_external_data_under_any_name_is_hash_checked(tiny_engines, tmp_path):
    import onnx

    copy = tmp_path / "E"
    shutil.copytree(tiny_engines["sd1"], copy)
    graph = copy / "unet" / "model.cpu-optimized.onnx"
    model = onnx.load(str(graph))
    graph.unlink()
    onnx.save_model(model, str(graph), save_as_external_data=True, location="weights.bin")
    manifest = json.loads((copy / MANIFEST).read_text())
    files = {**manifest["files"], "unet/model.cpu-optimized.onnx": file_sha256(graph)}
    rewrite_manifest(copy, {**manifest, "files": files})  # weights.bin is not listed: its bytes are vouched for by nothing
    out = tmp_path / "o.png"
    assert_clean_error(sdrt("generate", copy, "--prompt", "x", "--steps", "2", "--output", out), "weights.bin is not listed")
    rewrite_manifest(copy, {**manifest, "files": {**files, "unet/weights.bin": file_sha256(copy / "unet" / "weights.bin")}})
    assert sdrt("generate", copy, "--prompt", "x", "--steps", "2", "--output", out).returncode == 0
    flip_byte(copy / "unet" / "weights.bin")
    assert_clean_error(sdrt("generate", copy, "--prompt", "x", "--steps", "2", "--output", out, "--overwrite"), "weights.bin does not match its hash")


# 7. unsafe or broken model folders: one clear line, no engine folder


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


@pytest.mark.parametrize("folder,changes,fragments", [
    ("unet", {"block_out_channels": None}, ["unet/config.json", "'block_out_channels' is missing"]),
    ("unet", {"cross_attention_dim": "big"}, ["cross_attention_dim 'big' is not accepted"]),
    ("unet", {"sample_size": -8}, ["sample_size -8 is not accepted"]),
    ("unet", {"sample_size": 10**9}, ["sample_size 1000000000 is not accepted"]),
    ("unet", {"in_channels": 4.5}, ["in_channels 4.5 is not accepted"]),
    ("vae", {"scaling_factor": "x"}, ["scaling_factor 'x' is not accepted"]),
    ("scheduler", {"_class_name": "UNet2DConditionModel"}, ["'UNet2DConditionModel' is not a scheduler class"]),
    ("scheduler", {"prediction_type": "noise"}, ["prediction_type 'noise' is not accepted"]),
    ("scheduler", {"num_train_timesteps": "many"}, ["scheduler_config.json"]),
])
def test_broken_model_configs(tiny_models, tmp_path, capsys, folder, changes, fragments):
    from sdrt.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_models["sd1"], model)
    config = model / folder / ("scheduler_config.json" if folder == "scheduler" else "config.json")
    _edit_json(config, **changes)
    assert main(["build", str(model), "--out", str(tmp_path / "E"), "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("sdrt: error: ") and "\n" not in line and all(f in line for f in fragments), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_pickle_is_refused_and_never_run(tiny_models, tmp_path, capsys):
    from sdrt.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_models["sd1"], model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    payload = f"import os, pickle\nclass P:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n" \
              f"pickle.dump({{'w': P()}}, open('{model / 'unet' / 'diffusion_pytorch_model.bin'}', 'wb'))\n"
    subprocess.run([sys.executable, "-c", payload], check=True)
    assert main(["build", str(model), "--out", str(tmp_path / "E"), "--no-cache", "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("sdrt: error: ") and "\n" not in line, line
    assert "unet/diffusion_pytorch_model.bin" in line and "never runs code" in line
    assert not marker.exists() and not (tmp_path / "E").exists()


# 8. resources


def test_threads_are_bounded_by_the_machine(tiny_engines, tmp_path):
    cores = len(os.sched_getaffinity(0))
    result = sdrt("generate", tiny_engines["sd1"], "--prompt", "x", "--steps", "2", "--threads", "999", "--output", tmp_path / "o.png", "--quiet")
    assert result.returncode == 0 and f"--threads 999 is more than the {cores} cores" in result.stderr and f"using {cores}" in result.stderr
    assert_clean_error(sdrt("generate", tiny_engines["sd1"], "--prompt", "x", "--threads", "-1", "--output", tmp_path / "p.png"),
                       "--threads -1 is not accepted", f"1 .. {cores}")


# 9. the cache is optional


def test_a_cache_that_cannot_be_written_is_skipped_with_a_warning(tiny_models, tmp_path, caplog):
    (tmp_path / "file").write_text("")
    with tmpfs(tmp_path / "full", "64k") as full, tmpfs(tmp_path / "ro", "64k", read_only=True) as read_only:
        for root in (tmp_path / "file" / "cache", full / "cache", read_only / "cache"):
            caplog.clear()
            out = tmp_path / f"E-{root.parent.name}"
            build_engines(tiny_models["sd1"], out, QUICK, cache=BuildCache(root))
            load_manifest(out)
            assert any("building without it" in r.message for r in caplog.records), root
        assert not [p for p in full.rglob("*") if p.name.startswith(".")]  # no partial entries left


def test_openvino_without_a_writable_model_cache(openvino_engines, tmp_path):
    engines = openvino_engines("sd1")
    env = {"HOME": "/proc/self", "SDRT_CACHE_DIR": None, "XDG_CACHE_HOME": None}  # a home no one can write, not even root
    result = sdrt("generate", engines, "--prompt", "x", "--steps", "2", "--output", tmp_path / "o.png", "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("model cache /proc/self/.cache/sdrt/openvino cannot be written") == 1  # once, not per component


# 10. processes share OpenVINO's model cache


def test_concurrent_openvino_generates_on_a_cold_model_cache(openvino_engines, tmp_path):
    engines = openvino_engines("sd1")
    for trial in range(2):
        cache = tmp_path / f"cache-{trial}"
        runs = [sdrt_background("generate", engines, "--prompt", "a red circle", "--steps", "2", "--output", tmp_path / f"{trial}-{i}.png",
                                "--quiet", cache_dir=cache) for i in range(4)]
        for run in runs:
            assert run.wait(timeout=300) == 0, run.stderr.read()
            assert run.stderr.read() == ""
        first = (tmp_path / f"{trial}-0.png").read_bytes()
        assert all((tmp_path / f"{trial}-{i}.png").read_bytes() == first for i in range(4))


# 11. where builds cannot write, and requests the machine cannot hold


def test_build_targets_that_cannot_be_written(tiny_models, tmp_path, capsys):
    from sdrt.cli import main

    model = str(tiny_models["sd1"])
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    cases = [([str(user_file)], "already exists"), ([str(user_file), "--overwrite"], "is not an sdrt engine folder"),
             ([str(user_file / "E")], "is a file, not a folder")]
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as read_only, tmpfs(tmp_path / "full", "200k") as full:
        cases += [([str(read_only / "E")], "Read-only file system"), ([str(full / "E"), "--no-cache"], "No space left on device")]
        for args, fragment in cases:
            assert main(["build", model, "--accuracy-prompts", "0", "--quiet", "--out", *args]) == 2
            line = capsys.readouterr().err.strip()
            assert line.startswith("sdrt: error: ") and "\n" not in line and fragment in line, line
        assert list(full.iterdir()) == []
    assert user_file.read_text() == "mine"


def test_a_request_larger_than_the_machine_is_refused_before_work(tiny_engines, tmp_path):
    result = sdrt("generate", tiny_engines["sd1"], "--prompt", "x", "--height", "4096", "--width", "4096", "--output", tmp_path / "o.png")
    assert_clean_error(result, "4096x4096", "needs at least", "GiB available")
    assert list(tmp_path.iterdir()) == []


# 12. prompts


def test_a_prompt_that_is_not_utf8(tiny_engines, tmp_path):
    result = sdrt("generate", tiny_engines["sd1"], "--prompt", b"caf\xe9", "--output", tmp_path / "o.png")
    assert_clean_error(result, "--prompt is not valid UTF-8")


# 13. a benchmark child that dies says how


def test_bench_children_report_how_they_ended(tmp_path):
    from sdrt.benchmarks.harness import run_logged

    noisy = "import sys; print('sdrt: error: --precision int9 is not supported', file=sys.stderr); " \
            "print('Please consider to run pre-processing before quantization.', file=sys.stderr); sys.exit(2)"
    failed = run_logged([sys.executable, "-c", noisy], tmp_path / "logs" / "noisy.log")
    assert failed.returncode == 2 and failed.reason().startswith("exit status 2, peak RSS ")
    assert ": sdrt: error: --precision int9 is not supported (log: " in failed.reason()
    assert "pre-processing" in (tmp_path / "logs" / "noisy.log").read_text()
    killed = run_logged([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], tmp_path / "logs" / "killed.log")
    assert killed.returncode == -signal.SIGKILL and "killed by SIGKILL" in killed.reason() and killed.peak_rss_mb > 1


# verified once, trusted while unchanged (sdrt/verified.py)


def test_verified_files_are_trusted_only_while_unchanged(tiny_engines, tmp_path):
    copy, cache = tmp_path / "E", tmp_path / "cache"
    shutil.copytree(tiny_engines["sd1"], copy)
    args = ("generate", copy, "--prompt", "x", "--steps", "2", "--output", tmp_path / "o.png", "--overwrite", "--quiet")
    assert sdrt(*args, cache_dir=cache).returncode == 0
    [record] = (cache / "verified").glob("*.json")  # the copy is verified once, on its own
    recorded = json.loads(record.read_text())
    assert recorded["folder"] == str(copy.resolve()) and "unet/model.cpu-optimized.onnx" in recorded["files"]
    graph = copy / "unet" / "model.cpu-optimized.onnx"
    before = graph.stat()
    flip_byte(graph)  # same size; then the mtime put back: only the ctime (which no one can set) moved
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert graph.stat().st_size == before.st_size and graph.stat().st_mtime_ns == before.st_mtime_ns
    assert_clean_error(sdrt(*args, cache_dir=cache), "model.cpu-optimized.onnx does not match its hash")
    # the record is what is trusted: one that claims the changed file's identity (only the user's own
    # cache can hold it) lets it through, which is why it is kept there and keyed by that identity
    st = graph.stat()
    recorded["files"]["unet/model.cpu-optimized.onnx"][1] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    record.write_text(json.dumps(recorded))
    assert sdrt(*args, cache_dir=cache).returncode == 0
    assert_clean_error(sdrt(*args, "--verify", "always", cache_dir=cache), "model.cpu-optimized.onnx does not match its hash")
    trusting = sdrt(*args, "--verify", "never", cache_dir=cache)
    assert trusting.returncode == 0 and "--verify never: the hashes of" in trusting.stderr and "are not checked" in trusting.stderr
    assert_clean_error(sdrt(*args, "--verify", "sometimes", cache_dir=cache), "--verify 'sometimes'", "always, changed, never")


@pytest.mark.parametrize("broken", ["text_encoder", "unet", "vae_decoder"])
def test_each_component_is_loaded_only_after_its_files_passed(tiny_engines, tmp_path, monkeypatch, broken):
    """Components load two at a time, each verified then opened: a changed file of one stops the load, and that
    component is never opened (the others may be: each passed its own check)."""
    from sdrt.engines.onnxruntime import OnnxRuntimeEngine

    copy = tmp_path / "E"
    shutil.copytree(tiny_engines["sd1"], copy)
    flip_byte(copy / broken / "model.cpu-optimized.onnx")
    opened = []
    real_load = OnnxRuntimeEngine.load.__func__
    monkeypatch.setattr(OnnxRuntimeEngine, "load", classmethod(lambda cls, d, spec, cfg: opened.append(d.name) or real_load(cls, d, spec, cfg)))
    with pytest.raises(SdrtError, match=f"{broken}/model.cpu-optimized.onnx does not match its hash"):
        StableDiffusion.from_engine_folder(copy, verify="always")
    assert broken not in opened and set(opened) <= {"text_encoder", "unet", "vae_decoder"}, opened
