"""Dual-Process controls as data: what a control asks the judge, which prompts it applies to, the visual prompt
drawn for the judge, and the exact check of it (its oracle), with the prompts' own attributes that must survive.

A control is an entry of CONTROLS, or one given on the command line (custom_control). dual_process.py trains a
LoRA per control from these pieces; nothing in it names a control.
"""
from dataclasses import dataclass

import numpy as np
import torch

import data
import scorer
import world


@dataclass
class Control:
    """A control as data. questions: what the judge is asked ({color}, {shape}: the prompt's object); prompts: the
    captions it applies to, {attribute: allowed values} of the prompt's scene; oracle: {attribute: values the
    parsed image must show}; visual: a visual prompt drawn over the image before the judge sees it (questions.overlay);
    frees: attributes the control may change besides the oracle's (left out of "caption kept")."""
    questions: tuple
    prompts: dict
    oracle: dict
    visual: tuple | None = None
    frees: tuple = ()


DARK = tuple(b for b in world.BACKGROUNDS if b not in world.LIGHT)
NOT_COOL = tuple(c for c in world.COLORS if c not in world.COOL)
CONTROLS = {
    "thick_outline": Control(("does the {color} {shape} have a thick outline ?",), dict(line=(0,)), dict(line=(2,))),
    "horizon_guide": Control(("is the horizon at the red line ?",), dict(horizon=("none",)), dict(horizon=("low",)),
                             visual=("line", world.HORIZONS["low"]), frees=("ground",)),
    "cool_palette": Control(("are all the shapes cool colors ?",), dict(color=NOT_COOL), dict(color=world.COOL)),
    "cool_strip": Control(("are the colors of the shapes in the strip ?",), dict(color=NOT_COOL),
                          dict(color=world.COOL), visual=("strip", world.COOL)),
    "night": Control(("is it night ?",), dict(sky=world.LIGHT), dict(sky=DARK), frees=("ground",)),
    "large": Control(("is the {color} {shape} large ?",), dict(size=("small",)), dict(size=("large",))),
}
SCENE_ATTRS = ("sky", "ground", "horizon")
TRAIN_PROMPTS = 4096  # the prompts a control trains on; the evaluation's are other scenes


# ----------------------------------------------------------------------------- the control's pieces
def attribute(scene, name):
    """An attribute of a one-object scene: its object's (shape, color, size, cell, line) or its own (sky, ...)."""
    if name in SCENE_ATTRS:
        return getattr(scene, name)
    return getattr(scene.objects[0], name) if len(scene.objects) == 1 else None


def control_prompts(control, n, split, seed, text_len=world.ONE_OBJECT_TOKENS, exclude=()):
    """n one-object scenes the control applies to, none of them in `exclude` (scenes), their captions and tokens
    (deterministic in seed, split). A ValueError if scenes of the kind are too rare to find."""
    rng, specs, exclude = np.random.default_rng([seed, data.SPLITS.index(split), 7]), [], set(map(repr, exclude))
    for tries in range(1000 * n + 100_000):
        s = world.sample_scene(rng, split, n_objects=1)
        if all(attribute(s, k) in v for k, v in control.prompts.items()) and repr(s) not in exclude:
            specs.append(s)
        if len(specs) == n:
            break
    else:
        raise ValueError(f"found {len(specs)} of {n} one-object scenes with {control.prompts}: check the values")
    texts = [world.caption(s, rng) for s in specs]
    return specs, texts, world.tokenize(texts, text_len)


# Questions that ask the judge to keep what the prompt says (--keep), each with the attributes it names: one is
# asked only when the control changes none of them (its oracle, its frees).
KEEP_QUESTIONS = (("is the shape at the {cell} a {shape} ?", ("shape", "cell")),
                  ("is the shape at the {cell} {color} ?", ("color", "cell")),
                  ("is the {color} {shape} at the {cell} ?", ("color", "shape", "cell")),
                  ("is the {color} {shape} {size} ?", ("color", "shape", "size")),
                  ("does the {color} {shape} have {outline} ?", ("color", "shape", "line")))


def questions_for(control, specs):
    """The control's questions for each prompt: [[question, ...] per prompt]."""
    return [[q.format(color=s.objects[0].color, shape=s.objects[0].shape) for q in control.questions] for s in specs]


def keep_questions(control, specs):
    """The questions that hold the prompt's own attributes, for each prompt: [[(question, answer), ...] per prompt];
    the horizon's is "is there a horizon ?" answered No for a prompt without one; "is it night ?" holds the sky
    light or dark (without it thick outlines came with dark skies: the sky broke in 41% of the images)."""
    changed = set(control.oracle) | set(control.frees)
    templates = [q for q, names in KEEP_QUESTIONS if not changed & set(names)]
    fill = lambda o: dict(cell=world.CELLS[o.cell], shape=o.shape, color=o.color, size=o.size,
                          outline=("no outline", "a thin outline", "a thick outline")[o.line])
    horizon = lambda s: [] if "horizon" in changed else \
        [("is there a horizon ?", False)] if s.horizon == "none" else [(f"is the horizon {s.horizon} ?", True)]
    night = lambda s: [] if "sky" in changed else [("is it night ?", s.sky in DARK)]  # the sky's light or dark
    return [[(q.format(**fill(s.objects[0])), True) for q in templates] + horizon(s) + night(s) for s in specs]


def oracle_check(control, found):
    """(B,) bool: each parsed image (scorer.parse) shows the control: every oracle attribute has an allowed value."""
    return torch.tensor([all(attribute(f, k) in v for k, v in control.oracle.items()) for f in found])


def caption_kept(control, found, specs):
    """(B,) bool: in each parsed image, every attribute of its prompt that the control does not change (oracle,
    frees) is still right, and there is exactly one object; and {attribute: fraction of images where it is wrong}
    ("objects": not exactly one object), which says what a control breaks."""
    keep = [a for a in scorer.OBJECT_ATTRS + SCENE_ATTRS if a not in control.oracle and a not in control.frees]
    one = torch.tensor([len(f.objects) == 1 for f in found])
    right = {a: torch.tensor([attribute(f, a) == attribute(s, a) for f, s in zip(found, specs)]) for a in keep}
    rate = lambda wrong: wrong.float().mean().item()
    broken = dict(objects=rate(~one), **{a: rate(~r & one) for a, r in right.items()})
    return one & torch.stack(list(right.values())).all(0), broken


VALUES = dict(shape=world.SHAPES, color=tuple(world.COLORS), size=tuple(world.SIZES), cell=tuple(range(9)),
              line=world.LINES, sky=tuple(world.BACKGROUNDS), ground=tuple(world.BACKGROUNDS),
              horizon=tuple(world.HORIZONS))  # what each attribute of a scene can be


def custom_control(cfg):
    """The control given by --questions, --oracle, --prompts, --frees and --visual; a ValueError if bad."""
    def parse(text, what):                                                         # ATTR=V1,V2;ATTR=...
        out = {}
        for item in filter(None, text.split(";")):
            key, eq, values = item.partition("=")
            if key not in VALUES or not eq or not values:
                raise ValueError(f"--{what} item {item!r} must be ATTR=V1,V2 with ATTR one of {', '.join(VALUES)}")
            kind = type(VALUES[key][0])
            bad = [v for v in values.split(",") if v not in map(str, VALUES[key])]
            if bad:
                raise ValueError(f"--{what}: {key} cannot be {bad[0]!r} (one of {', '.join(map(str, VALUES[key]))})")
            out[key] = tuple(kind(v) for v in values.split(","))
        return out
    if not cfg.questions or not cfg.oracle:
        raise ValueError("--controls=custom needs --questions=... and --oracle=ATTR=V1,V2")
    frees = tuple(filter(None, cfg.frees.split(",")))
    if set(frees) - set(VALUES):
        raise ValueError(f"--frees: unknown attribute {sorted(set(frees) - set(VALUES))[0]!r}")
    visual = None
    if cfg.visual:                                                                 # line=ROW | strip=C1,C2,C3
        kind, _, value = cfg.visual.partition("=")
        if kind == "line" and value in ("high", "middle", "low"):
            visual = ("line", world.HORIZONS[value])
        elif kind == "strip" and value and all(c in world.COLORS for c in value.split(",")):
            visual = ("strip", tuple(value.split(",")))
        else:
            raise ValueError(f"--visual={cfg.visual!r} must be line=high|middle|low or strip=COLOR,COLOR,...")
    return Control(tuple(cfg.questions.split("|")), parse(cfg.prompts, "prompts"), parse(cfg.oracle, "oracle"),
                   visual, frees)
