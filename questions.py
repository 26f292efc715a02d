"""The world's yes/no questions with exact answers, the judge's training and test data, and the visual prompts
drawn over images (Dual-Process's controls).

`vqa_batch(family, n, res)` renders n scenes and asks one question family about them (FAMILIES), balanced yes/no;
`overlay` draws a guide line or a colour strip over images, differentiably in the images.
"""
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from data import SPLITS, perturb_subject
from world import (CELLS, COLORS, COOL, HORIZONS, LIGHT, LINES, SHAPES, WARM, Scene, render, sample_background,
                   sample_object, sample_scene)

FAMILIES = ("color", "shape", "count", "position", "horizon", "line", "palette", "size", "same",
            "guide", "strip", "night", "large")  # the last four: the Dual-Process controls' questions
QUESTION_WORDS = ("line", "strip", "night")  # words of the judge's questions that no caption uses


@dataclass
class VQA:
    family: str
    images: torch.Tensor  # (B, 3, H, W)
    questions: list
    answers: torch.Tensor  # (B,) bool, exactly half True
    images2: torch.Tensor | None = None  # (B, 3, H, W): the second image of two-image questions
    specs: list = field(default_factory=list)
    prompts: list = field(default_factory=list)  # the visual prompt drawn over each image (`overlay`), or None


def _question(family, rng, yes, split):
    """One (scene, question[, second scene[, visual prompt]]) whose true answer is `yes`."""
    while True:
        s = sample_scene(rng, split)
        o = s.objects[rng.integers(len(s.objects))]
        other = lambda options, v: [x for x in options if x != v][rng.integers(len(options) - 1)]
        if family == "color":
            return s, f"is the shape at the {CELLS[o.cell]} {o.color if yes else other(list(COLORS), o.color)} ?"
        if family == "shape":
            return s, f"is the shape at the {CELLS[o.cell]} a {o.shape if yes else other(SHAPES, o.shape)} ?"
        if family == "count":
            n = len(s.objects) if yes else other((1, 2, 3), len(s.objects))
            return s, f"are there {('one', 'two', 'three')[n - 1]} shape{'s' if n > 1 else ''} ?"
        if family == "position":
            return s, f"is the {o.color} {o.shape} at the {CELLS[o.cell if yes else other(range(9), o.cell)]} ?"
        if family == "horizon":
            if rng.random() < 0.3:
                return s, "is there a horizon ?" if yes == (s.horizon != "none") else None
            if s.horizon != "none":
                return s, f"is the horizon {s.horizon if yes else other(('high', 'middle', 'low'), s.horizon)} ?"
        if family == "line":
            weight = o.line if yes else other(LINES, o.line)
            desc = ("no outline", "a thin outline", "a thick outline")[weight]
            return s, f"does the {o.color} {o.shape} have {desc} ?"
        if family == "palette":
            kind, members = (("warm", WARM), ("cool", COOL))[rng.integers(2)]
            if all(x.color in members for x in s.objects) == yes:
                return s, f"are all the shapes {kind} colors ?"
        if family == "size" and len({x.size for x in s.objects}) == 2:
            a, b = [x for x in s.objects if x.size == "large"][0], [x for x in s.objects if x.size == "small"][0]
            a, b = (a, b) if rng.random() < 0.5 else (b, a)
            word = "bigger" if (a.size == "large") == yes else "smaller"
            return s, f"is the {a.color} {a.shape} {word} than the {b.color} {b.shape} ?"
        if family == "same":
            subj = sample_object(rng, [], split, cell=4, subject=True)
            ref = Scene([subj], **sample_background(rng, horizon_p=0))
            o2 = subj if yes else perturb_subject(rng, subj, split)
            return ref, "are these the same object ?", Scene([replace(o2, cell=int(rng.integers(9)))],
                                                             **sample_background(rng))
        if family == "guide" and (s.horizon != "none" or not yes):  # a red line drawn at one horizon row
            rows = [r for r in ("high", "middle", "low") if r != s.horizon]
            row = s.horizon if yes else rows[rng.integers(len(rows))]
            return s, "is the horizon at the red line ?", None, ("line", HORIZONS[row])
        if family == "strip":  # a strip of three colours along the bottom edge
            colours = {x.color for x in s.objects}
            if yes:
                strip = list(colours) + list(rng.permutation([c for c in COLORS if c not in colours]))
            else:
                missing = o.color
                strip = list(rng.permutation([c for c in COLORS if c != missing]))
            strip = [str(c) for c in strip[:3]]
            strip = tuple(map(str, rng.permutation(strip)))
            return s, "are the colors of the shapes in the strip ?", None, ("strip", strip)
        if family == "night" and (s.sky not in LIGHT) == yes:  # an inference: night means a dark sky
            return s, "is it night ?"
        if family == "large":
            return s, f"is the {o.color} {o.shape} {'large' if (o.size == 'large') == yes else 'small'} ?"


def vqa_batch(family, n, res, device="cpu", seed=0, split="train"):
    """Yes/no questions of one family with exact answers, balanced: the first half yes, the rest no (shuffled)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown question family {family!r}: one of {FAMILIES}")
    rng = np.random.default_rng([seed, SPLITS.index(split), 100 + FAMILIES.index(family)])
    answers = rng.permutation(np.arange(n) < n // 2 + (n % 2) * int(rng.integers(2)))
    items = []
    for yes in answers:
        item = None
        while item is None or item[1] is None:
            item = _question(family, rng, bool(yes), split)
        items.append(item)
    prompts = [it[3] if len(it) > 3 else None for it in items]
    images = render([it[0] for it in items], res, device)
    images = torch.stack([overlay(x[None], p)[0] for x, p in zip(images, prompts)])
    out = VQA(family, images, [it[1] for it in items], torch.tensor(answers, device=device),
              specs=[it[0] for it in items], prompts=prompts)
    if family == "same":
        out.images2 = render([it[2] for it in items], res, device)
    return out


def overlay(images, prompt):
    """Draw a visual prompt over images (B, 3, H, W) in [-1, 1], differentiably in the images (Dual-Process's
    visual prompts): the pixels under the prompt are replaced, the others pass through unchanged.
    prompt: ("line", h) a red horizontal guide line, 2 px at 32 px, centred h (a fraction of the height, as in
    HORIZONS) from the top; ("strip", colours) blocks of the named colours side by side along the bottom edge,
    3 px tall at 32 px; None: the images as they are."""
    if prompt is None:
        return images
    kind, value = prompt
    H, W = images.shape[-2:]
    mask = torch.zeros(1, 1, H, W, device=images.device)
    paint = torch.zeros(1, 3, H, W, device=images.device)
    if kind == "line":
        row, half = round(value * H), max(1, H // 32)
        mask[..., row - half:row + half, :] = 1
        paint[:, 0], paint[:, 1:] = 1.0, -1.0                                       # red in [-1, 1]
    elif kind == "strip":
        top = H - max(2, round(3 * H / 32))
        mask[..., top:, :] = 1
        for i, name in enumerate(value):
            lo, hi = i * W // len(value), (i + 1) * W // len(value)
            paint[..., lo:hi] = torch.tensor(COLORS[name], device=images.device)[:, None, None] * 2 - 1
    else:
        raise ValueError(f"unknown visual prompt {kind!r} (line, strip)")
    return images * (1 - mask) + paint * mask
