"""The tasks of the synthetic world: condition -> target batches, and your own data (the judge's yes/no
questions: questions.py).

world.py holds the world itself (scene specs, renderer, captions); this file turns random scenes into training
and test examples with exact specs, so that scorer.py can measure every generated image.

Tasks (each a batch of condition -> target with its spec, see `make_batch`):
  t2i          caption -> image; or (grids=True) "two images of the same <subject> at <context>": a two-panel
               canvas whose right panel deviates from the subject with probability `grid_inconsistency`
  local_edit   source + instruction -> target (recolour / remove / add / move one object)
  global_edit  source + instruction -> target (background, sky, ground, swap two colours, hue shift,
               invert, grayscale, darken, mirror)
  inpaint      masked image + caption -> image (box and brush holes)
  outpaint     masked image + caption -> image (border holes)
  customize    reference subject + caption of a new context -> image (Diffusion Self-Distillation)

Image convention everywhere: float tensors in [-1, 1], (B, 3, H, W); masks (B, 1, H, W) in {0, 1}.
`python data.py` writes a PNG preview of every task and measures data throughput (results/world/).
"""
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from world import (BACKGROUNDS, CELLS, CENTERS, COLORS, LIGHT, MAX_TOKENS, PATTERNS, SHAPES, SIZES, Grid, Scene,
                   allowed, caption, degrade, describe, describe_background, free_cells, load_image, luma, pick, render,
                   sample_background, sample_object, sample_scene, to_pil, tokenize)

TASKS = ("t2i", "local_edit", "global_edit", "inpaint", "outpaint", "customize")


@dataclass
class Batch:
    task: str
    text: list  # captions / instructions
    tokens: torch.Tensor  # (B, text_len) long, 0-padded
    target: torch.Tensor  # (B, 3, H, W)
    cond: torch.Tensor | None = None  # (B, 4, H, W): pixel-aligned [source or masked image | mask]
    ref: torch.Tensor | None = None  # (B, 3, H, W): customisation reference (not pixel-aligned)
    mask: torch.Tensor | None = None  # (B, 1, H, W): what changed / what to fill
    specs: list = field(default_factory=list)  # target specs
    sources: list = field(default_factory=list)  # source specs (edits, customize reference)


# ----------------------------------------------------------------------------- task pairs
def _ref(o):
    return f"the {o.color} {o.shape}"


def _valid(scene, split):
    pairs = [(o.color, o.shape) for o in scene.objects]
    return len(set(pairs)) == len(pairs) and (split == "heldout" or all(allowed(c, s, split) for c, s in pairs))


def local_edit(rng, split):
    """Recolour, remove, add or move one object. Returns (instruction, source, target)."""
    while True:
        src = sample_scene(rng, split)
        i = int(rng.integers(len(src.objects)))
        o, rest = src.objects[i], src.objects[:i] + src.objects[i + 1:]
        kind = ("recolor", "remove", "add", "move")[rng.integers(4)]
        if kind == "recolor":
            new = list(c for c in COLORS if c != o.color)[rng.integers(7)]
            tgt = replace(src, objects=rest[:i] + [replace(o, color=new)] + rest[i:])
            text = pick(rng, (f"make {_ref(o)} {new}", f"turn {_ref(o)} {new}", f"change {_ref(o)} to {new}",
                               f"recolor {_ref(o)} {new}"))
        elif kind == "remove" and rest:
            tgt, text = replace(src, objects=rest), pick(rng, (f"remove {_ref(o)}", f"delete {_ref(o)}",
                                                                f"take away {_ref(o)}"))
        elif kind == "add" and free_cells(src.objects):
            new = sample_object(rng, src.objects, "train" if split == "heldout" else split)
            tgt, text = replace(src, objects=src.objects + [new]), f"{pick(rng, ('add', 'put'))} {describe(new, rng)}"
        elif kind == "move" and [c for c in free_cells(src.objects, exclude=o) if c != o.cell]:
            cell = int(rng.choice([c for c in free_cells(src.objects, exclude=o) if c != o.cell]))
            tgt = replace(src, objects=rest[:i] + [replace(o, cell=cell)] + rest[i:])
            text = f"move {_ref(o)} to the {CELLS[cell]}"
        else:
            continue
        if _valid(tgt, split):
            return text, src, tgt


def _shift(color, steps):
    return list(COLORS)[(list(COLORS).index(color) + steps) % 8]


INVERT_BG = {"white": "black", "silver": "gray", "sand": "navy", "black": "white", "gray": "silver", "navy": "sand"}


def global_edit(rng, split):
    """An edit of the whole image. Returns (instruction, source, target)."""
    while True:
        src = sample_scene(rng, split)
        kind = ("background", "swap", "hue", "invert", "grayscale", "darken", "mirror")[rng.integers(7)]
        objs = src.objects
        if kind == "background" and src.horizon == "none":
            new = [b for b in BACKGROUNDS if b != src.sky][rng.integers(5)]
            tgt = replace(src, sky=new, ground=new)
            text = pick(rng, (f"make the background {new}", f"change the background to {new}"))
        elif kind == "background":  # with a horizon: recolour the sky or the ground within the same light/dark class
            part = ("sky", "ground")[rng.integers(2)]
            klass = LIGHT if src.sky in LIGHT else tuple(b for b in BACKGROUNDS if b not in LIGHT)
            new = [b for b in klass if b not in (src.sky, src.ground)][0]
            tgt = replace(src, **{part: new})
            text = pick(rng, (f"make the {part} {new}", f"change the {part} to {new}"))
        elif kind == "swap":
            a = objs[rng.integers(len(objs))].color
            b = [c for c in COLORS if c != a][rng.integers(7)]
            swap = {a: b, b: a}
            tgt = replace(src, objects=[replace(o, color=swap.get(o.color, o.color)) for o in objs])
            text = pick(rng, (f"swap {a} and {b}", f"exchange {a} and {b}"))
        elif kind == "hue":
            tgt = replace(src, objects=[replace(o, color=_shift(o.color, 2)) for o in objs])
            text = pick(rng, ("shift the hues", "rotate the colors"))
        elif kind == "invert":
            tgt = replace(src, objects=[replace(o, color=_shift(o.color, 4)) for o in objs],
                          sky=INVERT_BG[src.sky], ground=INVERT_BG[src.ground])
            text = pick(rng, ("invert the colors", "invert the image"))
        elif kind == "grayscale":
            # only scenes whose objects stay visible in gray (luma contrast with sky and ground)
            if any(o.line or abs(luma(o.color) - luma(bg)) < 0.15 for o in objs for bg in (src.sky, src.ground)):
                continue  # outlines, or an object that would vanish into the background in gray
            tgt = replace(src, tone="gray")
            text = pick(rng, ("make it grayscale", "make the image black and white"))
        elif kind == "darken":
            tgt, text = replace(src, tone="dark"), pick(rng, ("darken the image", "make it darker"))
        else:
            if all(o.cell % 3 == 1 for o in objs):
                continue  # mirroring would change nothing
            tgt = replace(src, objects=[replace(o, cell=o.cell // 3 * 3 + 2 - o.cell % 3) for o in objs])
            text = pick(rng, ("mirror the image", "flip the image horizontally"))
        if _valid(tgt, split):
            return text, src, tgt


EDIT_KINDS = {"local_edit": ("recolor", "remove", "add", "move"),
              "global_edit": ("background", "swap", "hue", "invert", "grayscale", "darken", "mirror")}
# The words that name each kind in the instructions above; anything else is a recolour (local) or a background
# edit (global). Grayscale's "black and white" is matched on "and": "white" is also a background colour.
_KIND_WORDS = {"local_edit": {"remove": "remove", "delete": "remove", "take": "remove", "add": "add", "put": "add",
                              "move": "move"},
               "global_edit": {"swap": "swap", "exchange": "swap", "hues": "hue", "rotate": "hue", "invert": "invert",
                               "grayscale": "grayscale", "and": "grayscale", "darken": "darken", "darker": "darken",
                               "mirror": "mirror", "flip": "mirror"}}


def edit_kind(task, text):
    """The kind of a local or global edit (EDIT_KINDS), read back from the words of its instruction."""
    words = text.split()
    first = words[0] if task == "local_edit" else next((w for w in words if w in _KIND_WORDS[task]), None)
    return _KIND_WORDS[task].get(first, "recolor" if task == "local_edit" else "background")


def _disc(res, cx, cy, r):
    y = (np.arange(res) + 0.5) / res
    return ((y[None, :] - cx) ** 2 + (y[:, None] - cy) ** 2 <= r * r).astype(np.float32)


def inpaint_mask(rng, scene, res):
    """A box or brush hole over one of the objects (so the hole has content to restore)."""
    o = scene.objects[rng.integers(len(scene.objects))]
    cx, cy, r = CENTERS[o.cell % 3], CENTERS[o.cell // 3], SIZES[o.size]
    if rng.random() < 0.5:  # box around the object with random margins
        x0, y0 = cx - r - rng.uniform(.02, .1), cy - r - rng.uniform(.02, .1)
        x1, y1 = cx + r + rng.uniform(.02, .1), cy + r + rng.uniform(.02, .1)
        y = (np.arange(res) + 0.5) / res
        return ((y[None, :] >= x0) & (y[None, :] <= x1) & (y[:, None] >= y0) & (y[:, None] <= y1)).astype(np.float32)
    m = np.zeros((res, res), np.float32)  # brush: a random walk of discs starting on the object
    for _ in range(int(rng.integers(4, 8))):
        m = np.maximum(m, _disc(res, cx, cy, rng.uniform(.1, .16)))
        cx, cy = np.clip(cx + rng.uniform(-.12, .12), 0, 1), np.clip(cy + rng.uniform(-.12, .12), 0, 1)
    return m


def outpaint_mask(rng, res):
    """A border hole: one side, or the ring outside a central square."""
    y = (np.arange(res) + 0.5) / res
    X, Y, a = y[None, :].repeat(res, 0), y[:, None].repeat(res, 1), rng.uniform(.3, .45)
    side = rng.integers(5)
    m = [X < a, X > 1 - a, Y < a, Y > 1 - a, np.maximum(abs(X - .5), abs(Y - .5)) > a / 1.5][side]
    return m.astype(np.float32)


def customize(rng, split):
    """Reference: a subject alone on a plain background; target: the same subject in a new context."""
    subj = sample_object(rng, [], split, cell=4, subject=True)
    ref = Scene([subj], **sample_background(rng, horizon_p=0))
    while True:
        tgt = Scene([replace(subj, cell=int(rng.integers(9)))], **sample_background(rng))
        if tgt.objects[0].cell != 4 or tgt.sky != ref.sky or tgt.horizon != "none":
            break
    return context_text(tgt, rng), ref, tgt


def context_text(scene, rng, lead="this object"):
    """A customisation caption: where the subject goes and the background, never what it looks like."""
    return f"{lead} {pick(rng, ('in', 'at'))} the {CELLS[scene.objects[0].cell]} {describe_background(scene, rng)}"


def perturb_subject(rng, o, split="train"):
    """The same subject with one identity attribute changed (an inconsistent grid panel)."""
    while True:
        what = ("shape", "color", "color2", "pattern")[rng.integers(4)]
        if what == "shape":
            new = replace(o, shape=[s for s in SHAPES if s != o.shape][rng.integers(3)])
        elif what == "pattern":
            new = replace(o, pattern=[p for p in PATTERNS if p != o.pattern][rng.integers(2)])
        else:
            new = replace(o, **{what: [c for c in COLORS if c not in (o.color, o.color2)][rng.integers(6)]})
        if allowed(new.color, new.shape, "train" if split == "heldout" else split):
            return new


def grid(rng, split, inconsistency):
    """Two images of one subject: on the left alone at the centre of a plain background (as a customisation
    reference is), on the right in a random context; the right one shows another subject with probability
    `inconsistency` (one identity attribute changed), as a generator's grids are imperfect."""
    subj = sample_object(rng, [], split, cell=4, subject=True)
    right = perturb_subject(rng, subj, split) if rng.random() < inconsistency else subj
    return Grid([Scene([subj], **sample_background(rng, horizon_p=0)),
                 Scene([replace(right, cell=int(rng.integers(9)))], **sample_background(rng))])


SPLITS = ("train", "test", "heldout")
# Edit targets as a pipeline makes them (a world option, docs/danceopd.md): real edit datasets are generated, so
# their targets are softer, noisier and slightly misregistered than the photos T2I data is made of. Keyword
# arguments of world.degrade; sources, masks and every test split stay clean renders.
EDIT_DATA = {"clean": None, "pipeline": dict(sigma=0.7, noise=0.03, shift=1)}


def make_batch(task, n, res, device="cpu", seed=0, split="train", grids=False, grid_inconsistency=0.25,
               n_objects=None, text_len=MAX_TOKENS, edit_data="clean"):
    """One batch of `task`, deterministic in (seed, split, task), built straight into tensors on `device`.
    grids: a t2i batch of two-panel subject grids (targets (n, 3, res, 2 res), captions "two images of the same").
    n_objects fixes the object count of t2i / inpaint / outpaint scenes (default: 1-3); text_len is the width of
    batch.tokens: the model's DiTConfig.max_text_len, so that a caption too long for it fails here, on the host.
    edit_data: a key of EDIT_DATA, how local and global edit targets are made (masks come from the clean ones)."""
    if task not in TASKS or split not in SPLITS or edit_data not in EDIT_DATA:
        raise ValueError(f"unknown task {task!r}, split {split!r} or edit_data {edit_data!r}: tasks are {TASKS}, "
                         f"splits {SPLITS}, edit data {tuple(EDIT_DATA)}")
    if edit_data != "clean" and split != "train":
        raise ValueError(f"edit_data={edit_data!r} is a property of training data; the {split} split is scored "
                         "against clean renders")
    rng = np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task)])
    texts, sources, targets, masks = [], [], [], []
    for _ in range(n):
        src = mask = None
        if task == "t2i":
            tgt = grid(rng, split, grid_inconsistency) if grids else sample_scene(rng, split, n_objects)
            text = caption(tgt, rng)
        elif task == "local_edit":
            text, src, tgt = local_edit(rng, split)
        elif task == "global_edit":
            text, src, tgt = global_edit(rng, split)
        elif task == "customize":
            text, src, tgt = customize(rng, split)
        else:
            tgt = sample_scene(rng, split, n_objects)
            text = caption(tgt, rng)
            mask = inpaint_mask(rng, tgt, res) if task == "inpaint" else outpaint_mask(rng, res)
        texts.append(text), sources.append(src), targets.append(tgt), masks.append(mask)
    target = render(targets, res, device)
    batch = Batch(task, texts, tokenize(texts, text_len).to(device), target, specs=targets, sources=sources)
    if task in ("local_edit", "global_edit"):
        source = render(sources, res, device)
        batch.cond = torch.cat([source, torch.zeros_like(source[:, :1])], 1)
        if task == "local_edit":  # exactly the pixels the edit changed
            batch.mask = ((source - target).abs().amax(1, keepdim=True) > 0).float()
        if EDIT_DATA[edit_data]:
            gen = torch.Generator().manual_seed(seed * 7)  # train split only: a stream of its own per seed
            batch.target = degrade(target, **EDIT_DATA[edit_data], generator=gen)
    elif task in ("inpaint", "outpaint"):
        batch.mask = torch.from_numpy(np.stack(masks)[:, None]).to(device)
        batch.cond = torch.cat([target * (1 - batch.mask), batch.mask], 1)
    elif task == "customize":
        batch.ref = render(sources, res, device)
    return batch


# ----------------------------------------------------------------------------- your own data: manifests
MANIFEST_COLUMNS = ("task", "prompt", "source_image", "target_image", "mask")
NEEDS = {"t2i": (), "local_edit": ("source_image",), "global_edit": ("source_image",), "inpaint": ("mask",),
         "outpaint": ("mask",), "customize": ("source_image",)}  # customize: source_image is the reference


def load_manifest(path, res, text_len=MAX_TOKENS):
    """Read a JSONL or CSV manifest of your own pairs (paths relative to the manifest) into validated examples.

    Each row: task, prompt, target_image, and source_image / mask where the task needs them; every value a string.
    Every bad row is reported, as "<manifest>:<line>: <problem>" (the line of the file, a CSV header being line 1),
    in one ValueError. Returns a list of dicts with 'task', 'text' and tensors (`collate` makes them a Batch)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such manifest file")
    if not path.endswith((".jsonl", ".csv")):
        raise ValueError(f"{path}: a manifest is a .jsonl or a .csv file")
    rows, errors = [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.endswith(".csv"):  # numbered by the file's line, the header being line 1
                reader = csv.DictReader(f)
                rows = [(reader.line_num, {k: v for k, v in r.items() if v}) for r in reader]
            for i, line in enumerate(f if path.endswith(".jsonl") else (), 1):
                try:
                    rows.append((i, json.loads(line) if line.strip() else {}))
                except json.JSONDecodeError as e:
                    errors.append((i, f"not a JSON object ({e.msg}, column {e.colno})"))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a text manifest ({type(e).__name__}: {e})") from None
    root, examples = os.path.dirname(path), []
    for i, row in rows:
        try:
            examples.append(_example(row, root, res, text_len))
        except ValueError as e:
            errors.append((i, str(e)))
    if errors:
        raise ValueError(f"{len(errors)} bad row(s) in {path}:\n  " + "\n  ".join(f"{path}:{i}: {e}"
                                                                                 for i, e in sorted(errors)))
    if not examples:
        raise ValueError(f"{path}: no rows")
    return examples


def _example(row, root, res, text_len):
    """One manifest row -> an example dict; a ValueError naming the problem otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object with the columns {', '.join(MANIFEST_COLUMNS)}")
    if not row:
        raise ValueError("empty row")
    if None in row:
        raise ValueError("more fields than the header has (quote prompts that contain commas)")
    unknown = set(row) - set(MANIFEST_COLUMNS)
    if unknown:
        raise ValueError(f"unknown column {sorted(unknown)[0]!r} (columns: {', '.join(MANIFEST_COLUMNS)})")
    wrong = [k for k, v in row.items() if not isinstance(v, str)]
    if wrong:
        raise ValueError(f"{wrong[0]} must be a string, not {type(row[wrong[0]]).__name__}")
    task = row.get("task")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    missing = [c for c in ("prompt", "target_image") + NEEDS[task] if not row.get(c)]
    if missing:
        raise ValueError(f"missing {missing[0]} for task {task}")
    tokenize([row["prompt"]], text_len)
    ex = dict(task=task, text=row["prompt"], target=load_image(os.path.join(root, row["target_image"]), res))
    for col in ("source_image", "mask"):
        if row.get(col):
            ex[col] = load_image(os.path.join(root, row[col]), res, mask=col == "mask")
    return ex


def collate(examples, device="cpu", text_len=MAX_TOKENS):
    """Manifest examples of one task -> a Batch shaped exactly like make_batch's."""
    task = examples[0]["task"]
    if any(e["task"] != task for e in examples):
        raise ValueError("a batch holds one task; group manifest rows by task first")
    st = lambda key: torch.stack([e[key] for e in examples]).to(device)
    b = Batch(task, [e["text"] for e in examples], tokenize([e["text"] for e in examples], text_len).to(device),
              st("target"), specs=[None] * len(examples), sources=[None] * len(examples))
    if task in ("local_edit", "global_edit"):
        b.cond = torch.cat([st("source_image"), torch.zeros_like(b.target[:, :1])], 1)
    elif task in ("inpaint", "outpaint"):
        b.mask = st("mask")
        b.cond = torch.cat([b.target * (1 - b.mask), b.mask], 1)
    elif task == "customize":
        b.ref = st("source_image")
    return b


# ----------------------------------------------------------------------------- python data.py
def preview(path="results/world/data_preview.png"):
    """Four examples of every task at 64 px, one row per task; each example is input | target | mask."""
    tiles = []
    for task in TASKS:
        b = make_batch(task, 4, 64, seed=0, split="test")
        cond = b.cond[:, :3] if b.cond is not None else b.ref if b.ref is not None else torch.zeros_like(b.target)
        mask = (b.mask if b.mask is not None else torch.zeros_like(b.target[:, :1])) * 2 - 1
        tiles.append(torch.cat([torch.cat([c, t, m.expand_as(t)], 2) for c, t, m in zip(cond, b.target, mask)], 2))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    to_pil(torch.cat(tiles, 1)).save(path)
    print(f"wrote {path} (rows: {', '.join(TASKS)}; each example: input | target | mask)")


def throughput(resolutions=(32, 64), n=256):
    """make_batch images/s per task, on the CPU and on CUDA when there is one."""
    out = {}
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for res in resolutions:
            for task in TASKS:
                make_batch(task, 8, res, dev)  # warm-up
                t0 = time.perf_counter()
                make_batch(task, n, res, dev, seed=3)
                if dev == "cuda":
                    torch.cuda.synchronize()
                out[f"{dev} {res}px {task}"] = ips = n / (time.perf_counter() - t0)
                print(f"make_batch {dev} {res}px {task:12s} {ips:8.0f} images/s (batch {n})")
    return out


if __name__ == "__main__":
    if sys.argv[1:]:
        raise SystemExit(f"data.py takes no arguments (got {' '.join(sys.argv[1:])})")
    preview()
    rows = dict(throughput=throughput())
    with open("results/world/data.json", "w") as f:
        json.dump(rows, f, indent=1)
    print("wrote results/world/data.json (the scorer's own accuracy: python scorer.py)")
