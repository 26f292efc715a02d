"""Diffusion Self-Distillation (self_distill.py, grids.py): grids crop into their panels; the curator reads pixels
only; the zero-initialised projection makes the fine-tuned model the grid model at step 0, and only the LoRA and the
projection learn; the reference then matters; a copy-paste scores 0 de-biased CP; image+text CFG combines three
fields; a tiny run of every stage, and each stage's resume."""
import dataclasses
import json
import os

import pytest
import torch

import common
import data
import grids
import self_distill as sd
import vlm
import world
from model import DiT, LoRALinear
from tiny import MCFG, jittered


def cfg(**kw):
    return dataclasses.replace(sd.Config(preset="tiny", device="cpu", quiet=True, batch_size=4, steps=4,
                                         sample_steps=2, n_grids=8, eval_n=4, instance_n=2, instance_steps=2,
                                         threshold=1e-6), **kw)


def true_pairs(n=16, seed=0):
    b = data.make_batch("customize", n, 32, seed=seed, text_len=MCFG.max_text_len)
    return b.ref, b.target, b.tokens


def test_grids_crop_into_their_panels():
    b = data.make_batch("t2i", 6, 32, seed=1, grids=True)
    left, right = grids.panels(b.target)
    assert torch.equal(left, world.render([g.panels[0] for g in b.specs], 32))
    assert torch.equal(right, world.render([g.panels[1] for g in b.specs], 32))
    prompts, context = grids.grid_prompts(6, 32, 0, MCFG.max_text_len)
    assert all(g.panels[0].objects[0].subject() == g.panels[1].objects[0].subject() for g in prompts.specs)
    words = [" ".join(world.VOCAB[i] for i in row if i) for row in context]
    assert all(w.startswith("two images of the same object ") for w in words)  # no subject words
    assert all(world.CELLS[g.panels[1].objects[0].cell] in w for g, w in zip(prompts.specs, words))


def test_held_out_subjects_are_in_no_grid_prompt():
    prompts, _ = grids.grid_prompts(512, 32, 0, MCFG.max_text_len)
    seen = {g.panels[0].objects[0].subject() for g in prompts.specs}
    held = sd.eval_batch("heldout", 64, 32, MCFG.max_text_len)
    assert not {s.objects[0].subject() for s in held.specs} & seen
    assert not {(o.color, o.shape) for o in (g.panels[0].objects[0] for g in prompts.specs)} & world.HELDOUT


def test_curator_decides_from_the_pixels_of_each_pair_alone():
    torch.manual_seed(0)
    judge = vlm.Judge(*vlm.build_vlm("tiny"))
    b = data.make_batch("t2i", 12, 32, seed=2, grids=True, grid_inconsistency=0.5)
    left, right = grids.panels(b.target)
    p = grids.p_same(judge, left, right, batch=5)
    perm = torch.randperm(12)
    assert torch.allclose(grids.p_same(judge, left[perm], right[perm], batch=12), p[perm], atol=1e-5)


def test_shuffled_generation_metadata_leaves_the_curators_decisions(files, tmp_path, monkeypatch):
    """Stages 1-3 twice on the same drawn grids, the second time with every prompt's caption and spec shuffled among
    the grids: what the world knows about each pair changes, what the curator keeps does not."""
    c = cfg(base=str(files / "grid.pt"), judge=str(files / "vlm"), out=str(tmp_path), n_grids=12, threshold=0.5,
            rows="dsd")
    model = DiT(MCFG)
    model.load_state_dict(common.load_checkpoint(c.base)["ema"])
    env = common.setup(c)
    first = sd.paired_data(c, env, model, MCFG)
    real = sd.grid_prompts

    def shuffled(*args):
        prompts, context = real(*args)
        perm = torch.randperm(len(prompts.specs), generator=torch.Generator().manual_seed(0))
        return dataclasses.replace(prompts, specs=[prompts.specs[i] for i in perm],
                                   text=[prompts.text[i] for i in perm], tokens=prompts.tokens[perm]), context
    monkeypatch.setattr(sd, "grid_prompts", shuffled)
    os.remove(tmp_path / "curation.pt")                                           # the curator asked afresh
    second = sd.paired_data(c, env, model, MCFG)
    assert torch.allclose(first["p"], second["p"]) and first["p"].std() > 0
    assert torch.equal(first["keep"]["curated"], second["keep"]["curated"])


def test_precision_recall_and_the_noisy_curator():
    keep, truth = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool), torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)
    r = grids.precision_recall(keep, truth)
    assert (r["precision"], r["recall"], r["kept"]) == pytest.approx((2 / 3, 2 / 3, 0.6))
    p = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    flipped = (grids.curated(cfg(threshold=0.5), p, 0.3) != grids.curated(cfg(threshold=0.5), p)).float().mean()
    assert 0.27 < flipped < 0.33


@pytest.mark.parametrize("arch", ["parallel", "concat"])
def test_zero_projection_makes_the_fine_tuned_model_the_grid_model_at_step_0(arch):
    grid = jittered().eval()
    model = sd.adapted(MCFG, grid.state_dict(), arch, rank=4).eval()
    ref, target, tokens = true_pairs(4)
    x = torch.randn(4, 3, 32, 64 if arch == "parallel" else 32)
    t = torch.rand(4)
    with torch.no_grad():
        base = grid(x, t, torch.zeros(4, dtype=torch.long), tokens)               # no reference at all
        ours = model(x, t, **sd.inputs(arch, ref, tokens))
    assert torch.allclose(ours, base, atol=1e-6)
    assert not torch.equal(grid.cond_embedder.weight, torch.zeros_like(grid.cond_embedder.weight))  # re-zeroed


def test_only_lora_and_projection_learn_and_then_the_reference_matters(tmp_path):
    grid = jittered()
    state = {k: v.clone() for k, v in grid.state_dict().items()}
    env = common.setup(cfg())
    model, _, end = sd.finetune(cfg(steps=6, lr=3e-3, lora_rank=4, ema=0.0), env, MCFG, state, "parallel",
                                true_pairs(), str(tmp_path / "ckpt.pt"))
    assert end == 6
    for name, p in model.named_parameters():  # (the returned model is the EMA, here with decay 0: the weights)
        if not ("lora_" in name or name.startswith("cond_embedder")):  # the grid model's own weights, bitwise
            assert torch.equal(p, state[name.replace(".base.", ".")]), name
    assert model.cond_embedder.weight.abs().sum() > 0 and any(
        m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    assert all(torch.equal(v, state[k]) for k, v in grid.state_dict().items())    # the state given stays as it was
    ref, _, tokens = true_pairs(4, seed=5)
    noise = torch.randn(4, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    with_ref = sd.customize(model, "parallel", ref, tokens, noise, 4)
    without = sd.customize(model, "parallel", torch.zeros_like(ref), tokens, noise, 4)
    assert (with_ref - without).abs().mean() > 1e-3


def test_a_short_fine_tune_on_true_pairs_lowers_the_loss_and_learns_to_use_the_reference():
    grid = jittered(std=0.02)
    env = common.setup(cfg())
    ref, target, tokens = true_pairs(8, seed=9)                                    # pairs it never trains on
    noise = sd.step_noise(cfg(ref_drop=0, text_drop=0), 0, (8, 3, 32, 64), "cpu")
    no_ref = dict(noise, drop_ref=torch.ones(8, dtype=torch.bool))
    start = sd.adapted(MCFG, grid.state_dict(), "parallel", 8)
    before = sd.dsd_loss(start, "parallel", ref, target, tokens, noise)
    assert before == sd.dsd_loss(start, "parallel", ref, target, tokens, no_ref)  # the zero projection: no effect
    model, _, _ = sd.finetune(cfg(steps=40, batch_size=16, lr=3e-3, lora_rank=8, ema=0.0), env, MCFG,
                              grid.state_dict(), "parallel", true_pairs(256), None)
    with torch.no_grad():
        after, without = (sd.dsd_loss(model, "parallel", ref, target, tokens, n) for n in (noise, no_ref))
    assert after < 0.95 * before and after < without, (before.item(), after.item(), without.item())


def test_debiased_concept_is_zero_for_a_copy_of_the_reference():
    b = data.make_batch("customize", 40, 32, seed=3, split="heldout")
    copy = sd.score(b.ref, b)
    assert copy["concept"] == 1 and copy["concept_debiased"] == 0 and copy["concept_x_prompt"] == 0
    truth = sd.score(b.target, b)
    assert truth["concept_debiased"] == truth["concept_x_prompt"] == 1


def test_image_text_cfg_is_one_call_per_step_at_scale_1_and_combines_three_fields():
    model = sd.adapted(MCFG, jittered().state_dict(), "concat", 4).eval()
    with torch.no_grad():
        model.cond_embedder.weight.normal_(std=0.05)                             # the reference matters
    ref, _, tokens = true_pairs(2)
    noise = torch.randn(2, 3, 32, 64)
    x = grids.panels(noise)[1]
    t = sd.timesteps(1)[0].expand(2)
    v = lambda r, tok: model(x, t, **sd.inputs("concat", r, tok))
    with torch.no_grad():
        want = v(0 * ref, 0 * tokens) + 2 * (v(ref, 0 * tokens) - v(0 * ref, 0 * tokens)) + \
            3 * (v(ref, tokens) - v(ref, 0 * tokens))
        assert torch.allclose(sd.customize(model, "concat", ref, tokens, noise, 1, 2.0, 3.0),
                              (x - want).clamp(-1, 1), atol=1e-5)
        assert torch.allclose(sd.customize(model, "concat", ref, tokens, noise, 1), (x - v(ref, tokens)).clamp(-1, 1),
                              atol=1e-5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny grid-model checkpoint and the tiny VLM saved as a transformers model."""
    d = tmp_path_factory.mktemp("dsd")
    model = jittered()
    common.save_checkpoint(str(d / "grid.pt"), model=model.state_dict(), ema=model.state_dict(), step=1,
                           tasks=["t2i"], config=dict(n_objects=1), model_config=dataclasses.asdict(MCFG))
    torch.manual_seed(0)
    judge, processor = vlm.build_vlm("tiny")
    judge.save_pretrained(d / "vlm"), processor.save_pretrained(d / "vlm")
    return d


def test_every_stage_runs_and_writes_its_table(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = sd.train(cfg(base=str(files / "grid.pt"), judge=str(files / "vlm"), out="out/sd"))
    assert set(results) == set(sd.ROWS) | {"dsd, first 2", "text, first 2"}
    assert results["lora"]["heldout"]["n"] == 2 and results["dsd"]["heldout"]["n"] == 4
    saved = json.loads(open("results/self_distill/self_distill.json").read())
    assert 0 <= saved["curation"]["curated"]["precision"] <= 1 and "consistent" in saved["grids"]
    assert os.path.exists("results/self_distill/self_distill.png")
    assert all(os.path.exists(f"out/sd/{row}/ckpt.pt") for row in sd.TRAINED)
    again = cfg(base=str(files / "grid.pt"), judge=str(files / "vlm"), out="out/sd")
    assert "exists: pass --resume" in " ".join(again.check())
    problems = " ".join(dataclasses.replace(again, resume=True, threshold=0.9).check())
    assert "--resume: out/sd/dsd/ckpt.pt was trained with --threshold=1e-06" in problems  # other data: refused
    assert not any(dataclasses.replace(again, resume=True).check())               # the same run: re-scored


def test_an_interrupted_grid_stage_continues_to_the_same_grids(files, tmp_path):
    c = cfg(base=str(files / "grid.pt"), out=str(tmp_path), n_grids=6)
    model = DiT(MCFG)
    model.load_state_dict(common.load_checkpoint(c.base)["ema"])
    prompts, _ = grids.grid_prompts(6, 32, 0, MCFG.max_text_len)
    whole = grids.draw_grids(c, common.setup(c), model, prompts, str(tmp_path / "whole.pt"), chunk=2)
    part = str(tmp_path / "part.pt")
    grids.draw_grids(dataclasses.replace(c, n_grids=2), common.setup(c), model, prompts, part, chunk=2)
    cache = torch.load(part, weights_only=True)
    cache["key"]["n"] = 6  # as if the run of 6 had stopped after its first chunk
    common.save_checkpoint(part, **cache)
    assert torch.equal(grids.draw_grids(c, common.setup(c), model, prompts, part, chunk=2), whole)
    with pytest.raises(SystemExit, match="was made with other options"):
        grids.draw_grids(dataclasses.replace(c, seed=1), common.setup(c), model, prompts, part, chunk=2)


@pytest.mark.parametrize("rank", [0, 4])
def test_resumed_fine_tune_equals_the_uninterrupted_one(tmp_path, rank):
    state, env = jittered().state_dict(), common.setup(cfg())
    pairs, c = true_pairs(), cfg(lora_rank=rank, ema=0.5)
    whole, _, _ = sd.finetune(dataclasses.replace(c, steps=4), env, MCFG, state, "concat", pairs, str(tmp_path / "a"))
    sd.finetune(dataclasses.replace(c, steps=4, stop_at=2), env, MCFG, state, "concat", pairs, str(tmp_path / "b"))
    resumed, _, end = sd.finetune(dataclasses.replace(c, steps=4, resume=True), env, MCFG, state, "concat", pairs,
                                  str(tmp_path / "b"))
    assert end == 4
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                                # the EMA weights, bitwise
    assert any(isinstance(m, LoRALinear) for m in resumed.modules()) == bool(rank)
    assert not torch.equal(a["cond_embedder.weight"], torch.zeros_like(a["cond_embedder.weight"]))
