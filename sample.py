"""The flow ODE shared by every script, and the CLI that writes PNG grids from any checkpoint.

    python sample.py --ckpt=out/base/ckpt.pt --prompt="a large red circle in the center on a white background"
    python sample.py --ckpt=out/local_edit/ckpt.pt --task=local_edit --image=src.png --prompt="make the red circle blue"
    python sample.py --ckpt=out/inpaint/ckpt.pt --task=inpaint --image=img.png --mask=hole.png --prompt="..."


Rectified flow / flow matching (Liu et al. 2022, "Flow Straight and Fast"; Lipman et al. 2023), in the one time
convention of this project (METHODS.md): t=0 is data, t=1 is noise,

    x_t = (1 - t) x0 + t eps,    v = eps - x0,    x0_hat = x_t - t v,

and sampling integrates dx/dt = v from t=1 to t=0 with Euler steps x <- x + (t_next - t) v (Liu et al. 2022,
section 2.1: the straight paths make a coarse Euler discretisation accurate). Time steps are uniform in t,
optionally warped by the SD3 shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, "Scaling Rectified Flow
Transformers", section 5.3.2), which spends more steps at high noise for s > 1. Classifier-free guidance
(Ho & Salimans 2022) is text-only here: the unconditional call keeps task, pixel-aligned condition and reference
and replaces the caption by all pads.

`cond` is always a dict of model keyword arguments: dict(task=(B,) long, tokens=(B, L) long,
cond=(B, 4, H, W) or None, ref=(B, 3, H, W) or None).
"""
import os
from dataclasses import dataclass

import torch

import data
import world
from common import check_config, load_model, model_inputs, option, parse_config, wants_cuda


def interpolate(x0, eps, t):
    """x_t = (1 - t) x0 + t eps for t (B,) or a scalar."""
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).reshape(-1, *[1] * (x0.ndim - 1))
    return (1 - t) * x0 + t * eps


def velocity_target(x0, eps):
    """The flow-matching regression target: d x_t / dt = eps - x0."""
    return eps - x0


def x0_from_v(x_t, t, v):
    """One-step estimate of the clean image from any state: x0_hat = x_t - t v."""
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1, *[1] * (x_t.ndim - 1))
    return x_t - t * v


def timesteps(n, shift=1.0, device=None):
    """(n + 1,) times from 1 to 0, uniform then warped by the SD3 shift t' = s t / (1 + (s - 1) t)."""
    t = torch.linspace(1.0, 0.0, n + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)


def guided_velocity(model, x, t, cond: dict, cfg_scale=1.0, empty_tokens=None):
    """v_uncond + cfg_scale (v_cond - v_uncond), with both halves in one batched model call.

    t: (B,) or a scalar. empty_tokens: the caption of the unconditional half, default all pads (zeros).
    cond may carry the captions' features, text and empty_text (with_text), computed once per prompt."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
    cond, empty_text = {k: v for k, v in cond.items() if k != "empty_text"}, cond.get("empty_text")
    if cfg_scale == 1.0:
        return model(x, t, **cond)
    uncond = dict(cond, tokens=torch.zeros_like(cond["tokens"]) if empty_tokens is None else empty_tokens)
    if "text" in cond:
        uncond["text"] = empty_text
    both = {k: None if v is None else torch.cat([v, uncond[k]]) for k, v in cond.items()}
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def with_text(model, cond: dict, cfg_scale=1.0):
    """cond plus the captions' features, for a whole sampler: the text encoder runs once per prompt, not once per
    step (and, with CFG, once on the empty caption). A model without encode_text (a wrapper, a list of
    fields) gets cond unchanged and encodes at every call."""
    encode = getattr(model, "encode_text", None)
    if encode is None or "text" in cond:
        return cond
    out = dict(cond, text=encode(cond["tokens"]))
    if cfg_scale != 1.0:
        out["empty_text"] = encode(torch.zeros_like(cond["tokens"]))
    return out


@torch.no_grad()
def euler(model, noise, cond: dict, steps, cfg_scale=1.0, shift=1.0, start=0, stop=None):
    """Deterministic Euler sampling of the flow ODE from t=1 (noise) to t=0; returns x0 (B, 3, H, W).

    start / stop run only steps start..stop-1 of the `steps`-step grid: `noise` is then the state at
    timesteps(steps)[start] and the result the state at timesteps(steps)[stop] (partial denoising, as
    Dual-Process and ByteEdit need). No gradient: callers take their one grad step with guided_velocity."""
    ts = timesteps(steps, shift, noise.device)
    x, cond = noise, with_text(model, cond, cfg_scale)
    for i in range(start, steps if stop is None else stop):
        v = guided_velocity(model, x, ts[i], cond, cfg_scale)
        x = x + (ts[i + 1] - ts[i]) * v                      # Euler step, Liu et al. 2022
    return x


@torch.no_grad()
def rollout(model, noise, cond: dict, steps, cfg_scale=1.0, shift=1.0):
    """Euler sampling that keeps its trajectory, for on-policy methods (DanceOPD step 3).

    Returns states (steps, B, ...) with states[i] the state at ts[i] BEFORE step i (states[0] = noise),
    ts (steps + 1,), and the final state x0 (B, ...). Everything is detached. `model` may also be a list of
    `steps` models, model[i] taking step i (a roll-in that mixes two fields)."""
    ts = timesteps(steps, shift, noise.device)
    x, states, cond = noise, [], with_text(model, cond, cfg_scale)
    for i in range(steps):
        states.append(x)
        v = guided_velocity(model[i] if isinstance(model, list) else model, x, ts[i], cond, cfg_scale)
        x = x + (ts[i + 1] - ts[i]) * v
    return torch.stack(states), ts, x


@dataclass
class Config:
    ckpt: str = option("", path="file", required=True)  # checkpoint (any script's; its model config is stored in it)
    task: str = option("t2i", choices=data.TASKS)  # t2i | local_edit | global_edit | inpaint | outpaint | customize
    prompt: str = option("", required=True)  # caption or instruction, in the world's vocabulary (world.VOCAB)
    image: str = option("", path="image")  # source image (edits), image to fill (inpaint/outpaint) or reference
    mask: str = option("", path="image")  # inpaint/outpaint: white = pixels to generate
    steps: int = option(16, low=1)  # Euler steps
    cfg_scale: float = 1.0         # classifier-free guidance on the text
    shift: float = option(1.0, above=0)  # SD3 timestep shift
    n: int = option(4, low=1)      # samples (one row)
    seed: int = option(0, low=0)   # noise seed
    out: str = option("samples.png", path="outfile", suffix=(".png", ".jpg", ".jpeg"), required=True)  # PNG:
                                   # [condition |] n samples
    device: str = option("auto", choices=("auto", "cpu", "cuda"), device=True)  # auto | cpu | cuda

    def check(self):
        need = {"t2i": (), "inpaint": ("image", "mask"), "outpaint": ("image", "mask")}.get(self.task, ("image",))
        missing = [k for k in need if not getattr(self, k)]
        yield f"--task={self.task} needs --{missing[0]}=PATH" if missing else ""
        extra = [k for k in ("image", "mask") if getattr(self, k) and k not in need]
        yield f"--task={self.task} takes no --{extra[0]}" if extra else ""
        try:
            world.tokenize([self.prompt])
        except ValueError as e:
            yield f"--prompt: {e}"


def condition(cfg, res, device, text_len=world.MAX_TOKENS):
    """The model inputs of the CLI's request, built by data.collate exactly as a training batch of the task is: the
    edit source as the pixel-aligned condition, the image to fill masked by --mask beside the mask, the customisation
    reference as tokens. Returns (model inputs for cfg.n samples, the condition image or None)."""
    image = world.load_image(cfg.image, res) if cfg.image else None
    example = dict(task=cfg.task, text=cfg.prompt, target=torch.zeros(3, res, res))
    if cfg.task in ("inpaint", "outpaint"):
        example.update(target=image, mask=world.load_image(cfg.mask, res, mask=True))
    elif image is not None:
        example["source_image"] = image
    return model_inputs(data.collate([example] * cfg.n, device, text_len)), image


def main(cfg):
    check_config(cfg)
    device = "cuda" if wants_cuda(cfg.device) else "cpu"
    model, ckpt = load_model(cfg.ckpt, device)
    if cfg.task not in ckpt.get("tasks", []):
        raise SystemExit(f"{cfg.ckpt} was trained for {', '.join(ckpt.get('tasks', []))}, not {cfg.task}")
    res = model.config.image_size
    try:
        inputs, image = condition(cfg, res, device, model.config.max_text_len)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    noise = torch.randn(cfg.n, 3, res, res, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    x = euler(model, noise, inputs, cfg.steps, cfg.cfg_scale, cfg.shift).clamp(-1, 1)
    row = ([image.to(device)] if image is not None else []) + list(x)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    world.to_pil(torch.cat(row, 2)).save(cfg.out)
    print(f"wrote {cfg.out}: {'condition, ' if image is not None else ''}{cfg.n} samples of {cfg.task}")


if __name__ == "__main__":
    main(parse_config(Config()))
