"""The flow ODE (sample.py): exact integration of known fields, rollout bookkeeping, CFG, the time grid."""
import pytest
import torch
import torch.nn as nn

from model import DiT, preset
from sample import (euler, guided_velocity, interpolate, rollout, timesteps, velocity_target, x0_from_v)

B, SHAPE = 3, (3, 8, 8)


class Field(nn.Module):
    """A fake model with the DiT signature: v(x, t) = a + b t, independent of x; counts calls."""

    def __init__(self, a, b=0.0):
        super().__init__()
        self.a, self.b, self.calls = a, b, []

    def forward(self, x, t, task, tokens, cond=None, ref=None):
        self.calls.append(t.clone())
        assert t.shape == (x.shape[0],)
        return self.a + self.b * t[:, None, None, None] * torch.ones_like(x)


class CaptionField(nn.Module):
    """v = mean caption token id (so the empty caption gives 0) + x; records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, x, t, task, tokens, cond=None, ref=None):
        self.batch_sizes.append(x.shape[0])
        assert cond.shape[0] == ref.shape[0] == task.shape[0] == x.shape[0]
        return tokens.float().mean(1)[:, None, None, None] + x


def cond_dict():
    return dict(task=torch.zeros(B, dtype=torch.long), tokens=torch.randint(1, 9, (B, 5)),
                cond=torch.zeros(B, 4, 8, 8), ref=torch.zeros(B, 3, 8, 8))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_integrates_a_constant_field_exactly(shift):
    c = torch.randn(B, *SHAPE)
    noise = torch.randn(B, *SHAPE)
    x0 = euler(Field(c), noise, cond_dict(), steps=7, shift=shift)
    torch.testing.assert_close(x0, noise - c, atol=1e-6, rtol=0)   # integral of c over t from 1 to 0


def test_euler_on_a_field_affine_in_t():
    a, b = torch.randn(B, *SHAPE), 1.0
    noise = torch.randn(B, *SHAPE)
    n = 8   # left Riemann sum over t = 1, 1 - 1/n, ..., 1/n: integral a + b (n + 1) / (2 n); exact ODE: a + b / 2
    x0 = euler(Field(a, b), noise, cond_dict(), steps=n)
    torch.testing.assert_close(x0, noise - a - b * (n + 1) / (2 * n), atol=1e-5, rtol=0)
    x0 = euler(Field(a, b), noise, cond_dict(), steps=2000)
    torch.testing.assert_close(x0, noise - a - b / 2, atol=1e-3, rtol=0)


def test_euler_start_stop_compose():
    model, noise, cond = CaptionField(), torch.randn(B, *SHAPE), cond_dict()
    half = euler(model, noise, cond, steps=6, stop=2)
    torch.testing.assert_close(euler(model, half, cond, steps=6, start=2), euler(model, noise, cond, steps=6))


def test_rollout_states():
    torch.manual_seed(0)
    model = DiT(preset("tiny"))
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(std=0.1)   # a non-zero field whose parameters want grad
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.1)
    noise = torch.randn(2, 3, 32, 32)
    cond = dict(task=torch.zeros(2, dtype=torch.long), tokens=torch.randint(0, 256, (2, 48)))
    states, ts, x = rollout(model, noise, cond, steps=5, shift=2.0)
    assert states.shape == (5, 2, 3, 32, 32) and ts.shape == (6,) and x.shape == noise.shape
    assert torch.equal(states[0], noise)
    assert not states.requires_grad and states.grad_fn is None and x.grad_fn is None
    torch.testing.assert_close(ts, timesteps(5, 2.0))
    torch.testing.assert_close(x, euler(model, noise, cond, steps=5, shift=2.0))
    assert not torch.equal(states[1], states[0]) and not torch.equal(x, states[-1])


def test_rollout_states_are_before_each_step():
    c = torch.randn(B, *SHAPE)
    model, noise = Field(c), torch.randn(B, *SHAPE)
    states, ts, x = rollout(model, noise, cond_dict(), steps=4)
    for i in range(4):   # under a constant field the state at time t is noise - (1 - t) c
        torch.testing.assert_close(states[i], noise - (1 - ts[i]) * c)
        torch.testing.assert_close(model.calls[i], ts[i].expand(B))
    torch.testing.assert_close(x, noise - c)


def test_cfg_scale_one_is_the_conditional_velocity_and_guidance_is_one_call():
    model, x, cond = CaptionField(), torch.randn(B, *SHAPE), cond_dict()
    v_cond = model(x, torch.full((B,), 0.5), **cond)
    torch.testing.assert_close(guided_velocity(model, x, 0.5, cond, cfg_scale=1.0), v_cond)
    model.batch_sizes.clear()
    v = guided_velocity(model, x, 0.5, cond, cfg_scale=4.0)
    assert model.batch_sizes == [2 * B]                           # cond and uncond batched together
    v_uncond = x                                                   # empty caption = all pads = 0
    torch.testing.assert_close(v, v_uncond + 4.0 * (v_cond - v_uncond))


def test_timesteps_monotone_from_one_to_zero():
    for shift in (1.0, 0.5, 3.0):
        t = timesteps(10, shift)
        assert t.shape == (11,) and t[0] == 1 and t[-1] == 0 and (t[1:] < t[:-1]).all()
    torch.testing.assert_close(timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert timesteps(10, 3.0)[1] > timesteps(10)[1]                 # shift > 1 spends more steps at high noise


def test_interpolate_target_and_x0_estimate_agree():
    x0, eps, t = torch.randn(B, *SHAPE), torch.randn(B, *SHAPE), torch.rand(B)
    x_t = interpolate(x0, eps, t)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(B)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(B)), eps)
    torch.testing.assert_close(x0_from_v(x_t, t, velocity_target(x0, eps)), x0)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_the_sampler_encodes_each_caption_once_and_samples_the_same(cfg_scale):
    """euler and rollout run the text encoder once per prompt (and once on the empty caption with CFG), not once
    per step, and draw what a model that encodes at every call draws."""
    torch.manual_seed(0)
    model = DiT(preset("tiny", vocab_size=40, max_text_len=6)).eval()
    with torch.no_grad():
        for p in model.parameters():                        # a field that is not zero, and reads the caption
            p.add_(torch.randn_like(p) * 0.05)
    calls = []
    model.text_encoder.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    every_call = lambda *a, **k: model(*a, **k)             # no encode_text: encodes at every call
    noise = torch.randn(2, 3, 32, 32)
    cond = dict(task=torch.zeros(2, dtype=torch.long), tokens=torch.randint(1, 40, (2, 6)), cond=None, ref=None)
    ref = euler(every_call, noise, cond, 4, cfg_scale)
    assert len(calls) == 4                                  # once per step (both CFG halves in one call)
    calls.clear()
    torch.testing.assert_close(euler(model, noise, cond, 4, cfg_scale), ref, rtol=1e-5, atol=1e-5)
    assert calls == [2] + ([2] if cfg_scale != 1.0 else [])  # the captions, then the empty one
    calls.clear()
    torch.testing.assert_close(rollout(model, noise, cond, 4, cfg_scale)[2], ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == (2 if cfg_scale != 1.0 else 1)
