"""`sdrt bench` smoke run on the tiny model: the harness, the JSON contract, the reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("openvino")

from sdrt.benchmarks.harness import ROW_KEYS  # noqa: E402


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "sdrt.cli", "bench", "--model", "tiny", "--height", "16", "--width", "16",
                             "--steps", "3", "--tasks", "txt2img,inpaint", "--backends", "onnxruntime", "--precisions", "fp32", "--shapes", "dynamic,static", "--out", out,
                             "--threads", "1", "--baseline", "diffusers", "--build-arg=--accuracy-prompts=0", "--generate-arg=--low-memory",
                             "--generate-arg=--guidance-cutoff 0.5"], capture_output=True, encoding="utf-8", timeout=900)  # not the locale's: a library in the run may change it
    assert result.returncode == 0, result.stderr
    assert "timing the diffusers baseline" in result.stderr and "[18/18]" in result.stderr  # progress lines
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"machine", "config", "gemm_gflops", "rows"}
    assert results["gemm_gflops"] > 0 and results["machine"]["cores"] >= 1 and "onnxruntime" in results["machine"]["versions"]
    variants = [r for r in results["rows"] if r.get("variant")]
    results["rows"] = [r for r in results["rows"] if not r.get("variant")]
    assert {r["task"] for r in results["rows"]} == {"txt2img", "inpaint"} and len(results["rows"]) == 4
    assert sorted((r["task"], r["variant"]) for r in variants) == sorted((t, v) for t in ("txt2img", "inpaint")
                                                                        for v in ("--low-memory", "--guidance-cutoff 0.5"))
    for row in variants:  # the tiny VAE's tile is the whole 16x16 image: low memory changes nothing but memory
        assert row["backend"] == "onnxruntime" and row["e2e_s"] > 0 and row["unet_gflops"] is None
        assert row["image_identical_to_default"] == (row["variant"] == "--low-memory"), row
        assert row["variant"] == "--low-memory" or 0 < row["image_psnr_vs_default_db"] < 60, row
        assert set(row["peak_rss_stage_mb"]) == {"load", "denoise", "decode"} and row["peak_rss_mb"] == max(row["peak_rss_stage_mb"].values())
    inpaint = {(r["backend"], r["precision"], r["shape"]): r for r in results["rows"] if r["task"] == "inpaint"}
    assert inpaint["diffusers", "fp32", "dynamic"]["speedup_vs_baseline"] == 1.0  # each task against its own baseline
    rows = {(r["backend"], r["precision"], r["shape"]): r for r in results["rows"] if r["task"] == "txt2img"}
    assert set(rows) == set(inpaint) == {("diffusers", "fp32", "dynamic"), ("onnxruntime", "fp32", "dynamic")}
    [skipped] = results["skipped"]
    assert (skipped["backend"], skipped["precision"], skipped["shape"]) == ("onnxruntime", "fp32", "static")
    assert skipped["reason"].startswith("exit status 2, peak RSS ") and "sdrt: error: --static-shape is supported by --backend openvino only" in skipped["reason"]
    assert skipped["exit_status"] == 2 and "--static-shape" in Path(skipped["log"]).read_text()
    for row in results["rows"]:
        assert set(ROW_KEYS) <= set(row)
        for key in ("load_s", "text_encoder_s", "unet_step_s", "unet_step_p90_s", "vae_decode_s", "e2e_s", "peak_rss_mb",
                    "unet_gflops", "roofline_fraction", "speedup_vs_baseline", "memory_vs_baseline"):
            assert isinstance(row[key], float) and row[key] > 0, (row["backend"], key)
        assert row["unet_step_p90_s"] >= row["unet_step_s"]
        if row["backend"] != "diffusers":  # warm loads with each --verify mode (issue 16)
            assert row["load_warm_verify_always_s"] > 0 and row["load_warm_verify_changed_s"] > 0
            assert row["load_verify_alone_s"] > 0 and set(row["load_engine_alone_s"]) == {"text_encoder", "unet", "vae_decoder"}
    assert rows["diffusers", "fp32", "dynamic"]["speedup_vs_baseline"] == 1.0 and rows["diffusers", "fp32", "dynamic"]["build_s"] is None
    assert rows["onnxruntime", "fp32", "dynamic"]["engine_mb"] > 0 and rows["onnxruntime", "fp32", "dynamic"]["build_s"] > 0
    report = (out / "report.md").read_text()
    assert "| diffusers (PyTorch eager fp32) | txt2img |" in report and "| sdrt onnxruntime fp32 | inpaint |" in report
    assert "| sdrt onnxruntime fp32 --guidance-cutoff 0.5 | txt2img |" in report and "identical" in report
    assert "Not built: onnxruntime fp32 static:" in report
    assert Image.open(out / "report.png").size[0] > 100 and Image.open(out / "curve.png").size[0] > 100  # curve: the variants


@pytest.mark.parametrize("option,value,message", [("--baseline", "diffusers,torch", "--baseline 'diffusers,torch' is not supported: accepted values are diffusers, diffusers-bf16"),
                                                  ("--shapes", "dynamic,fixed", "--shapes 'dynamic,fixed' is not supported: accepted values are dynamic, static"),
                                                  ("--generate-arg", "--no-such-option 1", "--generate-arg '--no-such-option 1' is not accepted: unrecognized arguments"),
                                                  ("--tasks", "txt2img,outpaint", "--tasks 'txt2img,outpaint' is not supported: accepted values are txt2img, img2img, inpaint, depth, upscale, unclip")])
def test_bench_refuses_unknown_values(tmp_path, option, value, message):
    result = subprocess.run([sys.executable, "-m", "sdrt.cli", "bench", "--model", "tiny", "--out", tmp_path / "run", option, value],
                            capture_output=True, encoding="utf-8", timeout=120)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
