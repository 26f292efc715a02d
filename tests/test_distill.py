"""DanceOPD (distill_onpolicy.py): stop-gradient, frozen teachers, hard routing, the Beta(5, 2) query, zero loss at
the teacher, on-policy beats off-policy on the student's own states, and the script end to end."""
import copy
import dataclasses
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import data
import world
import distill_onpolicy as opd
import sample
import train
from model import DiT, lora_parameters, merged_copy, preset

MCFG = preset("tiny", vocab_size=len(world.VOCAB), max_text_len=world.MAX_TOKENS)
TASKS = ["t2i", "local_edit", "global_edit"]


def random_field(seed, scale=0.02, init=None):
    """A tiny DiT whose velocity field is not zero: every weight (zero-inits included) plus Gaussian noise."""
    torch.manual_seed(0)
    model = DiT(MCFG) if init is None else copy.deepcopy(init)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def frozen(model):
    return model.eval().requires_grad_(False)


def config(**kw):
    return opd.resolve(opd.Config(**{**dict(preset="tiny", batch_size=4, lora_rank=0), **kw}))


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_rollout_has_no_grad_and_the_query_is_detached():
    student, teacher = random_field(1), frozen(random_field(2))
    cfg = config(tasks="t2i")
    batch = opd.get_batch(cfg, ["t2i"], 0, 32, "cpu")
    states, _, _ = sample.rollout(student, torch.randn(4, 3, 32, 32), common.model_inputs(batch), 16)
    assert not states.requires_grad
    x, t, w, inputs = opd.query_states(cfg, student, batch, common.step_generator(0, 0))
    assert not x.requires_grad and x.grad_fn is None and x.shape == (4, 3, 32, 32)
    # the loss's gradient is exactly that of MSE at a constant state ...
    opd.distill_loss(student, {"t2i": teacher}, batch, cfg, common.step_generator(0, 0))[0].backward()
    g_opd = grads(student)
    student.zero_grad()
    ((student(x, t, **inputs) - teacher(x, t, **inputs)).square().mean((1, 2, 3)) * w).sum().div(4).backward()
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_opd, grads(student)))
    # ... and differs from the gradient through the trajectory, so the check above has teeth
    student.zero_grad()
    noise = torch.randn(batch.target.shape, generator=common.step_generator(0, 0))  # query_states' first draw
    idx, ts, xt, states = ((1 - t) * 16).round().long(), sample.timesteps(16), noise, []
    for i in range(16):  # a leaky rollout: the same Euler steps with the graph kept
        states.append(xt)
        xt = xt + (ts[i + 1] - ts[i]) * student(xt, ts[i].expand(4), **common.model_inputs(batch))
    x_leak = torch.stack(states)[idx, torch.arange(4)]
    torch.testing.assert_close(x_leak.detach(), x)
    ((student(x_leak, t, **inputs) - teacher(x, t, **inputs)).square().mean((1, 2, 3)) * w).sum().div(4).backward()
    assert max((a - b).abs().max().item() for a, b in zip(g_opd, grads(student))) > 1e-4


def test_rollin_takes_the_teachers_steps():
    """--rollin: with probability 1 the queried states lie on the teacher's own rollout, with 0 on the student's,
    and in between on a rollout that mixes the two (still detached)."""
    student, teacher = random_field(1), frozen(random_field(2))
    cfg = config(tasks="t2i", query="uniform", query_k=4)
    batch = opd.get_batch(cfg, ["t2i"], 0, 32, "cpu")
    noise = torch.randn(batch.target.shape, generator=common.step_generator(0, 0))  # query_states' first draw
    xs = {}
    for p, field in ((0.0, student), (1.0, teacher), (0.5, None)):
        x, t, _, _ = opd.query_states(config(tasks="t2i", query="uniform", query_k=4, rollin=p), student, batch,
                                       common.step_generator(0, 0), teacher)
        assert x.grad_fn is None
        xs[p], idx = x, ((1 - t) * 16).round().long().view(4, 4)
        if field is not None:
            states, _, _ = sample.rollout(field, noise, common.model_inputs(batch), 16)
            torch.testing.assert_close(x, states[idx, torch.arange(4)[:, None]].flatten(0, 1))
    late = (idx.flatten() > 1)  # states after both fields could have taken a step
    assert all((xs[0.5][late] - xs[p][late]).abs().max() > 1e-4 for p in (0.0, 1.0))


def test_teachers_stay_frozen_and_only_lora_moves(tmp_path):
    teachers = {}
    for i, task in enumerate(TASKS):  # through the script's own loader, from checkpoints
        path = str(tmp_path / f"{task}.pt")
        common.save_checkpoint(path, ema=random_field(i + 2).state_dict(), tasks=[task],
                              model_config=dataclasses.asdict(MCFG))
        teachers[task] = common.load_teacher(path, MCFG, task, "cpu")
    before = {t: copy.deepcopy(m.state_dict()) for t, m in teachers.items()}
    base = random_field(1)
    student = opd.make_student(base.state_dict(), MCFG, 4, 1.0, "cpu")
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert {id(p) for p in lora_parameters(student)} < {id(p) for p in trainable}  # LoRA + the condition input
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    cfg = config(lora_rank=4, routing="soft")  # soft: every teacher is queried every step
    for step in range(3):
        batch = opd.get_batch(cfg, TASKS, step, 32, "cpu")
        loss, _ = opd.distill_loss(student, teachers, batch, cfg, common.step_generator(0, step))
        loss.backward()
        opt.step(), opt.zero_grad()
    for t, m in teachers.items():
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
        assert all(torch.equal(v, before[t][k]) for k, v in m.state_dict().items())
    base_sd = base.state_dict()  # the base weights, under the LoRA or not, did not move ...
    assert all(torch.equal(v, base_sd[k.replace(".base.", ".")]) for k, v in student.state_dict().items()
               if "lora_" not in k and not k.startswith(opd.STUDENT_TRAINABLE))
    moved = {k.split(".")[0] for k, v in student.state_dict().items()  # ... except the condition input
             if "lora_" not in k and not torch.equal(v, base_sd[k.replace(".base.", ".")])}
    assert moved == set(opd.STUDENT_TRAINABLE)
    merged = merged_copy(student)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in merged.state_dict().items())  # LoRA did


class Recorder(nn.Module):
    """Wraps a field and records the task ids it is asked about, one entry per call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, task, tokens, cond=None, ref=None):
        self.calls.append(sorted(set(task.tolist())))
        return self.model(x, t, task, tokens, cond, ref)


@pytest.mark.parametrize("routing", ["hard", "soft"])
def test_hard_routing_asks_exactly_the_routed_teacher(routing):
    field, student = frozen(random_field(2)), random_field(1)
    teachers = {t: Recorder(field) for t in TASKS}
    cfg = config(routing=routing)
    routes = []
    for step in range(6):
        batch = opd.get_batch(cfg, TASKS, step, 32, "cpu")
        assert batch.task == opd.get_batch(cfg, TASKS, step, 32, "cpu").task  # deterministic, resumable
        opd.distill_loss(student, teachers, batch, cfg, common.step_generator(0, step))
        called = {t for t, r in teachers.items() if r.calls}
        assert called == ({batch.task} if routing == "hard" else set(TASKS))
        assert all(r.calls == [[data.TASKS.index(batch.task)]] for t, r in teachers.items() if t in called)
        routes.append(batch.task)
        for r in teachers.values():
            r.calls.clear()
    assert len(set(routes)) > 1
    cfg = config(batch_size=1)  # the route is uniform over the capabilities
    counts = [opd.get_batch(cfg, TASKS, s, 32, "cpu").task for s in range(300)]
    assert all(60 < counts.count(t) < 140 for t in TASKS)


def beta_cdf(x, a, b):
    """Regularised incomplete beta for integer a, b: P(at least a of a + b - 1 uniforms are <= x)."""
    m = a + b - 1
    return sum(math.comb(m, j) * x ** j * (1 - x) ** (m - j) for j in range(a, m + 1))


def chi_square(idx, probs):
    """Pearson's statistic with bins merged from each end until every expected count is >= 5; and its dof."""
    n, counts = len(idx), torch.bincount(idx, minlength=len(probs)).double().tolist()
    obs, exp, o, e = [], [], 0.0, 0.0
    for c, p in zip(counts, probs):
        o, e = o + c, e + n * p
        if e >= 5:
            obs.append(o), exp.append(e)
            o = e = 0.0
    obs[-1], exp[-1] = obs[-1] + o, exp[-1] + e
    return sum((o - e) ** 2 / e for o, e in zip(obs, exp)), len(obs) - 1


def critical(dof, z=3.09):
    """The chi-square quantile at p = 0.001 (Wilson-Hilferty; z is the normal 0.999 quantile)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("position,ab", [("beta", (5, 2)), ("high", (2, 5)), ("median", (5, 5))])
def test_query_index_follows_the_discrete_beta(position, ab):
    n = 16
    idx = opd.query_index(torch.Generator().manual_seed(0), (50_000,), n, position)
    probs = [beta_cdf((i + 1) / n, *ab) - beta_cdf(i / n, *ab) for i in range(n)]  # P(floor(u n) = i)
    stat, dof = chi_square(idx, probs)
    assert stat < critical(dof), (stat, dof)
    flipped, _ = chi_square(n - 1 - idx, probs)  # the other end of the schedule: the test must reject it
    assert position == "median" or flipped > 100 * critical(dof)
    if position == "beta":  # METHODS.md: biased toward the low-noise end (timesteps run from t=1 down to 0)
        t = sample.timesteps(n)[idx]
        assert t.mean() < 0.35 and (t <= 0.5).float().mean() > 0.85
    assert torch.equal(idx, opd.query_index(torch.Generator().manual_seed(0), (50_000,), n, position))


def test_the_curriculum_moves_from_the_high_noise_mix_to_beta():
    """--query=curriculum: at progress p a query is Beta(5, 2) with probability p, else Beta(2, 5)."""
    n, ab = 16, {"high": (2, 5), "beta": (5, 2)}
    bins = {k: [beta_cdf((i + 1) / n, *v) - beta_cdf(i / n, *v) for i in range(n)] for k, v in ab.items()}
    for p in (0.0, 0.3, 1.0):
        idx = opd.query_index(torch.Generator().manual_seed(0), (50_000,), n, "curriculum", p)
        stat, dof = chi_square(idx, [(1 - p) * h + p * b for h, b in zip(bins["high"], bins["beta"])])
        assert stat < critical(dof), (p, stat)
        wrong, _ = chi_square(idx, [(0.7 - 0.4 * p) * h + (0.3 + 0.4 * p) * b for h, b in zip(*bins.values())])
        assert wrong > critical(dof), (p, wrong)  # a mix 30 points off is rejected


@pytest.mark.parametrize("mode", ["onpolicy", "offpolicy", "dense"])
def test_loss_is_zero_when_the_student_is_the_teacher(mode):
    teacher = frozen(random_field(2))
    student = opd.make_student(teacher.state_dict(), MCFG, 0, 1.0, "cpu")
    cfg = config(mode=mode, query_k=2)
    batch = opd.get_batch(cfg, ["local_edit"], 0, 32, "cpu")
    loss, _ = opd.distill_loss(student, {"local_edit": teacher}, batch, cfg, common.step_generator(0, 0))
    loss.backward()
    assert loss.item() == 0 and all(g.abs().max() == 0 for g in grads(student))
    probe_noise = torch.randn(batch.target.shape)
    assert opd.field_errors(student, teacher, batch, probe_noise).mean().item() == 0
    other = frozen(random_field(3))
    assert opd.distill_loss(student, {"local_edit": other}, batch, cfg, common.step_generator(0, 0))[0] > 1e-4
    guided = config(mode=mode, cfg_alpha=3.0)  # CFG absorption: the guided teacher is not the plain student
    assert opd.distill_loss(student, {"local_edit": teacher}, batch, guided, common.step_generator(0, 0))[0] > 0


def test_field_error_falls_faster_on_policy_than_off_policy():
    """Full fine-tune of a random field toward another, 20 steps of batch 8 each way, measured on the student's own
    rollouts from fixed test conditions. Measured: 0.0309 -> 0.0023 on-policy, 0.0309 -> 0.0098 off-policy."""
    base, teacher = random_field(1), frozen(random_field(2, init=random_field(1)))
    probe = data.make_batch("t2i", 8, 32, seed=5, split="test")
    noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    final = {}
    for mode in ("onpolicy", "offpolicy"):
        cfg = config(mode=mode, tasks="t2i", batch_size=8, lr=1e-3)
        student = opd.make_student(base.state_dict(), MCFG, 0, 1.0, "cpu")
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0)
        start = opd.field_errors(student, teacher, probe, noise).mean().item()
        for step in range(20):
            batch = opd.get_batch(cfg, ["t2i"], step, 32, "cpu")
            loss, _ = opd.distill_loss(student, {"t2i": teacher}, batch, cfg, common.step_generator(0, step))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step(), opt.zero_grad()
        final[mode] = opd.field_errors(student, teacher, probe, noise).mean().item()
        print(f"field error {mode}: {start:.4f} -> {final[mode]:.4f}")
        assert final[mode] < 0.8 * start
    assert final["onpolicy"] < 0.5 * final["offpolicy"], final


def test_merge_weights_is_the_average():
    a, b = random_field(1).state_dict(), random_field(2).state_dict()
    m = opd.merge_weights([a, b])
    assert all(torch.allclose(m[k], (a[k] + b[k]) / 2) for k in a)


def run(args):
    return opd.train(common.parse_config(opd.Config(), args))


def test_end_to_end_resume_and_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # out/ and results/ are relative to the working directory
    args = ["--preset=tiny", "--batch_size=4", "--lora_rank=4", "--quiet", "--log_every=2", "--steps=4"]
    with pytest.raises(SystemExit, match="--base=typo/ckpt.pt: no such file"):  # a path the user named: never built
        run(args + ["--base=typo/ckpt.pt", f"--out={tmp_path}/x"])
    assert not os.path.exists("typo") and not os.path.exists("out")
    assert train.prerequisite("tiny", "base", quiet=True) == "out/tiny/base/ckpt.pt"  # a --compare row needs it now
    assert "building the base model" in capsys.readouterr().out
    ckpt = run(args + [f"--out={tmp_path}/a", "--eval_n=4", "--compare=again=out/tiny/base/ckpt.pt"])
    out = capsys.readouterr().out  # the script builds what is missing, and only that
    assert "building the base" not in out and all(f"building the {t} expert" in out for t in TASKS[1:])
    assert "building joint SFT on t2i,local_edit,global_edit" in out
    world = "out/tiny/base/experts_pipeline_one_token"  # the default world's experts live apart from clean ones
    for task, path in (("t2i", "out/tiny/base/ckpt.pt"), ("local_edit", f"{world}/local_edit/ckpt.pt"),
                       ("global_edit", f"{world}/global_edit/ckpt.pt")):
        built = common.load_checkpoint(path)  # ... with the recipe's steps, the experts from this base, in the world
        recipe = train.RECIPES["tiny"]["base" if task == "t2i" else "expert"]
        assert built["step"] == recipe["steps"] and task in built["tasks"]
        assert task == "t2i" or (built["config"]["init_from"] == "out/tiny/base/ckpt.pt"
                                 and built["config"]["edit_data"] == "pipeline" and built["config"]["one_edit_token"])
    joint = common.load_checkpoint("out/tiny/base/joint_pipeline_one_token/ckpt.pt")  # matched compute: the two
    assert joint["step"] == 2 * train.RECIPES["tiny"]["expert"]["steps"] + train.RECIPES["tiny"]["joint"][
        "distill_steps"] and joint["tasks"] == sorted(TASKS)  # experts' steps and the distillation's
    assert joint["config"]["edit_data"] == "pipeline" and joint["model_config"]["one_edit_token"]
    model, ck = common.load_model(ckpt)  # a standard checkpoint: merged LoRA, plain DiT keys
    assert ck["tasks"] == sorted(TASKS) and not any("lora" in k for k in ck["ema"])
    assert ck["model_config"]["one_edit_token"]  # the student reads edits as its teachers do
    res = json.load(open("results/danceopd/danceopd.json"))["results"]
    assert set(res) == {"danceopd", "base (t2i teacher)", "local_edit teacher", "global_edit teacher",
                        "merged teachers", "joint SFT", "again"}
    png = Image.open("results/danceopd/danceopd.png")  # 4 examples a task; source, teacher, student, joint, truth
    assert png.size == (3 * 4 * 32, 5 * 32)
    shutil.copytree(world, "out/tiny/base/experts")  # the clean world's cache holding another world's experts
    with pytest.raises(SystemExit, match="was made with .*'edit_data': 'pipeline'.*: move it away"):
        train.prerequisite("tiny", "local_edit", base="out/tiny/base/ckpt.pt", quiet=True)
    base_row = res["base (t2i teacher)"]["t2i"]  # the same model and seeds give the same row, whatever its label
    gap = res["again"]["t2i"].pop("vs_teacher")  # the T2I teacher again, paired with itself: no gap at all
    assert gap == {"success": [0.0, 0.0], "psnr_truth": [0.0, 0.0]}
    assert res["again"]["t2i"] == base_row and set(res["danceopd"]) == set(TASKS + ["average"])
    assert "| danceopd |" in open("results/danceopd/danceopd.md").read()
    rows = [json.loads(line) for line in open(f"{tmp_path}/a/log.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 4] and set(rows[0]["field_error"]) == set(TASKS)
    by_state = rows[0]["field_error_by_state"]  # one error per rollout state; their mean is the logged error
    assert all(len(by_state[t]) == 16 and abs(sum(by_state[t]) / 16 - rows[0]["field_error"][t]) < 1e-3
               for t in TASKS)
    # cached teachers are reused; an interrupted + resumed run equals the uninterrupted one bitwise
    run(args + [f"--out={tmp_path}/b", "--eval_n=0", "--stop_at=2"])
    run(args + [f"--out={tmp_path}/b", "--eval_n=0", "--resume"])
    assert "building" not in capsys.readouterr().out
    a, b = (torch.load(f"{tmp_path}/{r}/ckpt.pt", weights_only=True) for r in "ab")
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a[key][k], b[key][k]) for key in ("student", "ema") for k in a[key])
    # --init: the student starts from another checkpoint (here the base with every weight moved), not the base
    other = torch.load("out/tiny/base/ckpt.pt", weights_only=True)
    other["ema"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in other["ema"].items()}
    common.save_checkpoint(f"{tmp_path}/other.pt", **other)
    run(args + [f"--out={tmp_path}/c", "--eval_n=0", f"--init={tmp_path}/other.pt", "--lr=1e-12"])
    c = torch.load(f"{tmp_path}/c/ckpt.pt", weights_only=True)["ema"]
    assert all(torch.allclose(c[k], other["ema"][k], atol=1e-6) for k in c)
    with pytest.raises(SystemExit, match="nothing.pt: no such file"):
        run(args + [f"--out={tmp_path}/d", f"--init={tmp_path}/nothing.pt"])
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        run(args + [f"--out={tmp_path}/a"])
    with pytest.raises(SystemExit, match="is not a --preset=small run"):  # refused before building anything
        run(args[1:] + ["--preset=small", f"--out={tmp_path}/b", "--resume"])
    assert not os.path.exists("out/small")
    # every other bad input: tests/test_errors.py


def test_the_base_checkpoint_sets_the_model_config(tmp_path, monkeypatch):
    """A base with model options (pooled_text, a shorter text) is taken as it is, and the experts built from it
    inherit them and live beside it, never among the shared models; a base of another preset is refused before
    anything is built."""
    monkeypatch.chdir(tmp_path)
    base = train.train(common.parse_config(train.Config(), [
        "--preset=tiny", "--pooled_text=false", "--text_len=24", "--n_objects=1", "--steps=2", "--batch_size=4",
        "--eval_n=0", "--quiet", f"--out={tmp_path}/mine"]))
    args = ["--preset=tiny", f"--base={base}", "--tasks=t2i,local_edit", "--batch_size=4", "--lora_rank=4", "--quiet",
            "--steps=2", "--eval_n=0"]
    student = run(args + [f"--out={tmp_path}/a"])
    expert = common.load_checkpoint(f"{tmp_path}/mine/experts_pipeline_one_token/local_edit/ckpt.pt")
    for ckpt in (expert, common.load_checkpoint(student)):
        assert not ckpt["model_config"]["pooled_text"] and ckpt["model_config"]["max_text_len"] == 24
    assert not os.path.exists("out/tiny")  # the shared tiny models were neither used nor built
    with pytest.raises(SystemExit, match="is not a --preset=small model"):
        run(args[1:] + ["--preset=small", f"--out={tmp_path}/b"])
    assert not os.path.exists("out/small")


def test_a_world_with_one_edit_token_and_pipeline_edits(tmp_path, monkeypatch):
    """World options: edit teachers trained with one edit token make a student that reads edits with one token;
    teachers of another world than the run's are refused; --edit_data gives the off-policy baseline the teachers'
    (degraded) targets; the table gives each model's paired gap to the task's teacher."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--preset=tiny", "--steps=2", "--batch_size=4", "--eval_n=0", "--quiet"]
    base = train.train(common.parse_config(train.Config(), tiny + [f"--out={tmp_path}/base"]))
    experts = {}
    for task, one in (("local_edit", "true"), ("global_edit", "true"), ("other", "false")):
        experts[task] = train.train(common.parse_config(train.Config(), tiny + [
            f"--task={'global_edit' if task == 'other' else task}", f"--init_from={base}", f"--one_edit_token={one}",
            "--edit_data=pipeline", f"--out={tmp_path}/{task}"]))
    args = ["--preset=tiny", f"--base={base}", "--batch_size=4", "--lora_rank=4", "--quiet", "--steps=2",
            "--eval_n=4", "--name=world", "--joint_sft=false"]
    mine = f"--experts=local_edit={experts['local_edit']},global_edit={experts['global_edit']}"
    with pytest.raises(SystemExit, match="trained with --edit_data=pipeline --one_edit_token=true: pass these"):
        run(args + [mine, f"--out={tmp_path}/a", "--edit_data=clean"])
    student = run(args + [mine, f"--out={tmp_path}/a"])  # the default world is theirs
    assert common.load_checkpoint(student)["model_config"]["one_edit_token"]
    res = json.load(open("results/danceopd/world.json"))["results"]
    gap = res["world"]["local_edit"]["vs_teacher"]
    assert set(gap) == {"success", "psnr_truth"} and "vs_teacher" not in res["local_edit teacher"]["local_edit"]
    assert "per_example" not in res["world"]["t2i"] and "joint SFT" not in res  # --joint_sft=false: no row
    with pytest.raises(SystemExit, match="trained with --edit_data=pipeline --one_edit_token=false: pass these"):
        run(args + [f"--experts=local_edit={experts['local_edit']},global_edit={experts['other']}",
                    f"--out={tmp_path}/b"])
    cfg = config(edit_data="pipeline", batch_size=8)
    for step in range(4):  # off-policy states noise the step's targets: the pipeline ones for edits
        b = opd.get_batch(cfg, TASKS, step, 32, "cpu")
        made = data.make_batch(b.task, 8, 32, seed=step, edit_data="pipeline" if b.task != "t2i" else "clean")
        assert torch.equal(b.target, made.target)


def test_the_preset_defaults_fill_only_what_is_left_open():
    cpu, gpu = opd.resolve(opd.Config(device="cpu")), opd.resolve(opd.Config(device="cuda"))
    assert (cpu.preset, cpu.out, cpu.steps, cpu.batch_size, cpu.lr) == ("small", "out/small/danceopd", 300, 16, 1e-3)
    assert (gpu.preset, gpu.out, gpu.steps, gpu.batch_size, gpu.lr) == ("base", "out/base/danceopd", 400, 64, 3e-4)
    mine = opd.resolve(opd.Config(device="cpu", preset="tiny", steps=7, out="elsewhere"))
    assert (mine.steps, mine.batch_size, mine.out) == (7, 16, "elsewhere")
    assert opd.command_args(cpu) == "--preset=small"
    assert opd.command_args(mine) == "--preset=tiny --out=elsewhere --steps=7"
    with pytest.raises(SystemExit, match="must be >= 0"):
        opd.check_config(opd.Config(steps=-1))


def test_each_world_and_task_set_has_its_own_shared_models():
    """Experts and joint SFT of another world, or joint SFT of other tasks, never share a folder with the clean
    world's defaults; the order the tasks are named in does not matter."""
    base, world = "out/tiny/base/ckpt.pt", dict(edit_data="pipeline", one_edit_token=True)
    assert train.shared_path("tiny", "local_edit", base) == "out/tiny/base/experts/local_edit/ckpt.pt"
    assert train.shared_path("tiny", "local_edit", base, world) == \
        "out/tiny/base/experts_pipeline_one_token/local_edit/ckpt.pt"
    assert train.shared_path("tiny", "joint", base, world, ["global_edit", "t2i", "local_edit"]) == \
        "out/tiny/base/joint_pipeline_one_token/ckpt.pt"
    assert train.shared_path("tiny", "joint", base, {}, ["local_edit", "global_edit"]) == \
        "out/tiny/base/joint_global_edit_local_edit/ckpt.pt"
