"""`sdrt generate-batch`: one PNG per line, the image `sdrt generate` makes for those fields; resumable (in one
process; on Ray: tests/test_ray.py); failures recorded and retried; bad lines refused."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import picture
from helpers import assert_clean_error, generate, in_process, sdrt

PROMPTS = ["a red circle on a white background", "a large blue square on a gray background", "a small green triangle on a white background"]


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_batch_writes_each_line_once_records_failures_and_resumes(shapes_engines, tmp_path, capsys):
    picture(64, 64).save(tmp_path / "start.png")
    prompts = _write(tmp_path / "prompts.jsonl", [
        {"prompt": PROMPTS[0], "seed": 9, "steps": 6, "scheduler": "euler"},
        "",  # blank lines count: line 3 is the next image
        {"prompt": PROMPTS[1], "steps": 6, "guidance": 5, "karras": True, "scheduler": "DPM++ 2M"},
        {"prompt": PROMPTS[2], "steps": 6, "scheduler": "nope"},
        {"prompt": PROMPTS[2], "steps": 6, "init_image": "start.png", "strength": 0.5},
    ])
    out = tmp_path / "out"
    result = in_process(capsys, "generate-batch", shapes_engines, prompts, "--out", out, "--seed", "100", "--threads", "1")
    assert result.returncode == 1 and "3 written, 0 already there, 1 failed" in result.stdout, result
    assert sorted(p.name for p in out.glob("*.png")) == ["00001.png", "00003.png", "00005.png"]
    failure = json.loads((out / "failures.jsonl").read_text())
    assert failure["line"] == 4 and failure["error"].startswith("scheduler 'nope' is not supported")  # the field's name, not --scheduler
    expected = {
        1: generate(shapes_engines, prompt=PROMPTS[0], seed=9, steps=6, scheduler="euler"),
        3: generate(shapes_engines, prompt=PROMPTS[1], seed=102, steps=6, guidance=5, karras=True, scheduler="dpmpp_2m"),  # --seed + line - 1
        5: generate(shapes_engines, prompt=PROMPTS[2], seed=104, steps=6, init_image=picture(64, 64), strength=0.5),
    }
    for line, images in expected.items():
        assert np.array_equal(_pixels(out / f"{line:05d}.png"), images[0]), line

    # fix line 4 in place: the folder is another batch's now, refused; the original file resumes and retries line 4 alone
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    original = prompts.read_text()
    prompts.write_text(original.replace('"nope"', '"euler"'))
    refused = in_process(capsys, "generate-batch", shapes_engines, prompts, "--out", out)
    assert refused.returncode == 2 and "holds the images of a batch made from another prompts file" in refused.stderr
    prompts.write_text(original)
    again = in_process(capsys, "generate-batch", shapes_engines, prompts, "--out", out, "--seed", "100", "--threads", "1")
    assert again.returncode == 1 and "0 written, 3 already there, 1 failed" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == before  # nothing rewritten


@pytest.mark.parametrize("line, fragments", [
    ("not json", ("prompts.jsonl:1: not JSON",)),
    ('["a list"]', ("prompts.jsonl:1: a line is a JSON object, not list",)),
    ('{"prompt": "x", "sampler": "euler"}', ("unknown field 'sampler'", "accepted: prompt, negative_prompt, scheduler")),
    ('{"prompt": "x", "steps": "20"}', ('prompts.jsonl:1: steps must be an integer, not "20"',)),
    ('{"prompt": "x", "karras": 1}', ("karras must be true or false, not 1",)),
    ('{"prompt": "x", "steps": true}', ("steps must be an integer, not true",)),
    ('{"steps": 20}', ('"prompt" is required',)),
    ('{"prompt": "x", "seed": -4}', ("seed -4 is out of range",)),
])
def test_bad_lines_are_refused_before_anything_runs(shapes_engines, tmp_path, line, fragments):
    prompts = _write(tmp_path / "prompts.jsonl", [line])
    result = sdrt("generate-batch", shapes_engines, prompts, "--out", tmp_path / "out")
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_workers_need_ray(shapes_engines, tmp_path):
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "x"}])
    assert_clean_error(sdrt("generate-batch", shapes_engines, prompts, "--out", tmp_path / "out", "--workers", "2"), "--workers N > 1 and --ray-address need --ray")
