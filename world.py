"""The synthetic world: its vocabulary, scene specs, the renderer, random scenes and their captions.

Every image in this project comes from a `Scene` spec, so every result can be measured exactly: scorer.py parses
generated pixels back into attributes and compares them with the spec. The world is small on purpose (four
shapes, eight colours, two sizes, a 3x3 grid, 1-3 objects, backgrounds with an optional horizon, outlines) and
built so that parsing is unambiguous: objects never sit in neighbouring cells, object colours are saturated and
background colours are not, sky and ground are both light or both dark, and outlines contrast with them.

data.py builds the tasks (condition -> target pairs, your own files) on top of this file, questions.py the
judge's yes/no questions.
Image convention everywhere: float tensors in [-1, 1], (B, 3, H, W); masks (B, 1, H, W) in {0, 1}.
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from PIL import Image


# ----------------------------------------------------------------------------- the world's vocabulary
SHAPES = ("circle", "square", "triangle", "diamond")
# Object colours: eight hues 45 degrees apart at full saturation, so hue shift and invert stay in the palette.
COLORS = {"red": (1, 0, 0), "yellow": (1, .75, 0), "lime": (.5, 1, 0), "green": (0, 1, .25),
          "cyan": (0, 1, 1), "blue": (0, .25, 1), "purple": (.5, 0, 1), "pink": (1, 0, .75)}
# Background colours: unsaturated, closed under invert (white<->black, silver<->gray, sand<->navy).
BACKGROUNDS = {"white": (.92, .92, .92), "silver": (.69, .69, .69), "sand": (.88, .8, .59),
               "black": (.08, .08, .08), "gray": (.31, .31, .31), "navy": (.12, .2, .41)}
LIGHT = ("white", "silver", "sand")  # a light background gets black outlines, a dark one white outlines
SIZES = {"small": .14, "large": .2}  # circumradius as a fraction of the image side
LINES = (0, 1, 2)  # outline width in pixels at 32 px (scales with resolution)
HORIZONS = {"none": None, "high": .25, "middle": .5, "low": .75}  # horizon row as a fraction from the top
PATTERNS = ("split", "banded", "dotted")  # how a subject's second colour is laid out
CENTERS = (.2, .5, .8)  # object centre of each grid column / row
CELLS = ("top left", "top center", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom center", "bottom right")
TONES = ("normal", "gray", "dark")
WARM, COOL = ("red", "yellow", "pink"), ("green", "cyan", "blue")
# Held-out colour-shape pairs: never drawn in the train/test splits, always in the "heldout" split.
HELDOUT = {("red", "triangle"), ("blue", "circle"), ("lime", "diamond"), ("pink", "square")}


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major
    line: int = 0
    color2: str | None = None  # subjects only: second colour
    pattern: str | None = None  # subjects only: split | banded | dotted

    def subject(self):
        return (self.shape, self.color, self.color2, self.pattern)


@dataclass
class Scene:
    objects: list
    sky: str  # the background colour (above the horizon, or everywhere without one)
    ground: str  # below the horizon (== sky when horizon == "none")
    horizon: str = "none"
    tone: str = "normal"  # set by the grayscale / darken global edits


@dataclass
class Grid:
    """Two images of the same subject side by side: two Scenes, each rendered at full resolution, one (res, 2 res)
    canvas. The caption names the subject and the right panel's context (data.grid: the left is a plain reference)."""
    panels: list


# ----------------------------------------------------------------------------- renderer
def _box(u, v, half):
    qx, qy = u.abs() - half, v.abs() - half
    return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)


def _triangle(dx, dy, r):
    """Exact signed distance to an equilateral triangle, apex up, circumradius r (after Inigo Quilez)."""
    k, s = math.sqrt(3), r * math.sqrt(3) / 2  # s: half the side
    px, py = dx.abs() - s, -dy + s / k
    flip = px + k * py > 0
    px, py = torch.where(flip, (px - k * py) / 2, px), torch.where(flip, (-k * px - py) / 2, py)
    px = px - torch.minimum(torch.zeros_like(px), torch.maximum(px, -2 * s * torch.ones_like(px)))
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


def sdf(shape_id, dx, dy, r):
    """Exact signed distance (image units, y down) to a circle / square / triangle / diamond of circumradius r."""
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = _box(dx, dy, r / math.sqrt(2))
    diamond = _box((dx + dy) / math.sqrt(2), (dy - dx) / math.sqrt(2), r / math.sqrt(2))
    return torch.where(shape_id == 0, circle, torch.where(shape_id == 1, square,
                                                          torch.where(shape_id == 2, _triangle(dx, dy, r), diamond)))


def coverage(d, res):
    return (0.5 - d * res).clamp(0, 1)  # anti-aliased inside-ness of a pixel for a signed distance d


def rgb(name):
    return COLORS[name] if name in COLORS else BACKGROUNDS[name]


def luma(name):
    r, g, b = rgb(name)
    return 0.299 * r + 0.587 * g + 0.114 * b


def outline_color(scene):
    return (0., 0., 0.) if scene.sky in LIGHT else (1., 1., 1.)


def apply_tone(img01, tone):
    """img01 (..., 3, H, W) in [0, 1]."""
    if tone == "gray":
        lum = 0.299 * img01[..., 0:1, :, :] + 0.587 * img01[..., 1:2, :, :] + 0.114 * img01[..., 2:3, :, :]
        return lum.expand_as(img01).clone()
    return img01 * 0.5 if tone == "dark" else img01


def render(scenes, res, device="cpu"):
    """Render Scenes to (B, 3, res, res), or Grids to (B, 3, res, 2 res), in [-1, 1], anti-aliased, on `device`."""
    grids = [isinstance(s, Grid) for s in scenes]
    if any(grids):  # two-panel canvases: the panels at full resolution, side by side
        if not all(grids):
            raise ValueError("a batch is all two-panel grids or all single images: their widths differ")
        panels = render([p for g in scenes for p in g.panels], res, device)  # (2B, 3, res, res)
        return rearrange(panels, "(b k) c h w -> b c h (k w)", k=2)
    B, K = len(scenes), max(1, max(len(s.objects) for s in scenes))
    f = lambda rows: torch.tensor(rows, dtype=torch.float32, device=device)
    pad = lambda s, v: [v(o) for o in s.objects] + [v(None)] * (K - len(s.objects))
    geo = f([pad(s, lambda o: (CENTERS[o.cell % 3], CENTERS[o.cell // 3], SIZES[o.size], SHAPES.index(o.shape),
                                o.line / 32, (PATTERNS.index(o.pattern) + 1) if o.pattern else 0, 1.)
                     if o else (0, 0, 0, 0, 0, 0, 0.)) for s in scenes])  # (B, K, 7)
    c1 = f([pad(s, lambda o: rgb(o.color) if o else (0, 0, 0)) for s in scenes])  # (B, K, 3)
    c2 = f([pad(s, lambda o: rgb(o.color2 or o.color) if o else (0, 0, 0)) for s in scenes])
    line_rgb = f([outline_color(s) for s in scenes])[:, :, None, None]  # (B, 3, 1, 1)
    sky = f([rgb(s.sky) for s in scenes])[:, :, None, None]
    ground = f([rgb(s.ground) for s in scenes])[:, :, None, None]
    hor = f([HORIZONS[s.horizon] if s.horizon != "none" else 2. for s in scenes])[:, None, None, None]
    y = (torch.arange(res, device=device, dtype=torch.float32) + 0.5) / res  # pixel centres
    Y, X = y[:, None].expand(res, res), y[None, :].expand(res, res)
    img = torch.lerp(sky, ground, ((Y - hor) * res + 0.5).clamp(0, 1)).expand(B, 3, res, res)  # (B, 3, H, W)
    g = geo[:, :, :, None, None]  # (B, K, 7, 1, 1)
    dx, dy, r = X - g[:, :, 0], Y - g[:, :, 1], g[:, :, 2]  # (B, K, H, W)
    d = sdf(g[:, :, 3].long(), dx, dy, r)
    cover = coverage(d - g[:, :, 4], res) * g[:, :, 6]  # (B, K, H, W): the outline is drawn outside the shape
    fill = coverage(d, res) * g[:, :, 6]
    pat = g[:, :, 5]
    alpha2 = torch.where(pat == 1, (0.5 + dx * res).clamp(0, 1),
                         torch.where(pat == 2, coverage(dy.abs() - r / 3, res),
                                     torch.where(pat == 3, coverage(torch.sqrt(dx * dx + dy * dy) - r / 2, res), 0.)))
    for k in range(K):  # objects never overlap, but compose in order anyway
        col = torch.lerp(c1[:, k, :, None, None], c2[:, k, :, None, None], alpha2[:, k, None])  # (B, 3, H, W)
        cov, fil = cover[:, k, None], fill[:, k, None]
        img = img * (1 - cov) + line_rgb * (cov - fil) + col * fil
    tone = torch.tensor([TONES.index(s.tone) for s in scenes], device=device)[:, None, None, None]
    img = torch.where(tone == 1, apply_tone(img, "gray"), torch.where(tone == 2, img * 0.5, img))
    return img * 2 - 1


# ----------------------------------------------------------------------------- sampling scenes
def _adjacent(a, b):
    return abs(a % 3 - b % 3) <= 1 and abs(a // 3 - b // 3) <= 1  # king-move neighbours (or the same cell)


def free_cells(objects, exclude=None):
    return [c for c in range(9) if all(not _adjacent(c, o.cell) for o in objects if o is not exclude)]


def allowed(color, shape, split):
    return ((color, shape) in HELDOUT) == (split == "heldout") or split == "any"


def sample_object(rng, objects, split, cell=None, subject=False):
    """A new object in a free cell whose (colour, shape) is new to the scene and allowed by the split."""
    taken = {(o.color, o.shape) for o in objects}
    while True:
        shape, color = SHAPES[rng.integers(4)], list(COLORS)[rng.integers(8)]
        if (color, shape) not in taken and allowed(color, shape, "train" if split == "heldout" and objects else split):
            break
    cell = cell if cell is not None else int(rng.choice(free_cells(objects)))
    if subject:
        color2 = list(c for c in COLORS if c != color)[rng.integers(7)]
        return Obj(shape, color, "large", cell, 0, color2, PATTERNS[rng.integers(3)])
    return Obj(shape, color, list(SIZES)[rng.integers(2)], cell, int(rng.choice(LINES, p=[.5, .25, .25])))


def sample_background(rng, horizon_p=0.5):
    light = rng.random() < 0.5
    names = LIGHT if light else tuple(b for b in BACKGROUNDS if b not in LIGHT)
    if rng.random() < horizon_p:
        sky, ground = rng.choice(names, 2, replace=False)
        return dict(sky=str(sky), ground=str(ground), horizon=("high", "middle", "low")[rng.integers(3)])
    c = str(rng.choice(names))
    return dict(sky=c, ground=c, horizon="none")


def sample_scene(rng, split="train", n_objects=None):
    """A random scene of 1-3 objects; in the heldout split the first object is a held-out colour-shape pair."""
    n = n_objects or int(rng.integers(1, 4))
    while True:
        objects = []
        for _ in range(n):
            if not free_cells(objects):
                break
            objects.append(sample_object(rng, objects, split))
        if len(objects) == n:
            return Scene(objects, **sample_background(rng))


# ----------------------------------------------------------------------------- language
def pick(rng, options):
    return options[rng.integers(len(options))]


def describe(o, rng, article="a"):
    size = pick(rng, {"small": ("small", "little"), "large": ("large", "big")}[o.size])
    line = ["", " with a thin outline", " with a thick outline"][o.line]
    if o.pattern:
        return f"{article} {o.color} and {o.color2} {o.pattern} {o.shape}"
    return f"{article} {size} {o.color} {o.shape}{line} {pick(rng, ('in', 'at'))} the {CELLS[o.cell]}"


def describe_background(s, rng, prefix=False):
    if s.horizon == "none":
        return f"{s.sky} background ," if prefix else pick(rng, (f"on a {s.sky} background", f", {s.sky} background"))
    if prefix:
        return f"{s.horizon} horizon , {s.sky} sky , {s.ground} ground ,"
    return pick(rng, (f", {s.sky} sky and {s.ground} ground , {s.horizon} horizon",
                       f"with a {s.horizon} horizon , {s.sky} sky , {s.ground} ground"))


def caption(s, rng):
    if isinstance(s, Grid):  # at most 23 words: fits the CPU base's 24 tokens
        subj, right = s.panels[0].objects[0], s.panels[1]
        return (f"two images of the same {describe(subj, rng, '').strip()} {pick(rng, ('in', 'at'))} the "
                f"{CELLS[right.objects[0].cell]} {describe_background(right, rng)}")
    objs = " and ".join(describe(o, rng) for o in s.objects)
    return pick(rng, (f"{objs} {describe_background(s, rng)}", f"{describe_background(s, rng, prefix=True)} {objs}"))


WORDS = """a the in at on and with of to , outline thin thick background sky ground horizon grid four images same
make turn change recolor remove delete take away add put move swap exchange shift hues rotate colors invert image
it grayscale darken darker mirror flip horizontally black white this object is are there does do have shape shapes
outlines one two three all warm cool bigger smaller than these no ?""".split()
VOCAB = tuple(dict.fromkeys(["<pad>"] + WORDS + list(SHAPES) + list(COLORS) + list(BACKGROUNDS) + list(HORIZONS)
                            + ["small", "little", "large", "big"] + list(PATTERNS) + " ".join(CELLS).split()))
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_TOKENS = 48
ONE_OBJECT_TOKENS = 24  # holds every caption of a 1-object scene (22 words at most) and every edit instruction (13)


def tokenize(texts, max_len=MAX_TOKENS):
    """Captions -> (B, max_len) word ids, 0-padded. Unknown words are an error that names them."""
    out = torch.zeros(len(texts), max_len, dtype=torch.long)
    for i, text in enumerate(texts):
        words = text.lower().replace(",", " , ").split()
        unknown = [w for w in words if w not in WORD_ID]
        if unknown:
            raise ValueError(f"unknown word {unknown[0]!r} in {text!r} (the vocabulary is world.VOCAB)")
        if len(words) > max_len:
            raise ValueError(f"caption of {len(words)} words is longer than {max_len}: {text!r}")
        out[i, :len(words)] = torch.tensor([WORD_ID[w] for w in words], dtype=torch.long)
    return out


# ----------------------------------------------------------------------------- images in and out
def to_pil(img):
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    return Image.fromarray(((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
                           .permute(1, 2, 0).numpy())


def load_image(path, res, mask=False):
    """The one loader of every image file a user hands in: PNG/JPEG -> (3, res, res) in [-1, 1], or (1, res, res) in
    {0, 1} for a mask (white = 1). Every failure is a ValueError of one line naming the file and the problem."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated or corrupt file fails here, not later
            if im.size != (res, res):
                raise ValueError(f"{path}: the image is {im.size[0]}x{im.size[1]}, the model takes {res}x{res}")
            pixels = np.asarray(im.convert("L" if mask else "RGB"))
    except ValueError:
        raise
    except Exception as e:  # PIL's UnidentifiedImageError, OSError for truncated data, ...
        raise ValueError(f"{path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if mask:
        return torch.from_numpy((pixels > 127).astype(np.float32))[None]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1


def degrade(img, sigma=1.0, noise=0.05, generator=None, shift=0):
    """Gaussian blur (sigma in pixels) + Gaussian noise (std in [0, 1] units), and with shift > 0 each image moved
    by up to `shift` pixels in x and y (edges repeated): a generator's output, or a pipeline-made edit target."""
    r = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=img.dtype, device=img.device) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = torch.nn.functional.pad(img, (r, r, r, r), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)  # blur rows
    x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)  # then columns
    eps = torch.randn(x.shape, generator=generator, dtype=img.dtype).to(img.device)
    if shift:  # misregistration: crop a shifted window of the edge-padded image
        H, W = x.shape[-2:]
        pad = torch.nn.functional.pad(x, (shift,) * 4, mode="replicate")
        d = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=generator).tolist()
        x = torch.stack([p[:, dy:dy + H, dx:dx + W] for p, (dy, dx) in zip(pad, d)])
    return (x + 2 * noise * eps).clamp(-1, 1)


def check_images(images, name="images"):
    """(B, 3, H, W), square, at least 8 px, in the generator's range [-1, 1] (|x| up to 1.5 tolerated)."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be a (B, 3, H, W) tensor, got {tuple(getattr(images, 'shape', ()))}")
    if images.shape[2] != images.shape[3] or images.shape[2] < 8:
        raise ValueError(f"{name} must be square and at least 8 px, got {images.shape[2]}x{images.shape[3]}")
    top = images.detach().abs().max().item()  # the one host sync of a judge call
    if not top <= 1.5:
        raise ValueError(f"{name} must be in [-1, 1] (the generator's range), found |x| = {top:.3g}; "
                         "convert [0, 1] images with x * 2 - 1, bytes with x / 127.5 - 1")
