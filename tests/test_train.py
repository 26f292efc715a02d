"""Training plumbing (train.py): resume is bitwise, DDP equals one process, bad input is a clear error."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import common
import sample
import train
import world
from model import DiT, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset=tiny", "--batch_size=8", "--eval_n=0", "--quiet", "--log_every=1", "--warmup=2"]


def run(out, *args):
    return train.train(common.parse_config(train.Config(), TINY + [f"--out={out}", *args]))


def losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in r]


def test_resume_equals_uninterrupted_run(tmp_path):
    a = torch.load(run(tmp_path / "a", "--steps=6", "--task=joint"), weights_only=True)
    run(tmp_path / "b", "--steps=6", "--task=joint", "--stop_at=3")
    b = torch.load(run(tmp_path / "b", "--steps=6", "--task=joint", "--resume"), weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert not os.path.exists(str(tmp_path / "a" / "ckpt.pt") + ".tmp")


def test_ddp_two_processes_match_one(tmp_path):
    one = tmp_path / "one"
    run(one, "--steps=4")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as sock:  # a free port: a fixed one may still be held by an earlier run
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(ROOT, "train.py"), *TINY, "--steps=4", f"--out={tmp_path / 'two'}"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # torchrun's own error, when it fails
    l1, l2 = losses(one), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4
    assert all(abs(x - y) < 1e-4 * max(1, abs(x)) for x, y in zip(l1, l2)), (l1, l2)
    w1 = torch.load(one / "ckpt.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown option '--lrr=1'"):
        common.parse_config(train.Config(), ["--lrr=1"])
    with pytest.raises(SystemExit, match="--steps takes an int"):
        common.parse_config(train.Config(), ["--steps=many"])
    with pytest.raises(SystemExit, match="--task=paint: must be one of t2i, "):
        run(tmp_path / "x", "--task=paint")
    with pytest.raises(SystemExit, match="--init_from=nope.pt: no such file"):
        run(tmp_path / "x", "--init_from=nope.pt")
    with pytest.raises(SystemExit, match="--precision=fp16: must be one of auto, fp32"):
        run(tmp_path / "x", "--precision=fp16")


def test_checkpoint_from_another_config_is_refused(tmp_path):
    ckpt = run(tmp_path / "a", "--steps=1")
    with pytest.raises(SystemExit, match="another model config"):
        run(tmp_path / "b", "--steps=1", "--preset=small", f"--init_from={ckpt}")
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        run(tmp_path / "a", "--steps=2")  # never overwrite a finished run
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint"):
        common.load_checkpoint(str(tmp_path / "junk.pt"))


def test_finetune_starts_from_the_base_and_records_tasks(tmp_path):
    base = run(tmp_path / "base", "--steps=2")
    expert = run(tmp_path / "expert", "--steps=1", "--task=local_edit", f"--init_from={base}")
    model, ckpt = common.load_model(expert)
    assert ckpt["tasks"] == ["local_edit", "t2i"]
    b = torch.load(base, weights_only=True)["ema"]
    moved = [k for k in b if not torch.equal(b[k], ckpt["model"][k])]
    assert moved and len(moved) < len(b)  # one step moved some weights, the rest came from the base


@pytest.mark.parametrize("n_objects", [1, 2])
def test_n_objects_fixes_the_object_count_of_t2i_batches(n_objects):
    cfg = common.parse_config(train.Config(), ["--preset=tiny", "--batch_size=16", f"--n_objects={n_objects}",
                                              "--grid_rate=0"])
    env = common.Env(torch.device("cpu"), None, False, 0, 1)
    batch, noise = train.get_batch(cfg, env, step=0, res=32)
    assert [len(s.objects) for s in batch.specs] == [n_objects] * 16 and noise["t"].shape == (16,)


def test_batches_are_tokenized_to_the_model_text_length(tmp_path):
    """A --text_len=24 run gets 24-wide token batches from data (no pad columns for the model to drop, so no
    device check per forward); whole-scene captions of 2-3 objects do not fit and are refused up front."""
    cfg = common.parse_config(train.Config(), ["--preset=tiny", "--batch_size=8", "--text_len=24", "--n_objects=1"])
    batch, _ = train.get_batch(cfg, common.Env(torch.device("cpu"), None, False, 0, 1), step=0, res=32)
    assert batch.tokens.shape == (8, 24) and (batch.tokens != 0).any()
    with pytest.raises(SystemExit, match="--text_len=24 is too short for the t2i captions .* add --n_objects=1"):
        run(tmp_path / "x", "--text_len=24")


def test_logit_normal_times_favour_mid_noise(tmp_path):
    """--t_sampling=logit_normal draws t = sigmoid(N(0, 1)): about 73% in [0.25, 0.75], against 50% uniform."""
    env = common.Env(torch.device("cpu"), None, False, 0, 1)
    for kind, lo, hi in (("uniform", 0.45, 0.55), ("logit_normal", 0.69, 0.77)):
        cfg = common.parse_config(train.Config(), ["--preset=tiny", "--batch_size=512", f"--t_sampling={kind}"])
        t = torch.cat([train.get_batch(cfg, env, step=s, res=32)[1]["t"] for s in range(4)])
        assert 0 < t.min() and t.max() < 1 and lo < ((t > 0.25) & (t < 0.75)).float().mean() < hi, kind
    with pytest.raises(SystemExit, match="--t_sampling=beta: must be one of uniform, logit_normal"):
        run(tmp_path / "x", "--t_sampling=beta")


def test_training_learns_through_its_own_loss():
    """train.flow_matching_loss is the MSE of the velocity at x_t = (1 - t) x0 + t eps against eps - x0, with the
    dropped captions all pads; 40 AdamW steps on one fixed batch through it more than halve it."""
    cfg = common.parse_config(train.Config(), ["--preset=tiny", "--batch_size=8", "--n_objects=1", "--cond_drop=0.5"])
    env = common.Env(torch.device("cpu"), None, False, 0, 1)
    batch, noise = train.get_batch(cfg, env, step=0, res=32)
    torch.manual_seed(0)
    model = DiT(preset("tiny", vocab_size=len(world.VOCAB)))
    with torch.no_grad():  # every weight non-zero, so the check below is not 0 = 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x0, t, eps, drop = batch.target, noise["t"], noise["eps"], noise["drop"]
    assert 0 < drop.sum() < 8
    inputs = dict(common.model_inputs(batch), tokens=torch.where(drop[:, None], 0, batch.tokens))
    by_hand = (model(sample.interpolate(x0, eps, t), t, **inputs) - (eps - x0)).square().mean()
    loss, logs = train.flow_matching_loss(model, batch, noise)
    torch.testing.assert_close(loss, by_hand)
    opt, first = torch.optim.AdamW(model.parameters(), lr=2e-3), loss.item()
    for _ in range(40):
        loss, _ = train.flow_matching_loss(model, batch, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


class Tokens(torch.nn.Module):
    """A field that records the caption tokens of every call and returns zeros."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, task, tokens, cond=None, ref=None):
        self.seen.append(tokens.clone())
        return torch.zeros_like(x)


def test_the_dropped_caption_is_the_unconditional_caption_of_guidance():
    """Classifier-free guidance only works if the caption dropped in training is exactly the one guidance feeds the
    unconditional half: both are all pads."""
    cfg = common.parse_config(train.Config(), ["--preset=tiny", "--batch_size=16", "--cond_drop=0.5"])
    batch, noise = train.get_batch(cfg, common.Env(torch.device("cpu"), None, False, 0, 1), step=0, res=32)
    field = Tokens()
    train.flow_matching_loss(field, batch, noise)
    dropped = field.seen[0][noise["drop"]]
    sample.guided_velocity(field, batch.target, torch.full((16,), 0.5), common.model_inputs(batch), cfg_scale=3.0)
    unconditional = field.seen[1][16:]  # guided_velocity runs [conditional | unconditional] in one call
    assert len(dropped) and (batch.tokens != 0).any(1).all()  # the batch's captions are real ones
    assert torch.equal(dropped, unconditional[:len(dropped)]) and not unconditional.any()


def test_ema_moves_toward_the_model_by_one_minus_decay():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        ema.weight.fill_(0.0), ema.bias.fill_(0.0), model.weight.fill_(1.0), model.bias.fill_(-1.0)
    common.ema_update(ema, model, 0.9)
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.1)) and torch.allclose(ema.bias, torch.full((2,), -0.1))
    assert model.weight.eq(1.0).all()  # the model itself is left alone


def test_learning_rate_warms_up_then_decays_to_its_floor(tmp_path):
    lr = [common.cosine_lr(s, 100, 1e-3, warmup=10, min_lr=0.1) for s in range(101)]
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 100)) for s in range(101)]
    assert [lr[s] / cosine[s] for s in range(10)] == pytest.approx([1e-4 * (s + 1) for s in range(10)])  # warm-up
    assert all(a < b for a, b in zip(lr[:9], lr[1:10])) and all(a >= b for a, b in zip(lr[9:], lr[10:]))
    assert lr[50] == pytest.approx(1e-4 + 0.9e-3 * 0.5)                           # half-way down the cosine
    assert lr[100] == pytest.approx(1e-4)                                          # the floor, min_lr * lr
    run(tmp_path / "a", "--steps=4", "--warmup=2")                                # train.py logs what it used
    logged = [r["lr"] for r in map(json.loads, open(tmp_path / "a" / "log.jsonl")) if "lr" in r]
    closed = [1e-3 * min(1, (s + 1) / 2) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / 4))) for s in range(4)]
    assert logged == pytest.approx(closed)
