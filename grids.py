"""Diffusion Self-Distillation's paired data (stages 1-3 of self_distill.py): a text-to-image model that can draw
"two images of the same <subject>" draws grids, each grid is cropped into a (reference, target) pair, and a frozen
VLM curates the pairs from their pixels alone.

- `grid_prompts`: the prompts (data.make_batch's two-panel grids: the subject alone on the left, the caption naming
  it and the right panel's context) and each target's caption with the subject's words dropped (data.context_text);
- `draw_grids`: the grid model draws them, cached in chunks so that an interrupted stage continues;
- `consistent`: the truth the world knows (scorer.parse of both panels), for measuring the curator, never for it;
- `p_same`, `curated`: the curator's p(yes) to "are these the same object ?" and its keep decisions.
"""
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import scorer
import world
from common import save_checkpoint
from sample import euler

SAME = "are these the same object ?"


def grid_prompts(n, res, seed, text_len):
    """Stage 1: n grid prompts (the grid batch's specs say what was asked: one subject, the right panel's context)
    and each target's caption (`target_tokens`)."""
    b = data.make_batch("t2i", n, res, seed=seed, grids=True, grid_inconsistency=0.0, text_len=text_len)
    return b, target_tokens([g.panels[1] for g in b.specs], text_len, seed)


def target_tokens(scenes, text_len, seed=0):
    """The fine-tuned model's caption: the grid prompt with the subject's words replaced by "object", "two images of
    the same object at the top left , navy background": the context alone, in the grammar the grid model knows."""
    rng = np.random.default_rng([seed, 1])
    return world.tokenize([data.context_text(s, rng, "two images of the same object") for s in scenes], text_len)


def panels(canvas):
    """(B, 3, H, 2H) two-panel canvases -> (left, right), each (B, 3, H, H)."""
    return canvas[..., :canvas.shape[-2]], canvas[..., canvas.shape[-2]:]


def read_cache(path, key):
    """A stage's cache, if it exists and was made with the same `key` (the options it depends on); else None."""
    if not os.path.exists(path):
        return None
    cache = torch.load(path, map_location="cpu", weights_only=True)
    if cache["key"] != key:
        raise SystemExit(f"{path} was made with other options ({cache['key']} against {key}): move it away, or "
                         "choose another --out")
    return cache


@torch.no_grad()
def draw_grids(cfg, env, model, prompts, path, chunk=256):
    """Stage 2: the grid model draws every prompt (cached in chunks, so an interrupted stage continues). Returns
    uint8 canvases (n, 3, H, 2H), as an image file would hold them."""
    key = dict(base=cfg.base, n=cfg.n_grids, seed=cfg.seed, steps=cfg.sample_steps, cfg=cfg.grid_cfg)
    cache = read_cache(path, key) or dict(key=key, images=[])
    done, t0 = sum(len(x) for x in cache["images"]), time.time()
    for start in tqdm(range(done, cfg.n_grids, chunk), disable=cfg.quiet, desc="grids"):
        tokens = prompts.tokens[start:start + chunk].to(env.device)
        x = torch.randn(len(tokens), *prompts.target.shape[1:], generator=torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + start)).to(env.device)
        cond = dict(task=torch.zeros(len(tokens), dtype=torch.long, device=env.device), tokens=tokens)
        x = euler(model, x, cond, cfg.sample_steps, cfg.grid_cfg)
        cache["images"].append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        save_checkpoint(path, **cache)
    images = torch.cat(cache["images"]).float() / 127.5 - 1
    print(f"stage grids: {len(images)} two-panel grids ({done} cached) in {time.time() - t0:.0f} s")
    return images


def consistent(left, right):
    """The truth the world knows: does each pair show one subject, the same in both panels? (B,) bool"""
    out = []
    for a, b in zip(left, right):
        pa, pb = scorer.parse(a, subjects=True).objects, scorer.parse(b, subjects=True).objects
        out.append(len(pa) == len(pb) == 1 and pa[0].subject() == pb[0].subject())
    return torch.tensor(out)


@torch.no_grad()
def p_same(judge, left, right, batch=256):
    """Stage 3: the curator's p(yes) to "are these the same object ?" for each pair, from the pixels alone."""
    return torch.cat([judge.log_p_yes(left[i:i + batch], [SAME] * len(left[i:i + batch]), right[i:i + batch]).exp()
                      .cpu() for i in range(0, len(left), batch)])


def curated(cfg, p, noise=0.0):
    """Which pairs are kept: p(same) > threshold, each decision flipped with probability `noise`."""
    keep = p > cfg.threshold
    flip = torch.rand(len(p), generator=torch.Generator().manual_seed(cfg.seed + 7)) < noise
    return keep ^ flip


def precision_recall(keep, truth):
    tp = (keep & truth).sum().item()
    return dict(precision=tp / max(1, keep.sum().item()), recall=tp / max(1, truth.sum().item()),
                kept=keep.float().mean().item())
