"""The exact scorer: parse any image (rendered or generated) back into a Scene and compare it with its spec.

No learned judge is involved: `parse` reads the background and horizon (the best-explaining palette colours per
row), finds objects as connected components, and reads each object's colour (nearest palette entry), shape and
size (soft-IoU against templates rendered by world.py's own signed distances), and outline weight (the outline's
colour mass after unmixing each pixel into object / outline / background). Blur and noise move pixels but not
mass, so the measurements are tolerant to the blurry, noisy images a generator makes. `score(task, images,
batch)` gives each task's metrics: attribute accuracy (GenEval-like) for t2i; edit success and PSNR outside the
edit for local edits; success of the global edit with structure kept; content accuracy, seam error and PSNR
outside the hole for in/outpainting; concept preservation, prompt following and de-biased preservation for
customisation. Fidelity, where the spec fixes every pixel (t2i, both edits): PSNR to the spec's render, which
the parse forgives and which blur, noise and misregistration all lower ("psnr_truth"). Its own accuracy on clean,
degraded and wrong-spec renders: `python scorer.py`
(results/world/scorer.json).
"""
import itertools
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from dataclasses import replace

from data import TASKS, make_batch
from world import (BACKGROUNDS, CENTERS, COLORS, HORIZONS, LIGHT, LINES, SHAPES, SIZES, Grid, Obj, Scene, apply_tone,
                   coverage, degrade, free_cells, luma, outline_color, rgb, sdf)


def _palette(names, tone):
    return apply_tone(torch.tensor([rgb(n) for n in names], dtype=torch.float32)[:, :, None, None], tone)[:, :, 0, 0]


def _components(mask):
    """8-connected component labels of a (H, W) bool mask by max-label propagation."""
    H, W = mask.shape
    m = mask.float()
    lab = torch.arange(1, H * W + 1, dtype=torch.float32).view(H, W) * m
    while True:
        new = F.max_pool2d(lab[None, None], 3, 1, 1)[0, 0] * m
        if torch.equal(new, lab):
            return lab
        lab = new


def _templates(cx, cy, res, lines=(0,)):
    """Fill and outline coverage of every (shape, size, line) centred at (cx, cy): (4, 2, L, H, W) each."""
    y = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    shape = torch.arange(4).view(4, 1, 1, 1, 1)
    r = torch.tensor(list(SIZES.values())).view(1, 2, 1, 1, 1)
    w = torch.tensor(lines, dtype=torch.float32).view(1, 1, -1, 1, 1) / 32
    d = sdf(shape, y[None, :] - cx, y[:, None] - cy, r)  # (4, 2, 1, H, W)
    fill = coverage(d, res).expand(4, 2, len(lines), res, res)
    return fill, coverage(d - w, res) - fill


TOL = {"normal": 1.0, "dark": 0.5, "gray": 0.45}  # contrast scale of each tone


def _blur(x, sigma):
    """Separable Gaussian blur of (N, 1, H, W) maps (sigma in pixels), zero padding."""
    if sigma == 0:
        return x
    r = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r)), k.view(1, 1, -1, 1), padding=(r, 0))


def _background(x, tone):
    """Best (horizon, sky, ground) explaining the most pixels; returns names and the (3, H, W) background."""
    H, bgs = x.shape[-1], list(BACKGROUNDS)
    pal = _palette(bgs, tone)  # (6, 3)
    dist = torch.cdist(x.flatten(1).T, pal).view(H, H, 6)
    near = F.one_hot(dist.argmin(-1), 6) * (dist.min(-1).values < 0.3 * TOL[tone])[..., None]
    rows = near.sum(1).float()  # (H, 6) background-like pixels per row and colour
    best = None
    for klass in ([b in LIGHT for b in bgs], [b not in LIGHT for b in bgs]):  # sky and ground share a class
        r = rows * torch.tensor(klass, dtype=torch.float32) - 1e-3 * ~torch.tensor(klass)
        for name, h in HORIZONS.items():
            cut = H if h is None else round(h * H)
            top, bot = r[:cut].sum(0), r[cut:].sum(0)
            sky = int(top.argmax()) if h is not None else int((top + bot).argmax())
            ground = int(bot.argmax()) if h is not None else sky
            if h is not None and sky == ground:
                continue
            score = float(top[sky] + bot[ground]) - (0 if h is None else 0.03 * H * H)  # no horizon wins ties
            if best is None or score > best[0]:
                best = (score, name, cut, bgs[sky], bgs[ground])
    _, horizon, cut, sky, ground = best
    bg = torch.where(torch.arange(H)[None, :, None] < cut, pal[bgs.index(sky)][:, None, None],
                     pal[bgs.index(ground)][:, None, None])
    return horizon, sky, ground, bg.expand(3, H, H)


def parse(img, tone="normal", subjects=False):
    """Parse one image (3, H, W) in [-1, 1] into a Scene: background, horizon and each object's attributes.

    Tolerant to blur and noise: colours are nearest palette entries; every pixel near an object is unmixed
    into object colour(s) / outline colour / background (blur preserves each one's mass); shape and size are
    the best soft-IoU template (blurred as the image is) at the object's centroid; the outline weight is the
    template whose outline mass is nearest. `subjects` reads a second colour and its pattern.
    """
    x = (img.detach().float().cpu() + 1) / 2  # (3, H, W) in [0, 1]
    H, scale = x.shape[-1], TOL[tone]
    horizon, sky, ground, bg = _background(x, tone)
    outline = apply_tone(torch.tensor(outline_color(Scene([], sky, ground)))[:, None, None], tone)[:, 0, 0]
    raw = ((x - bg).norm(dim=0) > 0.25 * scale).float()
    fg = (raw > 0) & (F.avg_pool2d(raw[None, None], 3, 1, 1)[0, 0] >= 4 / 9)  # drop isolated noise, never grow
    labels = _components(fg)
    y = (torch.arange(H, dtype=torch.float32) + 0.5) / H
    Y, X = y[:, None].expand(H, H), y[None, :].expand(H, H)
    colors = list(COLORS)
    objpal = _palette(colors, tone)  # (8, 3)
    objects = []
    for lab in labels.unique()[1:]:
        comp = labels == lab
        if comp.sum() < 0.01 * H * H:
            continue  # specks
        cx, cy = X[comp].mean(), Y[comp].mean()
        pix = x[:, comp]  # (3, n)
        sep = torch.minimum((pix - bg[:, comp]).norm(dim=0), (pix - outline[:, None]).norm(dim=0))
        core = pix[:, sep >= sep.quantile(0.7)].median(dim=1).values  # the object's own colour
        c1 = int((objpal - core).norm(dim=1).argmin())
        if subjects:  # two colours: the most frequent palette colours of the object
            counts = torch.bincount(torch.cdist(pix.T, objpal).argmin(1), minlength=8)
            candidates = counts.argsort(descending=True)[:3].tolist()  # mixed edge pixels may take a third colour
            c1, c2 = candidates[:2]
            cols = [objpal[c1], objpal[c2]]
        else:
            cols = [objpal[c1]] + ([] if tone == "gray" else [outline])  # gray: all colours on one axis
        window = ((X - cx) ** 2 + (Y - cy) ** 2) < 0.3 ** 2
        P, Bw = x[:, window].T, bg[:, window].T  # (n, 3)
        A = torch.stack([c - Bw for c in cols], -1)  # (n, 3, k): p - b = sum_j coef_j (col_j - b)
        coef = torch.linalg.lstsq(A, (P - Bw)[..., None], driver="gelsd").solution[..., 0].clamp(0, 1)
        fill = torch.zeros(H, H)
        fill[window] = coef.sum(1) if subjects else coef[:, 0]
        if fill.sum() > 1e-3:  # centroid of the fill alone (a blob of pure outline colour has none)
            cx, cy = (fill * X).sum() / fill.sum(), (fill * Y).sum() / fill.sum()
        tfill, ring = _templates(float(cx), float(cy), H, LINES)  # (4, 2, 3, H, W)
        t = tfill[:, :, 0].reshape(8, 1, H, H)
        iou = torch.stack([(torch.minimum(tb, fill).sum((-1, -2)) / torch.maximum(tb, fill).sum((-1, -2)))[:, 0]
                           for tb in (_blur(t, s) for s in (0, 0.7, 1.2))]).amax(0)  # best over blur levels
        s_id, z_id = divmod(int(iou.argmax()), 2)
        line = 0  # outline weight: the template whose outline mass is nearest the measured one
        if not subjects and tone != "gray":
            line = int((ring[s_id, z_id].sum((-1, -2)) - coef[:, 1].sum()).abs().argmin())
        o = Obj(SHAPES[s_id], colors[c1], list(SIZES)[z_id], min(2, int(cy * 3)) * 3 + min(2, int(cx * 3)), line)
        if subjects:
            o = _subject(o, x, bg, window, objpal, candidates, float(cx), float(cy))
        objects.append(o)
    objects.sort(key=lambda o: o.cell)
    return Scene(objects, sky, ground, horizon, tone)


def _subject(o, x, bg, window, objpal, candidates, cx, cy):
    """Colours and pattern of a subject by analysis by synthesis: draw every (colour, colour, pattern) over the
    measured background, blurred as the image may be, and keep the one closest to the pixels."""
    H, colors = x.shape[-1], list(COLORS)
    y = (torch.arange(H, dtype=torch.float32) + 0.5) / H
    dx, dy, r = y[None, :] - cx, y[:, None] - cy, SIZES[o.size]
    fill = _templates(cx, cy, H)[0][SHAPES.index(o.shape), list(SIZES).index(o.size), 0]  # (H, W)
    layouts = {"split": (0.5 + dx * H).clamp(0, 1).expand(H, H), "banded": coverage(dy.abs() - r / 3, H).expand(H, H),
               "dotted": coverage(torch.sqrt(dx * dx + dy * dy) - r / 2, H)}
    hyps = [(p, a, b) for p in layouts for a in candidates for b in candidates if a != b]
    preds = torch.stack([bg * (1 - fill) + fill * torch.lerp(objpal[a][:, None, None], objpal[b][:, None, None],
                                                             layouts[p]) for p, a, b in hyps])  # (N, 3, H, W)
    err = torch.stack([((_blur(preds.flatten(0, 1)[:, None], s)[:, 0].view_as(preds) - x) ** 2)[..., window]
                       .sum((1, 2)) for s in (0, 0.7, 1.2)]).amin(0)
    p, a, b = hyps[int(err.argmin())]
    return replace(o, color=colors[a], color2=colors[b], pattern=p)


def _same_color(a, b, tone):
    """Equal names, or names the tone makes indistinguishable (grayscale maps some hues to one gray)."""
    return a == b or (a is not None and b is not None and tone == "gray" and abs(luma(a) - luma(b)) < 0.12)


OBJECT_ATTRS = ("shape", "color", "size", "cell", "line")
SUBJECT_ATTRS = ("shape", "color", "color2", "pattern")


def compare(found, spec, attrs=OBJECT_ATTRS):
    """Per-attribute agreement of a parsed Scene with its spec: {attr: fraction right}, plus 'full' (all right)."""
    def agree(f, s):
        return {a: _same_color(getattr(f, a), getattr(s, a), spec.tone) if a.startswith("color")
                else getattr(f, a) == getattr(s, a) for a in attrs}
    # match found objects to spec objects by the assignment that agrees most (at most 3! permutations)
    best = [{a: False for a in attrs} for _ in spec.objects]
    for perm in _assignments(len(found.objects), len(spec.objects)):
        m = [agree(found.objects[j], s) if j is not None else {a: False for a in attrs}
             for j, s in zip(perm, spec.objects)]
        if sum(map(sum, (d.values() for d in m))) > sum(map(sum, (d.values() for d in best))):
            best = m
    out = {a: float(np.mean([m[a] for m in best])) if best else 1.0 for a in attrs}
    out.update(count=float(len(found.objects) == len(spec.objects)), horizon=float(found.horizon == spec.horizon),
               sky=float(found.sky == spec.sky), ground=float(found.ground == spec.ground))
    out["full"] = float(all(v == 1.0 for v in out.values()))
    return out


def _assignments(n_found, n_spec):
    """Injective maps spec index -> found index (or None when there are fewer found objects)."""
    idx = list(range(n_found)) + [None] * n_spec
    return set(itertools.permutations(idx, n_spec)) if n_spec else [()]


def _mean(dicts):
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]} if dicts else {}


def psnr(a, b, mask=None):
    """Per-image PSNR in dB between images in [-1, 1] (over pixels where mask == 1)."""
    err = ((a - b) / 2) ** 2  # in [0, 1] units
    w = torch.ones_like(err[:, :1]) if mask is None else mask
    mse = (err * w).sum((1, 2, 3)) / (w.sum((1, 2, 3)) * 3).clamp(min=1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


def seam_error(out, target, mask):
    """Mean |jump across the mask boundary in `out` - the same jump in `target`| in [0, 1] units, per image."""
    errs = []
    for dim in (2, 3):
        m0, m1 = mask.narrow(dim, 0, mask.shape[dim] - 1), mask.narrow(dim, 1, mask.shape[dim] - 1)
        edge = (m0 != m1).float()  # (B, 1, ., .) pairs of pixels straddling the boundary
        jump = lambda x: x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)
        err = (((jump(out) - jump(target)) / 2).abs() * edge).sum((1, 2, 3))
        errs.append(err / 3 / edge.sum((1, 2, 3)).clamp(min=1))
    return (errs[0] + errs[1]) / 2


def score(task, images, batch):
    """Score generated `images` (B, 3, H, W) against `batch`'s specs. Returns (means, per-image 'success')."""
    rows = []
    for i, img in enumerate(images):
        spec, src = batch.specs[i], batch.sources[i]
        if task == "customize":
            found = parse(img, subjects=True)
            o = found.objects[0] if len(found.objects) == 1 else None
            cp = float(o is not None and o.subject() == spec.objects[0].subject())
            pf = float(o is not None and o.cell == spec.objects[0].cell and found.sky == spec.sky
                       and found.ground == spec.ground and found.horizon == spec.horizon)
            copy = o is not None and o.cell == src.objects[0].cell and found.sky == src.sky and found.horizon == "none"
            rows.append(dict(success=cp * pf, concept=cp, prompt=pf, concept_x_prompt=cp * pf,
                             concept_debiased=cp * (not copy)))
        elif isinstance(spec, Grid):
            raise ValueError("grids are scored by the self-distillation script, panel by panel")
        else:
            r = compare(parse(img, tone=spec.tone), spec)
            if task == "inpaint" or task == "outpaint":  # content: the objects the hole touches, and the background
                hole = batch.mask[i, 0].cpu() > 0
                touched = [o for o in spec.objects if (_templates(CENTERS[o.cell % 3], CENTERS[o.cell // 3],
                           hole.shape[-1])[0][SHAPES.index(o.shape), list(SIZES).index(o.size), 0] * hole).sum() > 0]
                sub = compare(parse(img, tone=spec.tone), replace(spec, objects=touched))
                found_in = [o for o in parse(img).objects if o.cell in {t.cell for t in touched}]
                content = all(sub[a] == 1 for a in OBJECT_ATTRS) and len(found_in) == len(touched)
                r = dict(success=float(content and r["sky"] and r["ground"] and r["horizon"]), full=r["full"])
            else:
                r["success"] = r["full"]
            rows.append(r)
    out = _mean(rows)
    if task == "local_edit":
        source = batch.cond[:, :3]
        out["psnr_outside"] = float(psnr(images, source, 1 - batch.mask).mean())
    if task in ("t2i", "local_edit", "global_edit"):  # fidelity: blur, noise, shifts and wrong content all cost
        out["psnr_truth"] = float(psnr(images, batch.target).mean())
    if task in ("inpaint", "outpaint"):
        out["psnr_outside"] = float(psnr(images, batch.target, 1 - batch.mask).mean())
        out["seam_error"] = float(seam_error(images, batch.target, batch.mask).mean())
    return out, [r["success"] for r in rows]


def perturb(spec, rng):
    """The spec with exactly one attribute changed (for checking that the scorer rejects wrong specs)."""
    i = int(rng.integers(len(spec.objects)))
    o, objs = spec.objects[i], list(spec.objects)
    what = ("shape", "color", "size", "cell", "line", "background", "horizon")[rng.integers(7)]
    if what == "cell" and free_cells(objs, exclude=o) != [o.cell]:
        objs[i] = replace(o, cell=[c for c in free_cells(objs, exclude=o) if c != o.cell][0])
    elif what in ("shape", "color", "size", "line"):
        options = {"shape": SHAPES, "color": list(COLORS), "size": list(SIZES), "line": LINES}[what]
        objs[i] = replace(o, **{what: [v for v in options if v != getattr(o, what)][0]})
    elif what == "horizon" and spec.horizon != "none":
        return replace(spec, horizon=[h for h in ("high", "middle", "low") if h != spec.horizon][0])
    else:
        klass = LIGHT if spec.sky in LIGHT else tuple(b for b in BACKGROUNDS if b not in LIGHT)
        new = [b for b in klass if b not in (spec.sky, spec.ground)][0]
        return replace(spec, sky=new, ground=new if spec.horizon == "none" else spec.ground)
    return replace(spec, objects=objs)


def accuracy_report(n=200, resolutions=(32, 64)):
    """The scorer on fresh renders of every task: clean, degraded (blur 1 px + noise 0.05), and wrong specs."""
    rows, gen = {}, torch.Generator().manual_seed(0)
    for res in resolutions:
        for task in TASKS:
            b = make_batch(task, n, res, seed=1, split="test")
            clean, _ = score(task, b.target, b)
            degraded, _ = score(task, degrade(b.target, generator=gen), b)
            rows[f"{res}px {task}"] = dict(clean=clean, degraded=degraded)
            print(f"{res}px {task:12s} clean success {clean['success']:.3f}  degraded {degraded['success']:.3f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in degraded.items() if k in OBJECT_ATTRS + ("count", "sky")))
        b, rng = make_batch("t2i", n, res, seed=2, split="test"), np.random.default_rng(0)
        one_off = np.mean([compare(parse(img), perturb(s, rng))["full"] for img, s in zip(b.target, b.specs)])
        other = np.mean([compare(parse(img), s)["full"] for img, s in zip(b.target, b.specs[1:] + b.specs[:1])])
        rows[f"{res}px wrong specs"] = dict(one_attribute_changed_pass=float(one_off), other_scene_pass=float(other))
        print(f"{res}px wrong specs pass: one attribute changed {one_off:.3f}, another scene {other:.3f}")
    return rows


if __name__ == "__main__":
    if sys.argv[1:]:
        raise SystemExit(f"scorer.py takes no arguments (got {' '.join(sys.argv[1:])})")
    report = accuracy_report()
    os.makedirs("results/world", exist_ok=True)
    with open("results/world/scorer.json", "w") as f:
        json.dump(report, f, indent=1)
    print("wrote results/world/scorer.json")
