"""The shapes grammar, renderer and evaluator of sdrt's default model."""

import numpy as np
import pytest

from sdrt.shapes import BACKGROUNDS, COLORS, HELD_OUT, POSITIONS, SHAPES, Scene, caption, evaluate, parse_prompt, random_scene, read_scene, render


def test_evaluator_reads_rendered_scenes_nearly_always():
    rng = np.random.default_rng(0)
    wrong = 0
    for k in range(600):
        scene = random_scene(rng, held_out=k % 4 == 0)
        result = evaluate(render(scene, 64, rng), caption(scene))
        wrong += not all(result.values())
    assert wrong <= 3, wrong


def test_every_attribute_is_read():
    for color in COLORS:
        for shape in SHAPES:
            for background in BACKGROUNDS:
                if color == background:
                    continue
                for position in POSITIONS:
                    scene = Scene(color, shape, background, "large", position)
                    assert read_scene(render(scene, 64)) == {"background": background, "color": color, "shape": shape,
                                                             "size": "large", "position": position}


def test_held_out_pairs_never_drawn_for_training():
    rng = np.random.default_rng(1)
    assert not any((s.color, s.shape) in HELD_OUT for s in (random_scene(rng) for _ in range(2000)))
    assert all((s.color, s.shape) in HELD_OUT for s in (random_scene(rng, held_out=True) for _ in range(200)))


def test_prompts_parse_with_and_without_optional_parts():
    assert parse_prompt("a small red circle on the left on a gray background") == {
        "size": "small", "color": "red", "shape": "circle", "position": "on the left", "background": "gray"}
    assert parse_prompt("a blue square on a white background") == {"color": "blue", "shape": "square", "background": "white"}
    with pytest.raises(ValueError, match="not a prompt of the shapes grammar"):
        parse_prompt("a photo of a cat")


def test_blank_image_has_no_shape():
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert read_scene(blank)["shape"] == "none"
    assert evaluate(blank, "a red circle on a gray background") == {"color": False, "shape": False, "background": True}
