"""The shapes data set, its detector (validated on rendered ground truth) and the judge."""

import numpy as np
import pytest

from bf.shapes.detect import detect
from bf.shapes.judge import judge
from bf.shapes.render import render, training_example
from bf.shapes.scenes import (
    HELDOUT_PAIRS,
    SPLITS,
    Obj,
    Scene,
    caption,
    eval_scenes,
    parse_prompt,
    sample_scene,
)


def test_training_examples_are_deterministic():
    a_img, a_cap, a_sc = training_example(7, 123)
    b_img, b_cap, b_sc = training_example(7, 123)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    c_img, _, _ = training_example(8, 123)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (128, 128, 3) and a_img.dtype == np.uint8


@pytest.mark.slow
def test_heldout_pairs_never_appear_in_training():
    words = {f"{c} {s}" for s, c in HELDOUT_PAIRS}
    for i in range(4000):
        _, cap, scene = training_example(0, i, p_two=0.5)
        assert not (scene.pairs & HELDOUT_PAIRS), scene
        assert not any(w in cap for w in words), cap
    assert all(sc.pairs <= HELDOUT_PAIRS for sc in eval_scenes("heldout"))


def test_eval_splits_are_fixed_and_sized():
    for split in SPLITS:
        scenes = eval_scenes(split)
        assert len(scenes) == 30 and scenes == eval_scenes(split)
    assert all(len(sc.objects) == 2 for sc in eval_scenes("two") + eval_scenes("heldout-two"))
    assert not any(sc.pairs & HELDOUT_PAIRS for sc in eval_scenes("single") + eval_scenes("two"))
    # two objects, at least one held out, on both sides of the relations, and not only held-out pairs
    held_two = eval_scenes("heldout-two")
    assert all(sc.pairs & HELDOUT_PAIRS and sc.objects[0] != sc.objects[1] for sc in held_two)
    assert {i for sc in held_two for i, o in enumerate(sc.objects) if (o.shape, o.color) in HELDOUT_PAIRS} == {0, 1}
    assert any(not sc.pairs <= HELDOUT_PAIRS for sc in held_two) and len({sc.relation for sc in held_two}) == 4


def test_larger_test_sets_extend_the_standard_one_with_distinct_scenes_of_each_split():
    """eval_scenes(split, n): the standard 30 first, then new distinct scenes with the split's properties, capped at
    the split's distinct scenes; prompt_sets reads 'shapes-test:N' and refuses a bad N in one line."""
    from bf.errors import BfError
    from bf.evaluate.evaluation import prompt_sets
    from bf.shapes.scenes import SPACE_SIZE, split_space

    for split in SPLITS:
        big = eval_scenes(split, 200)
        space = split_space(split)
        assert big[:30] == eval_scenes(split) and len({caption(sc) for sc in big}) == len(big) == min(200, len(space) if space else 200)
        if space is not None:
            assert set(big) <= set(space) and len(set(space)) == len(space)
    assert len(eval_scenes("single", 1000)) == 150 and len(eval_scenes("heldout", 1000)) == 30
    assert SPACE_SIZE == {"two": 840, "heldout-two": 384}
    assert len({caption(sc) for sc in eval_scenes("two", 5000)}) == 840 and len(eval_scenes("heldout-two", 5000)) == 384
    assert not any(sc.pairs & HELDOUT_PAIRS for sc in eval_scenes("single", 200) + eval_scenes("two", 200))
    assert all(sc.pairs & HELDOUT_PAIRS and len(sc.objects) == 2 for sc in eval_scenes("heldout-two", 200))
    sets = {ps.split: ps for ps in prompt_sets("shapes-test:100")}
    assert {k: len(v.prompts) for k, v in sets.items()} == {"single": 100, "two": 100, "heldout": 30, "heldout-two": 100}
    assert sets["two"].scenes == eval_scenes("two", 100) and [len(ps.prompts) for ps in prompt_sets("shapes-test")] == [30] * 4
    for bad in ("shapes-test:0", "shapes-test:x", "shapes-test:"):
        with pytest.raises(BfError, match="takes a positive number of prompts per split"):
            prompt_sets(bad)


def test_captions_vary_and_canonical_ones_parse_back():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, p_two=0.0)
    assert len({caption(scene, np.random.default_rng(i)) for i in range(40)}) > 3
    for split in SPLITS:
        for sc in eval_scenes(split):
            back = parse_prompt(caption(sc))
            assert back is not None
            assert [(o.shape, o.color) for o in back.objects] == [(o.shape, o.color) for o in sc.objects]
            if len(sc.objects) == 1:
                assert back == sc
            else:
                assert back.relation == sc.relation
    assert parse_prompt("a cat on a mat") is None


def test_detector_is_right_on_rendered_ground_truth():
    """At least 99% of rendered scenes (jittered) must be judged fully correct."""
    cases = []
    for split in SPLITS:
        for i, sc in enumerate(eval_scenes(split)):
            cases += [(sc, render(sc, np.random.default_rng([s, i]))) for s in range(3)]
    for i in range(200):
        img, _, sc = training_example(5, i)
        cases.append((sc, img))
    correct = [judge(sc, detect(img))["overall"] for sc, img in cases]
    assert np.mean(correct) >= 0.99, np.mean(correct)


def test_diamonds_are_told_from_triangles_only_when_asked():
    """A diamond (the shape a LoRA teaches the shipped model) is detected as one, at every size, position and color, with
    diamonds=True; triangles stay triangles either way, and by default a diamond reads as a triangle (as before)."""
    from bf.shapes.scenes import COLORS, POSITIONS, SIZES

    cases = [Obj(shape, color, size, pos) for shape in ("diamond", "triangle") for color in COLORS for size in SIZES for pos in POSITIONS]
    for i, obj in enumerate(cases):
        img = render(Scene((obj,)), np.random.default_rng(i))
        (d,) = detect(img, diamonds=True)
        assert (d.shape, d.color, d.size, d.position) == (obj.shape, obj.color, obj.size, obj.position), obj
        assert detect(img)[0].shape == "triangle"
    two = Scene((Obj("diamond", "red", "small", "left"), Obj("triangle", "blue", "small", "right")), relation="to the left of")
    assert judge(two, detect(render(two), diamonds=True))["overall"]


def test_detector_reads_attributes():
    sc = Scene((Obj("triangle", "orange", "large", "top"),))
    (d,) = detect(render(sc))
    assert (d.shape, d.color, d.size, d.position) == ("triangle", "orange", "large", "top")
    assert detect(np.full((128, 128, 3), 232, np.uint8)) == []


def test_judge_fails_wrong_images():
    want = Scene((Obj("circle", "red", "small", "left"),))
    wrong_color = render(Scene((Obj("circle", "blue", "small", "left"),)))
    v = judge(want, detect(wrong_color))
    assert not v["color"] and v["position"] and not v["overall"]
    two = Scene((Obj("circle", "red", "small", "left"), Obj("square", "blue", "small", "right")), relation="to the left of")
    swapped = Scene((Obj("circle", "red", "small", "right"), Obj("square", "blue", "small", "left")), relation="to the right of")
    v = judge(two, detect(render(swapped)))
    assert v["count"] and v["shape"] and not v["relation"] and not v["overall"]
    assert judge(two, detect(render(two)))["overall"]


@pytest.mark.parametrize("resolution", [64, 256])
def test_detector_works_at_other_resolutions(resolution):
    sc = Scene((Obj("square", "green", "large", "right"),))
    v = judge(sc, detect(render(sc, resolution=resolution)))
    assert v["overall"], v


def test_an_evaluation_knows_which_splits_it_covers_whole():
    from bf.evaluate.evaluation import _whole_split, prompt_sets

    whole = {ps.split: _whole_split(ps) for ps in prompt_sets("shapes-test")}
    assert whole == {"single": False, "two": False, "heldout": True, "heldout-two": False}
    assert {ps.split: _whole_split(ps) for ps in prompt_sets("shapes-test:150")}["single"]
    assert not {ps.split: _whole_split(ps) for ps in prompt_sets("shapes-test", limit=10)}["heldout"]
