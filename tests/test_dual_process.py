"""Dual-Process (dual_process.py): only the LoRA learns, and only through the image; the sampler's prefix carries
no gradient; visual prompts are differentiable; a tiny run raises the judge's log p(Yes) on its questions; a control
given as data runs with no code change; resume equals an uninterrupted run."""
import copy
import dataclasses
import json
import os

import pytest
import torch

import common
import controls
import questions
import dual_process as dp
import scorer
import vlm
import world
from model import add_lora, lora_parameters
from tiny import MCFG, jittered

NIGHT = dp.CONTROLS["night"]


@pytest.fixture(scope="module")
def judge():
    torch.manual_seed(0)
    model, processor = vlm.build_vlm("tiny")
    return vlm.Judge(model, processor)


@pytest.fixture(scope="module")
def files(tmp_path_factory, judge):
    """A tiny base checkpoint and the tiny VLM saved as a transformers model (loaded back through the Auto classes)."""
    d = tmp_path_factory.mktemp("dual")
    common.save_checkpoint(str(d / "base.pt"), model=jittered().state_dict(), ema=jittered().state_dict(), step=1,
                           tasks=["t2i"], config=dict(n_objects=1), model_config=dataclasses.asdict(MCFG))
    judge.model.save_pretrained(d / "vlm")
    judge.processor.save_pretrained(d / "vlm")
    return d


def batch(control, n=4, seed=0):
    specs, _, tokens = dp.control_prompts(control, n, "train", seed)
    inputs = dict(task=torch.zeros(n, dtype=torch.long), tokens=tokens, cond=None, ref=None)
    return specs, inputs, dp.questions_for(control, specs)


def test_prompts_questions_and_oracle_follow_the_control():
    control = dp.CONTROLS["thick_outline"]
    specs, _, _ = dp.control_prompts(control, 20, "test", 0)
    assert all(s.objects[0].line == 0 for s in specs)  # prompts that name no outline
    questions = dp.questions_for(control, specs)
    assert questions[0] == [f"does the {specs[0].objects[0].color} {specs[0].objects[0].shape} have a thick outline ?"]
    thick = [dataclasses.replace(s, objects=[dataclasses.replace(s.objects[0], line=2)]) for s in specs]
    parse = lambda scenes: [scorer.parse(x) for x in world.render(scenes, 32)]
    assert dp.oracle_check(control, parse(thick)).all()          # the renders that show the control pass
    assert not dp.oracle_check(control, parse(specs)).any()      # the prompts' own renders do not
    kept, broken = dp.caption_kept(control, parse(thick), specs)
    assert kept.all() and not any(broken.values())               # the outline is free, the rest kept
    moved = [dataclasses.replace(s, objects=[dataclasses.replace(s.objects[0], cell=(s.objects[0].cell + 1) % 9)])
             for s in thick]
    kept, broken = dp.caption_kept(control, parse(moved), specs)
    assert not kept.any() and broken["cell"] == 1.0 and broken["color"] == 0.0  # anything else changed is not,
                                                                                # and it is named


def test_keep_questions_hold_what_the_control_leaves_and_the_judge_knows_their_words(judge):
    words = set(judge.processor.tokenizer.get_vocab())
    for name, control in dp.CONTROLS.items():
        specs, _, _ = dp.control_prompts(control, 16, "test", 0)
        for s, asked in zip(specs, dp.keep_questions(control, specs)):
            text = dict(asked)
            assert all(w in words for q in text for w in q.split())          # no word the judge never saw
            assert ("is it night ?" in text) == (name != "night")            # the sky held unless it is the control
            if name != "night":
                assert text["is it night ?"] == (s.sky in controls.DARK)
            assert any("horizon" in q for q in text) == (name != "horizon_guide")
            assert not any("outline" in q for q in text) or name != "thick_outline"
            assert all(answer for q, answer in asked if "horizon" not in q and "night" not in q)  # the prompt's own


def test_only_the_lora_learns_and_the_judge_and_base_stay_bitwise(judge):
    base = jittered()
    model = add_lora(copy.deepcopy(base), 4)
    judge_before = copy.deepcopy(judge.model.state_dict())
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    specs, inputs, questions = batch(NIGHT)
    for i in (0, 5, 11):
        loss, _ = dp.control_loss(model, judge, NIGHT, inputs, questions, torch.randn(4, 3, 32, 32), i, 16)
        loss.backward()
        assert all(p.grad is None for p in judge.model.parameters())
        opt.step(), opt.zero_grad()
    assert all(torch.equal(v, judge_before[k]) for k, v in judge.model.state_dict().items())
    base_sd = base.state_dict()
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, base_sd.get(k.replace(".base.", "."), v))]
    assert moved == [] and any(p.abs().sum() > 0 for p in lora_parameters(model)[1::2])  # only lora_B moved off 0


def test_the_lora_learns_only_through_the_image(judge):
    model = add_lora(jittered(), 4)
    specs, inputs, questions = batch(NIGHT)
    noise = torch.randn(4, 3, 32, 32)
    loss, _ = dp.control_loss(model, judge, NIGHT, inputs, questions, noise, 3, 16)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model)[1::2])  # lora_B
    model.zero_grad()
    cut, _ = dp.control_loss(model, judge, NIGHT, inputs, questions, noise, 3, 16, detach_image=True)
    assert not cut.requires_grad and torch.allclose(cut, loss)  # the same value, and no path around the image


def test_the_sampler_prefix_carries_no_gradient(judge):
    """The gradient is that of the one call at x_t, x_t a constant; a prefix that kept its graph would differ."""
    model = add_lora(jittered(), 4)
    specs, inputs, questions = batch(NIGHT)
    noise, i = torch.randn(4, 3, 32, 32), 6
    dp.control_loss(model, judge, NIGHT, inputs, questions, noise, i, 16)[0].backward()
    got = [p.grad.clone() for p in lora_parameters(model)]
    ts = dp.timesteps(16)

    def grads(x_t):
        model.zero_grad()
        v = model(x_t, ts[i].expand(4), **inputs)
        x0 = (x_t - ts[i] * v).clamp(-1, 1)
        (-dp.judge_log_p(judge, x0, questions, NIGHT.visual).mean()).backward()
        return [p.grad.clone() for p in lora_parameters(model)]

    x, x_leak = noise, noise
    for k in range(i):  # the same Euler steps twice: without and with the graph
        with torch.no_grad():
            x = x + (ts[k + 1] - ts[k]) * model(x, ts[k].expand(4), **inputs)
        x_leak = x_leak + (ts[k + 1] - ts[k]) * model(x_leak, ts[k].expand(4), **inputs)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, grads(x)))
    assert max((a - b).abs().max().item() for a, b in zip(got, grads(x_leak))) > 1e-6


@pytest.mark.parametrize("prompt", [("line", 0.75), ("strip", world.COOL)])
def test_visual_prompts_are_drawn_and_differentiable(prompt):
    x = torch.rand(2, 3, 32, 32, requires_grad=True) * 2 - 1
    x.retain_grad()
    out = questions.overlay(x, prompt)
    out.sum().backward()
    under = x.grad[:, 0] == 0                                   # the pixels the prompt covers take no gradient
    assert 0 < under.float().mean() < 0.15 and (x.grad[:, :, ~under[0]] == 1).all()
    if prompt[0] == "line":
        assert torch.equal(out[:, :, 24, 5], torch.tensor([[1., -1, -1]] * 2))  # red at the low horizon's row
    else:
        assert torch.equal(out[0, :, 31, 1], torch.tensor(world.COLORS[world.COOL[0]]) * 2 - 1)


def test_a_tiny_run_raises_the_judges_log_p_yes(judge):
    """With a random tiny judge and base, 40 steps of the script's own loop (train_lora: the default LoRA placement
    and keep questions) raise the judge's mean log p(Yes) on the control's questions, for the images the full
    sampler makes from fixed noises."""
    base, control = jittered(), dp.CONTROLS["large"]
    specs, inputs, questions = batch(control, 8, seed=3)
    noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    score = lambda m: dp.judge_log_p(judge, dp.euler(m, noise, inputs, 8).clamp(-1, 1), questions).mean().item()
    cfg = dp.Config(preset="tiny", device="cpu", steps=40, batch_size=8, lr=1e-2, lora_rank=8, sample_steps=8,
                    noise_pool=8, quiet=True)
    model, seconds, end = dp.train_lora(cfg, common.setup(cfg), base.state_dict(), MCFG, judge, control, specs,
                                        inputs["tokens"], cfg.steps)
    assert end == 40 and seconds > 0
    assert score(model) > score(base) + 0.05, (score(base), score(model))


def run(args):
    return dp.train(common.parse_config(dp.Config(), args))


def test_a_control_given_as_data_runs_and_resume_equals_an_uninterrupted_run(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--preset=tiny", f"--base={files / 'base.pt'}", f"--judge={files / 'vlm'}", "--controls=custom",
            "--questions=is it night ?|is the {color} {shape} small ?", "--oracle=sky=black,gray,navy",
            "--prompts=sky=white,silver,sand;size=small", "--steps=4", "--batch_size=2", "--eval_n=3",
            "--best_of=2", "--ckpt_every=2", "--quiet"]
    results = run(args + ["--out=a", "--mode=both", "--prompt_n=1", "--prompt_steps=1"])
    rows = results["custom"]
    assert set(rows) == {"base", "best-of-2", "LoRA, one per control", "LoRA, one per prompt (first 1)",
                         "base (first 1)"}
    assert all(r["gap"] == pytest.approx(r["judge_yes"] - r["oracle"]) for r in rows.values())
    assert rows["best-of-2"]["judge_p_yes"] >= rows["base"]["judge_p_yes"] - 1e-6  # the judge's pick never loses
    table = open("results/dual_process/dual_process.md").read()
    assert "| LoRA, one per control |" in table and os.path.exists("results/dual_process/dual_process_custom.png")
    log = [json.loads(line) for line in open("a/custom_log.jsonl")]
    assert [r["step"] for r in log] == [4] and log[0]["p_yes"] > 0
    run(args + ["--out=b", "--stop_at=2", "--eval_n=0"])
    run(args + ["--out=b", "--resume", "--eval_n=0"])
    a, b = (torch.load(f"{d}/custom/ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 4 and all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    moments = lambda ck: [t for s in ck["opt"]["state"].values() for t in (s["exp_avg"], s["exp_avg_sq"])]
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b))) and len(moments(a)) > 0
    with pytest.raises(SystemExit, match="would go back"):
        run(args + ["--out=b", "--resume", "--stop_at=2"])
    with pytest.raises(SystemExit, match="was trained with --lora_parts=text_encoder.blocks"):
        run(args + ["--out=b", "--resume", "--lora_parts=blocks"])
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        run(args + ["--out=a"])
