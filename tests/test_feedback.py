"""ByteEdit (feedback.py): the rollout prefix carries no gradient and starts from the noised masked input; the rewards
and the perceptual network stay frozen and unchanged; the discriminator learns, and its coherence reward prefers the
true image to a shifted seam; feedback lowers its own loss; each phase starts from the one before; resume equals an
uninterrupted run."""
import dataclasses
import hashlib
import json

import pytest
import torch

import common
import data
import feedback as fb
from model import DiT
from rewards import Aesthetic, Alignment
from sample import interpolate, timesteps
from tiny import MCFG, jittered


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny fill model and tiny (untrained) aesthetic and alignment rewards, saved as the project saves them."""
    d = tmp_path_factory.mktemp("feedback")
    state = jittered().state_dict()
    common.save_checkpoint(str(d / "fill.pt"), model=state, ema=state, step=1, tasks=list(fb.TASKS),
                           config=dict(n_objects=1), model_config=dataclasses.asdict(MCFG))
    torch.manual_seed(0)
    common.save_checkpoint(str(d / "aesthetic.pt"), kind="aesthetic", preset="tiny", res=32,
                           state=Aesthetic("tiny").state_dict())
    common.save_checkpoint(str(d / "alignment.pt"), kind="alignment", preset="tiny", res=32, pool="mean",
                           state=Alignment("tiny").state_dict())
    return d


def cfg(files, tmp_path, **kw):
    return dataclasses.replace(fb.Config(preset="tiny", device="cpu", quiet=True, generator=str(files / "fill.pt"),
                                         aesthetic=str(files / "aesthetic.pt"), alignment=str(files / "alignment.pt"),
                                         out=str(tmp_path / "run"), batch_size=4, steps=4, eval_n=4, phases="2",
                                         arms="pefl+adv", ckpt_every=2, log_every=1), **kw)


def rewards(files):
    from rewards import load_reward
    return load_reward(str(files / "aesthetic.pt")), load_reward(str(files / "alignment.pt"))


def fill_batch(n=4, task="inpaint", seed=0):
    return data.make_batch(task, n, 32, seed=seed, n_objects=1, text_len=MCFG.max_text_len)


def digest(module):
    return hashlib.sha1(b"".join(t.detach().numpy().tobytes() for t in module.state_dict().values())).hexdigest()


class Constant(torch.nn.Module):
    """A field that is the same velocity c everywhere: Euler from t_a to t_b moves x by (t_b - t_a) c exactly."""

    def __init__(self, c=0.3):
        super().__init__()
        self.c = c

    def forward(self, x, t, **inputs):
        return torch.full_like(x, self.c)


@pytest.mark.parametrize("T", sorted(fb.PHASES))
def test_rollout_starts_from_the_noised_masked_input_and_stops_at_t2(T):
    """The no-grad prefix: the masked image noised to t = T1 / T with the step's noise, then Euler on the T-step grid
    down to a random index j with t_j <= T2 / T (never t = 0); no graph."""
    b, (T1, T2) = fill_batch(), fb.PHASES[T]
    seen = set()
    for seed in range(12):
        gen, again = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        x, t = fb.pefl_state(Constant(), b, T, gen)
        j = int(torch.randint(T - T2, T, (1,), generator=again))
        start = interpolate(b.cond[:, :3], torch.randn(b.target.shape, generator=again), T1 / T)
        assert torch.allclose(x, start + (t - T1 / T) * 0.3, atol=1e-5)           # Euler ran from T1 / T to t_j
        assert t == timesteps(T)[j] and 0 < t <= T2 / T + 1e-6
        assert not x.requires_grad and x.grad_fn is None
        seen.add(j)
    assert seen == set(range(T - T2, T)) or len(seen) > 1                           # j is drawn, not fixed


def test_the_generator_loss_reaches_the_generator_and_not_the_discriminator():
    b, disc, model = fill_batch(), fb.Discriminator(3), jittered()
    noise = dict(t=torch.full((4,), .5), eps=torch.randn(b.target.shape), drop=torch.zeros(4, dtype=torch.bool))
    cfg = fb.Config(feedback_weight=1.0, adv_weight=1.0)
    loss, logs = fb.feedback_loss(model, b, noise, None, disc, cfg, "adv", 8, torch.Generator().manual_seed(3))
    loss.backward()
    assert all(p.grad is None for p in disc.parameters()) and all(p.requires_grad for p in disc.parameters())
    assert model.final_layer.linear.weight.grad.abs().sum() > 0 and not logs["x0"].requires_grad


def test_rewards_and_perceptual_network_stay_frozen_while_the_generator_learns(files, tmp_path):
    c = fb.check_config(cfg(files, tmp_path))
    env = common.setup(c)
    aesthetic, alignment = r = rewards(files)
    before = digest(aesthetic), digest(alignment)
    start = dict(model=jittered().state_dict(), disc=None)
    ema, disc, _, _ = fb.train_phase(c, env, MCFG, "pefl+adv", 2, start, r, 1)
    assert (digest(aesthetic), digest(alignment)) == before
    assert not any(p.requires_grad for p in list(aesthetic.parameters()) + list(alignment.parameters()))
    assert digest(ema) != digest(jittered())                                        # the generator moved
    assert all(p.requires_grad for p in disc.parameters())


def test_discriminator_loss_falls_on_a_tiny_run(files, tmp_path):
    c = fb.check_config(cfg(files, tmp_path, steps=30, batch_size=8, disc_lr=3e-3, arms="adv"))
    env = common.setup(c)
    with open(tmp_path / "log.jsonl", "w") as log:
        fb.train_phase(c, env, MCFG, "adv", 2, dict(model=jittered().state_dict(), disc=None), rewards(files), 1,
                       log)
    d = [json.loads(line)["d_loss"] for line in open(tmp_path / "log.jsonl")]
    assert len(d) == 30 and sum(d[-5:]) / 5 < 0.7 * sum(d[:5]) / 5, d


def shifted(batch, k=4):
    """The true image with the hole's content shifted k pixels right and down: the seam no longer lines up."""
    moved = torch.roll(batch.target, (k, k), (2, 3))
    return batch.mask * moved + (1 - batch.mask) * batch.target


def test_coherence_reward_is_higher_for_the_true_image_than_for_a_shifted_seam():
    """The discriminator trained by disc_loss with shifted-seam fakes rates held-out true images above shifted ones
    (on the mean and on most images)."""
    torch.manual_seed(0)
    disc = fb.Discriminator(3)
    opt = torch.optim.AdamW(disc.parameters(), lr=3e-3, betas=(0.5, 0.99))
    batches = [fill_batch(16, task, seed) for seed in range(2) for task in fb.TASKS]
    for step in range(150):
        b = batches[step % len(batches)]
        loss = fb.disc_loss(disc, shifted(b), b)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for task in fb.TASKS:
            b = data.make_batch(task, 32, 32, seed=99, split="test", n_objects=1, text_len=MCFG.max_text_len)
            true, wrong = fb.coherence(disc, b.target, b), fb.coherence(disc, shifted(b), b)
            assert true.mean() > wrong.mean() and (true > wrong).float().mean() >= 0.65, (task, true, wrong)


def test_pefl_lowers_its_own_loss_more_than_flow_matching_does(files, tmp_path):
    """A short PeFL run (feedback weight 1) lowers the feedback terms (L1, perceptual, aesthetic) on the examples it
    trained on, and below where as many flow-matching steps alone (arm sft) bring them."""
    c = fb.check_config(cfg(files, tmp_path, steps=20, arms="pefl", feedback_weight=1.0, lr=1e-3, ema=0.0))
    env = common.setup(c)
    r = rewards(files)

    def terms(model):
        out = []
        for step in range(4):
            b, noise = fb.step_batch(c, step, 32, 1, MCFG.max_text_len, "cpu")
            with torch.no_grad():
                _, logs = fb.feedback_loss(model, b, noise, r, None, c, "pefl", 2, common.step_generator(0, step, 1))
            out.append(logs["l1"] + logs["perc"] - torch.nn.functional.logsigmoid(logs["r_a"]))
        return sum(out) / 4

    before, start = terms(jittered().eval()), dict(model=jittered().state_dict(), disc=None)
    pefl = terms(fb.train_phase(c, env, MCFG, "pefl", 2, start, r, 1)[0])
    sft = terms(fb.train_phase(c, env, MCFG, "sft", 2, start, r, 1)[0])
    assert pefl < 0.9 * before and pefl < sft, (before, pefl, sft)


def test_each_phase_starts_from_the_weights_the_one_before_left(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    starts, ends, train_phase = [], [], fb.train_phase

    def spy(cfg, env, mcfg, arm, T, start, *a, **kw):
        starts.append((T, {k: v.clone() for k, v in start["model"].items()}, start["disc"]))
        out = train_phase(cfg, env, mcfg, arm, T, start, *a, **kw)
        ends.append((T, {k: v.clone() for k, v in out[0].state_dict().items()}, out[1].state_dict()))
        return out

    monkeypatch.setattr(fb, "train_phase", spy)
    fb.train(cfg(files, tmp_path, phases="20,8,2", steps=2, arms="sft,pefl+adv"))
    generator = common.load_checkpoint(str(files / "fill.pt"))["ema"]
    assert [s[0] for s in starts] == [20, 8, 2] * 2
    for arm in (starts[:3], starts[3:]):                                            # each arm from the fill model
        assert arm[0][2] is None and all(torch.equal(arm[0][1][k], v) for k, v in generator.items())
    for k in (1, 2, 4, 5):                                                          # each phase from the one before
        (_, model, disc), (_, ema, d) = starts[k], ends[k - 1]
        assert all(torch.equal(model[n], v) for n, v in ema.items())
        assert all(torch.equal(disc[n], v) for n, v in d.items())
    table = (tmp_path / "results" / "feedback" / "feedback.md").read_text()
    assert table.count("PeFL + adversarial, phase") == 2 * 3 and table.count("| fill model, untrained |") == 2 * 3


def test_resume_equals_an_uninterrupted_run(files, tmp_path, monkeypatch):
    """Two phases with the default generator (train.py's tiny fill recipe, built here): stopped within the first
    phase, then resumed, every phase ends as the uninterrupted run's; --stop_at cannot go back."""
    monkeypatch.chdir(tmp_path)

    def run(d, **kw):
        return fb.train(cfg(files, tmp_path, out=str(tmp_path / d), name=d, generator="", phases="8,2", **kw))

    run("a")
    run("b", stop_at=2)
    assert common.load_checkpoint(str(tmp_path / "b" / "pefl+adv" / "T8" / "ckpt.pt"))["step"] == 2
    assert not (tmp_path / "b" / "pefl+adv" / "T2").exists()
    with pytest.raises(SystemExit, match="would go back"):
        run("b", stop_at=2, resume=True)
    run("b", resume=True)
    for T in (8, 2):
        a, b = (common.load_checkpoint(str(tmp_path / d / "pefl+adv" / f"T{T}" / "ckpt.pt")) for d in "ab")
        assert a["step"] == b["step"] == 4
        for part in ("model", "ema", "disc"):
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (T, part)
    scores = [{row: {t: r[t] for t in fb.TASKS} for row, r in json.loads(
        (tmp_path / "results" / "feedback" / f"{d}.json").read_text())["results"].items()} for d in "ab"]
    assert scores[0] == scores[1] and len(scores[0]) == 4                           # the same table (times aside)
