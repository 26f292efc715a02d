"""The world and its exact scorer (data.py, scorer.py): determinism, exactness, tolerance, refusal, splits, I/O."""
import csv
import json

import numpy as np
import pytest
import torch

import data
import questions
import world
import scorer


def test_renders_are_deterministic_per_seed():
    for task in data.TASKS:
        a, b = data.make_batch(task, 8, 32, seed=5), data.make_batch(task, 8, 32, seed=5)
        c = data.make_batch(task, 8, 32, seed=6)
        assert torch.equal(a.target, b.target) and a.text == b.text
        assert not torch.equal(a.target, c.target)


def test_render_range_and_resolutions():
    for res in (32, 64, 48):
        x = data.make_batch("t2i", 4, res).target
        assert x.shape == (4, 3, res, res) and x.min() >= -1 and x.max() <= 1
        x = data.make_batch("t2i", 4, res, grids=True).target  # two panels side by side
        assert x.shape == (4, 3, res, 2 * res) and x.min() >= -1 and x.max() <= 1


def test_grids_are_two_full_size_panels_whose_caption_names_subject_and_right_context():
    b = data.make_batch("t2i", 200, 32, seed=4, grids=True, grid_inconsistency=0.25)
    left, right = b.target[..., :32], b.target[..., 32:]
    assert torch.equal(left, world.render([g.panels[0] for g in b.specs], 32))
    assert torch.equal(right, world.render([g.panels[1] for g in b.specs], 32))
    same = [g.panels[0].objects[0].subject() == g.panels[1].objects[0].subject() for g in b.specs]
    assert 0.65 < sum(same) / len(same) < 0.85  # the right panel deviates with probability 0.25
    for g, text in zip(b.specs, b.text):
        o, r = g.panels[0].objects[0], g.panels[1]
        assert text.startswith(f"two images of the same {o.color} and {o.color2} {o.pattern} {o.shape} ")
        assert world.CELLS[r.objects[0].cell] in text and r.sky in text
        assert len(text.split()) <= world.ONE_OBJECT_TOKENS
    assert (scorer.score("customize", right, _as_customize(b))[0]["prompt"]) == 1  # the right context is its own


def _as_customize(b):
    """A grid batch seen as customisation: reference = left panel's scene, target = the right panel's."""
    return data.Batch("customize", b.text, b.tokens, b.target[..., 32:], specs=[g.panels[1] for g in b.specs],
                      sources=[g.panels[0] for g in b.specs])


@pytest.mark.parametrize("res", [32, 64])
def test_scorer_round_trips_clean_renders(res):
    b = data.make_batch("t2i", 60, res, seed=11, split="test")
    means, _ = scorer.score("t2i", b.target, b)
    assert all(means[k] >= 0.99 for k in scorer.OBJECT_ATTRS + ("count", "sky", "ground", "horizon")), means
    for task in ("local_edit", "global_edit", "inpaint", "outpaint", "customize"):
        b = data.make_batch(task, 30, res, seed=11, split="test")
        assert scorer.score(task, b.target, b)[0]["success"] >= 0.97, task


def test_scorer_tolerates_degraded_renders():
    b = data.make_batch("t2i", 80, 32, seed=12, split="test")
    x = scorer.degrade(b.target, sigma=1.0, noise=0.05, generator=torch.Generator().manual_seed(0))
    means, _ = scorer.score("t2i", x, b)
    assert all(means[k] >= 0.9 for k in scorer.OBJECT_ATTRS + ("count", "sky", "ground", "horizon")), means


def test_pipeline_edit_data_degrades_only_the_edit_targets():
    """World option edit_data="pipeline": edit targets are blurred, noisy and shifted (deterministically per seed),
    the conditions and masks are the clean ones, the edit still reads as done, other tasks and test splits untouched."""
    for task in ("local_edit", "global_edit"):
        clean, made = (data.make_batch(task, 64, 32, seed=3, edit_data=e) for e in ("clean", "pipeline"))
        assert torch.equal(made.cond, clean.cond) and made.text == clean.text
        assert made.mask is None or torch.equal(made.mask, clean.mask)  # the pixels the edit changed, from clean
        lost = scorer.psnr(made.target, clean.target)
        assert (lost < 30).all() and lost.mean() > 15, lost  # clearly worse than the render, not destroyed
        assert torch.equal(made.target, data.make_batch(task, 64, 32, seed=3, edit_data="pipeline").target)
        assert scorer.score(task, made.target, clean)[0]["success"] >= 0.95  # the content is still the edit
    for task in ("t2i", "inpaint"):
        assert torch.equal(data.make_batch(task, 8, 32, seed=3, edit_data="pipeline").target,
                           data.make_batch(task, 8, 32, seed=3).target)
    with pytest.raises(ValueError, match="scored against clean renders"):
        data.make_batch("local_edit", 4, 32, split="test", edit_data="pipeline")


def test_psnr_to_the_truth_falls_with_each_degradation():
    """The fidelity metric reads what the parse forgives: blur, noise and misregistration each lower it."""
    b = data.make_batch("t2i", 64, 32, seed=4, split="test")
    g = lambda: torch.Generator().manual_seed(0)
    clean = scorer.score("t2i", b.target, b)[0]["psnr_truth"]
    blur = scorer.score("t2i", world.degrade(b.target, 0.7, 0.0, g()), b)[0]["psnr_truth"]
    blur_noise = scorer.score("t2i", world.degrade(b.target, 0.7, 0.03, g()), b)[0]["psnr_truth"]
    shifted = scorer.score("t2i", world.degrade(b.target, 0.7, 0.03, g(), shift=1), b)
    assert clean > blur > blur_noise > shifted[0]["psnr_truth"] and shifted[0]["success"] >= 0.95


def test_scorer_rejects_wrong_specs():
    b, rng = data.make_batch("t2i", 80, 32, seed=13, split="test"), np.random.default_rng(0)
    passes = [scorer.compare(scorer.parse(x), scorer.perturb(s, rng))["full"] for x, s in zip(b.target, b.specs)]
    assert np.mean(passes) <= 0.02


def test_scorer_fails_a_wrong_image():
    b = data.make_batch("t2i", 20, 32, seed=14)
    assert scorer.score("t2i", torch.zeros_like(b.target), b)[0]["full"] == 0  # a blank gray image
    assert scorer.score("t2i", b.target.roll(1, 0), b)[0]["full"] <= 0.05  # someone else's image


def test_masks_mark_exactly_what_differs():
    b = data.make_batch("local_edit", 40, 32, seed=15)
    source = b.cond[:, :3]
    changed = (source - b.target).abs().amax(1, keepdim=True) > 0
    assert torch.equal(changed.float(), b.mask) and (b.mask.sum((1, 2, 3)) > 0).all()
    for task in ("inpaint", "outpaint"):
        b = data.make_batch(task, 40, 32, seed=15)
        hole = b.mask.bool().expand_as(b.target)
        assert torch.equal(b.cond[:, 3:], b.mask) and (b.mask.sum((1, 2, 3)) > 0).all()
        assert torch.equal(b.cond[:, :3][~hole], b.target[~hole])  # the condition is the target outside the hole
        assert (b.cond[:, :3][hole] == 0).all()


def test_heldout_pairs_never_in_training_split():
    def pairs(spec):
        if spec is None:
            return set()
        scenes = spec.panels if isinstance(spec, world.Grid) else [spec]
        return {(o.color, o.shape) for s in scenes for o in s.objects}
    for task in data.TASKS:
        for grids in ((False, True) if task == "t2i" else (False,)):
            b = data.make_batch(task, 200, 32, seed=16, split="train", grids=grids)
            assert not any(pairs(s) & world.HELDOUT for s in b.specs + b.sources), task
    b = data.make_batch("t2i", 50, 32, seed=16, split="heldout")
    assert all(pairs(s) & world.HELDOUT for s in b.specs)


def test_every_text_fits_the_vocabulary():
    for task in data.TASKS:
        for grids in ((False, True) if task == "t2i" else (False,)):
            b = data.make_batch(task, 200, 32, seed=17, grids=grids)
            assert b.tokens.shape == (200, world.MAX_TOKENS) and (b.tokens[:, 0] > 0).all()
    judge_words = set(world.VOCAB) | set(questions.QUESTION_WORDS)  # what the VLM's tokenizer is built from
    for family in questions.FAMILIES:
        words = {w for q in questions.vqa_batch(family, 40, 32).questions for w in q.split()}
        assert words <= judge_words, (family, words - judge_words)
    assert not set(questions.QUESTION_WORDS) & set(world.VOCAB)  # the judge's own words, in no caption


def test_unknown_word_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown word 'teal'"):
        world.tokenize(["a small teal circle"])


def test_global_edits_do_what_they_say():
    b = data.make_batch("global_edit", 120, 32, seed=18)
    for text, src, tgt, x in zip(b.text, b.sources, b.specs, b.target):
        if "grayscale" in text or "black and white" in text:
            assert tgt.tone == "gray" and torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2])
        if "mirror" in text or "flip" in text:
            assert sorted(o.cell % 3 for o in tgt.objects) == sorted(2 - o.cell % 3 for o in src.objects)
        if "invert" in text:
            assert data.INVERT_BG[src.sky] == tgt.sky


def test_edit_kind_reads_back_what_the_edit_did():
    """evaluate.py's per-kind success relies on it: the kind named by the words is the change in the specs."""
    def did(task, src, tgt):
        objs = lambda s, key: sorted(key(o) for o in s.objects)
        if task == "local_edit":
            if len(tgt.objects) != len(src.objects):
                return "add" if len(tgt.objects) > len(src.objects) else "remove"
            return "move" if objs(tgt, lambda o: o.cell) != objs(src, lambda o: o.cell) else "recolor"
        if tgt.tone != src.tone:
            return {"gray": "grayscale", "dark": "darken"}[tgt.tone]
        if (tgt.sky, tgt.ground) != (src.sky, src.ground):
            return "invert" if tgt.sky == data.INVERT_BG[src.sky] and src.objects[0].color != tgt.objects[0].color \
                else "background"
        if objs(tgt, lambda o: o.cell) != objs(src, lambda o: o.cell):
            return "mirror"
        shifted = all(b.color == data._shift(a.color, 2) for a, b in zip(src.objects, tgt.objects))
        return "hue" if shifted and len(src.objects) > 1 else None  # one object: a hue shift may look like a swap
    for task in data.EDIT_KINDS:
        b = data.make_batch(task, 300, 32, seed=5)
        kinds = [data.edit_kind(task, t) for t in b.text]
        assert set(kinds) == set(data.EDIT_KINDS[task])
        for text, kind, src, tgt in zip(b.text, kinds, b.sources, b.specs):
            truth = did(task, src, tgt)
            assert truth in (None, kind) or (kind == "swap" and truth == "hue"), (text, truth)


def test_vqa_is_balanced_and_answers_are_true():
    for family in questions.FAMILIES:
        v = questions.vqa_batch(family, 40, 32, seed=19)
        assert v.answers.sum() == 20
    v = questions.vqa_batch("count", 40, 32, seed=19)  # check the answers against the scorer's own reading
    for x, q, a in zip(v.images, v.questions, v.answers):
        n = ("one", "two", "three").index(q.split()[2]) + 1
        assert (len(scorer.parse(x).objects) == n) == bool(a)
    v = questions.vqa_batch("same", 20, 32, seed=19)
    for x, y, a in zip(v.images, v.images2, v.answers):
        subject = lambda img: scorer.parse(img, subjects=True).objects[0].subject()
        same = subject(x) == subject(y)
        assert same == bool(a)


def test_customize_copy_paste_gets_no_debiased_credit():
    b = data.make_batch("customize", 30, 32, seed=20)
    copy, _ = scorer.score("customize", b.ref, b)  # output = the reference itself
    right, _ = scorer.score("customize", b.target, b)
    assert copy["concept"] >= 0.97 and copy["concept_debiased"] == 0 and copy["prompt"] <= 0.1
    assert right["concept_debiased"] >= 0.97 and right["concept_x_prompt"] >= 0.97


def test_seam_error_and_psnr_see_a_bad_fill():
    b = data.make_batch("inpaint", 20, 32, seed=21)
    good, _ = scorer.score("inpaint", b.target, b)
    flat = b.target * (1 - b.mask) + b.mask * b.target.mean((2, 3), keepdim=True)  # fill the hole with a flat colour
    bad, _ = scorer.score("inpaint", flat, b)
    assert good["seam_error"] == 0 and bad["seam_error"] > 0.02 and bad["success"] < good["success"]


def _write_folder(tmp_path, fmt):
    b = data.make_batch("inpaint", 3, 32, seed=22)
    e = data.make_batch("local_edit", 2, 32, seed=22)
    rows = []
    for i in range(3):
        world.to_pil(b.target[i]).save(tmp_path / f"t{i}.png")
        world.to_pil(b.mask[i].expand(3, -1, -1) * 2 - 1).save(tmp_path / f"m{i}.png")
        rows.append(dict(task="inpaint", prompt=b.text[i], target_image=f"t{i}.png", mask=f"m{i}.png"))
    for i in range(2):
        world.to_pil(e.cond[i, :3]).save(tmp_path / f"s{i}.png")
        world.to_pil(e.target[i]).save(tmp_path / f"e{i}.png")
        rows.append(dict(task="local_edit", prompt=e.text[i], source_image=f"s{i}.png", target_image=f"e{i}.png"))
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=data.MANIFEST_COLUMNS)
            w.writeheader(), w.writerows(rows)
    return path, b, e


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_round_trip(tmp_path, fmt):
    path, b, e = _write_folder(tmp_path, fmt)
    ex = data.load_manifest(str(path), 32)
    inp = data.collate([x for x in ex if x["task"] == "inpaint"])
    edit = data.collate([x for x in ex if x["task"] == "local_edit"])
    assert inp.text == b.text and torch.equal(inp.mask, b.mask)
    assert (inp.target - b.target).abs().max() <= 1 / 127.5 + 1e-6  # 8-bit PNG round trip
    assert (edit.cond - e.cond).abs().max() <= 1 / 127.5 + 1e-6 and edit.tokens.shape == e.tokens.shape


def test_manifest_bad_rows_are_named(tmp_path):
    path, _, _ = _write_folder(tmp_path, "jsonl")
    lines = path.read_text().splitlines()
    lines[1] = ""  # an empty row
    lines[2] = lines[2].replace("t2.png", "nope.png")  # a missing file
    lines.append(json.dumps(dict(task="t2i", prompt="a small teal circle", target_image="t0.png")))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        data.load_manifest(str(path), 32)
    msg = str(err.value)
    assert msg.startswith(f"3 bad row(s) in {path}:")
    assert f"{path}:2: empty row" in msg and f"{path}:3: {tmp_path}/nope.png: no such image file" in msg
    assert f"{path}:6: unknown word 'teal'" in msg
    with pytest.raises(ValueError, match="the image is 32x32, the model takes 64x64"):
        data.load_manifest(str(path), 64)


def test_parse_survives_generator_like_junk():
    x = torch.full((3, 32, 32), 0.84)  # a white background ...
    x[:, 4:12, 4:12] = -1  # ... with a blob of pure outline colour (black): no object colour to unmix
    x[:, 20:23, 20:30] = torch.tensor([1., -1, -1])[:, None, None]  # and a thin red sliver
    found = scorer.parse(x)
    assert found.sky == "white" and {o.cell for o in found.objects} == {0, 8}  # both blobs, where they are
    assert [o.color for o in found.objects if o.cell == 8] == ["red"]
    b = data.make_batch("t2i", 20, 32, seed=13, split="test")  # pure noise parses, and passes as no scene
    noise = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert scorer.score("t2i", noise, b)[0]["success"] == 0
