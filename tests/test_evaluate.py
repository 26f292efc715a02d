"""evaluate.py's shape probe tells a model that draws the shape it is asked for from one that does not; its
handover probe hands the trajectory from one model to the other at the step it names."""
from types import SimpleNamespace

import pytest
import torch

import data
import evaluate
import world


class Oracle(torch.nn.Module):
    """The exact flow field v = (x_t - x0) / t of a large object in the centre whose shape is the caption's shape
    word, or always a circle when `blind`: Euler sampling then lands exactly on that render."""

    def __init__(self, blind=False):
        super().__init__()
        self.blind = blind

    def forward(self, x, t, task, tokens, cond=None, ref=None):
        shapes = [world.SHAPES[0] if self.blind else next(w for w in map(world.VOCAB.__getitem__, row.tolist())
                                                          if w in world.SHAPES) for row in tokens]
        x0 = world.render([world.Scene([world.Obj(s, "green", "large", 4)], "white", "white") for s in shapes], 32)
        return (x - x0) / t.view(-1, 1, 1, 1)


def test_shape_probe_reads_the_shape_word_or_its_absence():
    seeing = evaluate.shape_probe(Oracle(), n=6, res=32, device="cpu", steps=4)
    assert seeing["n"] == 6
    for shape in world.SHAPES:
        assert seeing["confusion"][shape][shape] == 6
    assert min(seeing["sensitivity"].values()) > 0.3
    blind = evaluate.shape_probe(Oracle(blind=True), n=6, res=32, device="cpu", steps=4)
    assert all(blind["confusion"][shape]["circle"] == 6 for shape in world.SHAPES)
    assert max(blind["sensitivity"].values()) == 0


class Lookup(torch.nn.Module):
    """The exact flow field towards a fixed image per example: Euler lands on it from any state at the last step."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.config = x0, SimpleNamespace(max_text_len=world.MAX_TOKENS, image_size=32)

    def forward(self, x, t, task, tokens, cond=None, ref=None):
        return (x - self.x0) / t.view(-1, 1, 1, 1)


def test_handover_probe_scores_the_model_that_finishes():
    batch = data.make_batch("local_edit", 8, 32, "cpu", seed=0, split="test")  # evaluate_task's examples at n=8
    editor, copier = Lookup(batch.target), Lookup(batch.cond[:, :3])           # the teacher; a student that copies
    cfg = evaluate.Config(n=8, batch_size=8, steps=4)
    h = evaluate.handover_probe(copier, editor, "local_edit", cfg, [0, 2, 4], 32, "cpu")
    assert [h["student first"][k]["success"] for k in (0, 2, 4)] == [1.0, 1.0, 0.0]
    assert [h["teacher first"][k]["success"] for k in (0, 2, 4)] == [0.0, 0.0, 1.0]
    assert "| student, then the teacher | 1.000 | 1.000 | 0.000 |" in evaluate.handover_lines("s", "local_edit", h, 4)


class Paster(Lookup):
    """A field whose clean-image estimate is the source image it is given, whatever the state."""

    def forward(self, x, t, task, tokens, cond=None, ref=None):
        return (x - cond[:, :3]) / t.view(-1, 1, 1, 1)


def test_source_probe_tells_a_field_that_pastes_the_source_from_one_that_reads_the_state():
    batch = data.make_batch("local_edit", 8, 32, "cpu", seed=0, split="test")
    editor = Lookup(batch.target)
    cfg = evaluate.Config(n=8, steps=4)
    r = evaluate.source_probe(Paster(batch.target), editor, "local_edit", cfg, 32, "cpu")
    assert r["model"] == pytest.approx({i: 1.0 for i in range(4)}, abs=1e-5)
    assert r["teacher"] == {i: 0.0 for i in range(4)}
    assert "| teacher | 0.00 | 0.00 | 0.00 | 0.00 |" in evaluate.source_lines("p", "local_edit", r)


class LastBatchOnly(torch.nn.Module):
    """The exact flow field to the true image for the examples of `right` (matched by caption tokens); to an empty
    white image for every other example, which the scorer fails."""

    def __init__(self, right):
        super().__init__()
        self.right, self.config = right, SimpleNamespace(max_text_len=world.MAX_TOKENS, image_size=32)

    def forward(self, x, t, task, tokens, cond=None, ref=None):
        blank = world.render([world.Scene([], "white", "white")], 32)[0]
        x0 = torch.stack([next((img for tok, img in zip(self.right.tokens, self.right.target) if torch.equal(tok, row)),
                               blank) for row in tokens])
        return (x - x0) / t.view(-1, 1, 1, 1)


def test_the_mean_over_batches_weighs_each_example_once():
    """n=5 in batches of 2: batches of 2, 2 and 1 examples. A model right only on the last example scores 1/5, not the
    1/3 an unweighted mean of the three batch means would give."""
    last = data.make_batch("t2i", 1, 32, seed=4, split="test")  # evaluate_task's third batch: seed 0 * 1000 + 4
    r = evaluate.evaluate_task(LastBatchOnly(last), "t2i", 5, 32, "cpu", steps=2, batch_size=2)
    assert r["success"] == pytest.approx(0.2)


def test_per_example_scores_pair_up_across_models():
    """per_example lists follow the examples in order, so two models' lists pair up: the model right only on the
    last of 5 examples is 1 success and 100 dB (the exact render) there; its paired gap to itself is exactly 0."""
    last = data.make_batch("t2i", 1, 32, seed=4, split="test")
    each = evaluate.evaluate_task(LastBatchOnly(last), "t2i", 5, 32, "cpu", steps=2, batch_size=2,
                                  per_example=True)["per_example"]
    assert each["success"] == [0, 0, 0, 0, 1] and each["psnr_truth"][-1] == pytest.approx(100, abs=0.5)
    assert max(each["psnr_truth"][:4]) < 20
    assert evaluate.paired_difference(each["psnr_truth"], each["psnr_truth"]) == (0.0, 0.0)
    mean, se = evaluate.paired_difference([1, 1, 0, 1], [0, 1, 0, 0])  # gaps 1, 0, 0, 1
    assert mean == pytest.approx(0.5) and se == pytest.approx((1 / 3) ** 0.5 / 2)
