"""The frozen raters: a small VLM that answers yes/no questions about images; training of every judge.

    python judges.py                                     # train (or load) every judge, print accuracies, write PNG
    python judges.py --what=vlm --agreement_ckpt=out/base/ckpt.pt   # + VLM vs exact parser on generated images
    python judges.py --preset=tiny --vlm_caption_steps=20 --vlm_vqa_steps=20 --reward_steps=20 --align_steps=20

VLM (Dual-Process, Self-Distillation): the tiny LLaVA of vlm.py (or any local transformers VLM, `load_judge`).
Training: the vision tower on each cell's attributes (`TowerHeads`, in place of LLaVA's pretrained CLIP), captions,
then the world's yes/no questions (questions.vqa_batch, every family, balanced) plus a "statement" loss (`vqa_loss`),
without which yes/no sits at chance.
Rewards (ByteEdit): rewards.py defines them; this file trains and caches them with the VLM (`get_judge`).
Images everywhere: (B, 3, H, W) in [-1, 1], the generator's range; every judge is differentiable in the pixels.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import questions
import world
import scorer
from common import (check_config, cosine_lr, load_model, model_inputs, option, parse_config, peek, save_checkpoint,
                    setup)
from rewards import (Aesthetic, Alignment, aesthetic_batch, alignment_batch, alignment_loss, bt_loss, load_reward,
                     pairwise_accuracy, pairwise_by_change, preference_pairs, retrieval_accuracy)
from sample import euler
from vlm import VLM_PRESETS, Judge, build_vlm, load_judge  # the VLM itself lives in vlm.py


@dataclass
class Config:
    preset: str = option("small", choices=tuple(VLM_PRESETS))  # judge sizes (VLM_PRESETS, REWARD_PRESETS): tiny
                                   # (tests, seconds) | small (CPU)
    what: str = option("vlm,alignment,aesthetic", each=("vlm", "alignment", "aesthetic"))  # judges to build and
                                   # evaluate
    out: str = option("", path="dir")  # cache directory ("" = out/judges/<preset>, the recipe's judges only); cached
                                   # judges are loaded, not retrained
    retrain: bool = False          # train even when a cached judge exists
    res: int = option(32, low=8)   # image side of the training data and of the rewards' input (the VLM's: its
                                   # preset's size); other sizes are resized differentiably
    families: str = option("all", each=("all",) + questions.FAMILIES)  # question families to train and evaluate
                                   # (questions.FAMILIES), comma-separated
    vlm_tower_steps: int = option(600, low=0)  # phase 0: the vision tower learns each cell's attributes (TowerHeads)
    vlm_tower_lr: float = option(1e-3, above=0)  # phase 0's peak learning rate
    vlm_tower_frozen: bool = False # phases 1-2 leave the tower as phase 0 made it (LLaVA freezes its CLIP tower)
    vlm_caption_steps: int = option(600, low=0)  # phase 1: teacher-forced captions
    vlm_vqa_steps: int = option(2400, low=0)  # phase 2: yes/no questions of every family + the statement loss
    statement_weight: float = option(1.0, low=0)  # phase 2: weight of the LM loss on the true questions (vqa_loss)
    vlm_rehearsal: float = option(1.0, low=0)  # phase 2: weight of a caption loss (half a batch) beside yes/no
    vlm_batch: int = option(72, low=8)  # examples per step (phase 2: an equal share per one-image family)
    vlm_family_batch: str = "same:48,size:24"  # phase 2: questions per step of the families that need more than an
                                   # equal share (see vqa_step_loss)
    vlm_lr: float = option(3e-4, above=0)  # peak AdamW learning rate (warm-up, then cosine, per phase)
    reward_steps: int = option(1500, low=1)  # optimizer steps of the aesthetic model
    reward_batch: int = option(32, low=2)  # images (pairs) per step
    align_captions: int = option(16, low=2)  # alignment: captions per image, the matching one + mismatches
    align_steps: int = option(6000, low=1)  # alignment: contrastive steps (after its tower phase)
    align_tower_steps: int = option(600, low=0)  # alignment: phase 0 of its CLIP vision tower (TowerHeads)
    align_pool: str = option("mean", choices=("mean", "token"))  # alignment: embed the mean of each tower's tokens |
                                   # token (EOS / class token)
    align_scene_code: bool = False # alignment: in its tower phase both towers' embeddings also name the whole scene
                                   # through one shared head (TowerHeads.code)
    reward_lr: float = option(2e-3, above=0)  # peak AdamW learning rate of the reward models
    warmup: int = option(50, low=1)  # linear warm-up steps
    grad_clip: float = option(1.0, above=0)  # max global grad norm
    eval_n: int = option(200, low=1)  # held-out examples per VLM family / retrieval images / aesthetic pairs
    agreement_ckpt: str = option("", path="file")  # a generator checkpoint: VLM vs exact-parser agreement on its
                                   # samples
    results: str = option("results/judges", path="dir", required=True)  # where judges.json and judges.png go
    seed: int = option(0, low=0)   # data and initial weights
    device: str = option("auto", choices=("auto", "cpu", "cuda"), device=True)  # auto | cpu | cuda
    compile: str = option("off", choices=("off",))  # the judges run eagerly
    quiet: bool = False            # no progress bars

    def check(self):
        yield "--families: all stands alone (or list families)" if "all" in self.families.split(",") \
            and self.families != "all" else ""
        try:
            family_batch(self)
        except ValueError as e:
            yield str(e)
        if self.agreement_ckpt:
            peek(self.agreement_ckpt)  # a one-line error for a file that is no checkpoint, before any training
        if not self.out:  # the shared cache holds the recipe's judges only
            changed = [k for k in RECIPE_FIELDS if getattr(self, k) != getattr(Config(), k)]
            yield (f"--{changed[0]} differs from the recipe of the shared judges in out/judges/{self.preset}: pass "
                   "--out=DIR for this judge") if changed else ""


# ----------------------------------------------------------------------------- training the VLM
def cell_caption(s):
    """Phase 1's caption: the objects in cell order, each cell named first ("at the top left a large red circle with
    a thin outline , ..."), then the background. The world's captions name an object before its cell, so the LM had
    to guess which cell to read; told the cell first, it learns to read it. Measured (small preset, with rehearsal,
    see `vlm_rehearsal`, and the shape question naming the cell first too): shape 0.53 -> 0.80-0.93, size 0.50 ->
    0.91-0.92 over two seeds. Size needs every object's size word, the subjects' included (without: 0.47-0.56)."""
    line = ("with no outline", "with a thin outline", "with a thick outline")
    objects = [f"at the {world.CELLS[o.cell]} a {o.size} {o.color}"
               + (f" and {o.color2} {o.pattern}" if o.pattern else "") + f" {o.shape} {line[o.line]}"
               for o in sorted(s.objects, key=lambda o: o.cell)]
    return " , ".join(objects + [f"{s.horizon} horizon , {s.sky} sky , {s.ground} ground"])


def caption_batch(n, res, seed, split="train", device="cpu"):
    """Images, cell-first captions and scenes; a quarter are subjects alone (the objects of the "same" questions)."""
    b, rng = data.make_batch("t2i", n - n // 4, res, device, seed=seed, split=split), np.random.default_rng(seed)
    subjects = [world.Scene([world.sample_object(rng, [], split, cell=int(rng.integers(9)), subject=True)],
                           **world.sample_background(rng)) for _ in range(n // 4)]
    scenes = b.specs + subjects
    return torch.cat([b.target, world.render(subjects, res, device)]), [cell_caption(s) for s in scenes], scenes


# phase 0 labels: each cell's object (0 = empty cell), and the scene's background
CELL_HEADS = dict(shape=(None,) + world.SHAPES, color=(None,) + tuple(world.COLORS), size=(None,) + tuple(world.SIZES),
                  line=(None,) + tuple(world.LINES), color2=(None,) + tuple(world.COLORS),
                  pattern=(None,) + tuple(world.PATTERNS))
SCENE_HEADS = dict(horizon=tuple(world.HORIZONS), sky=tuple(world.BACKGROUNDS), ground=tuple(world.BACKGROUNDS))


class TowerHeads(torch.nn.Module):
    """Phase 0's throwaway readouts of a vision tower (the VLM's, or the alignment reward's CLIP tower): each
    cell's features (the tokens pooled to the world's 3x3 layout: one token per cell for the small VLM) -> that
    cell's object; all cells -> horizon, sky and ground. LLaVA and CLIP start from pretrained towers; ours start
    from labels of the world. Measured (small preset): the VLM's horizon family went from 0.48 to 0.99 (the yes/no
    loss alone never taught the tower to see it), the alignment model's retrieval from 0.30 to 0.48."""

    def __init__(self, hidden, code_dim=0):
        super().__init__()
        n_cell, n_scene = sum(map(len, CELL_HEADS.values())), sum(map(len, SCENE_HEADS.values()))
        self.cell = torch.nn.Linear(hidden, n_cell)
        self.scene = torch.nn.Linear(9 * hidden, n_scene)
        self.code = None if not code_dim else torch.nn.Sequential(
            torch.nn.Linear(code_dim, 256), torch.nn.GELU(), torch.nn.Linear(256, 9 * n_cell + n_scene))

    def forward(self, net, images, scenes, captions=None):
        """Cross-entropy of every label, summed over the heads. net: a Judge or an Alignment reward. With a scene
        code (`code_dim`, alignment only), the image's and its caption's embeddings (`captions`) also each name the
        whole scene through the one shared `code` head, so that both towers start out in one scene code."""
        tower = net.clip.vision_model if isinstance(net, Alignment) else net.model.model.vision_tower
        hidden = tower(pixel_values=net.pixels(images), output_hidden_states=True).hidden_states[-1]
        f = hidden[:, 1:]
        g = int(round(f.shape[1] ** 0.5))  # (B, g*g, h) -> (B, 9, h)
        f = F.adaptive_avg_pool2d(f.transpose(1, 2).reshape(len(f), -1, g, g), 3).flatten(2).transpose(1, 2)
        cells = torch.zeros(len(scenes), 9, len(CELL_HEADS), dtype=torch.long)
        for i, s in enumerate(scenes):
            for o in s.objects:
                cells[i, o.cell] = torch.tensor([v.index(getattr(o, k)) for k, v in CELL_HEADS.items()])
        bg = torch.tensor([[v.index(getattr(s, k)) for k, v in SCENE_HEADS.items()] for s in scenes])
        readouts = [(self.cell(f), cells, CELL_HEADS), (self.scene(f.flatten(1)), bg, SCENE_HEADS)]
        if self.code is not None:
            for e in (net.project_image(hidden, unit=False), net.embed_text(captions, unit=False)):
                cell, scene = self.code(e).split([self.cell.out_features * 9, self.scene.out_features], -1)
                readouts += [(cell.view(len(e), 9, -1), cells, CELL_HEADS), (scene, bg, SCENE_HEADS)]
        loss = 0.
        for logits, labels, names in readouts:
            for k, lg in enumerate(logits.split([len(v) for v in names.values()], -1)):
                loss = loss + F.cross_entropy(lg.flatten(0, -2), labels[..., k].flatten().to(lg.device))
        return loss


def caption_loss(judge, images, captions):
    """Teacher-forced cross-entropy of the caption tokens after the image-only prompt."""
    tails = [judge.tok.encode(c, add_special_tokens=False) + [judge.tok.eos_token_id] for c in captions]
    ids, mask = judge._inputs([None] * len(captions), 1, tails)
    labels = torch.full_like(ids, -100)
    for i, t in enumerate(tails):
        labels[i, -len(t):] = ids[i, -len(t):]
    return judge.model(input_ids=ids, attention_mask=mask, pixel_values=judge.pixels(images), labels=labels).loss


def vqa_loss(judge, v, statement_weight=1.0):
    """-log p(answer) + statement_weight * the teacher-forced LM loss of the questions whose answer is yes.

    Yes/no alone sits at chance for hundreds of steps: the answer is a match between a word and the image, and
    nothing rewards either half before both exist. The statement term makes the model *say* the true question, word
    by word, in the very prompt it answers, so the position before "warm" learns to predict it from the image and the
    answer only has to compare. Measured (tests/test_judges.py: one warm or cool object, "are all the shapes
    warm|cool colors ?", tiny preset, 250 steps): 48% without the term, 100% with it."""
    logits, ids = judge.logits(v.images, v.questions, v.images2, keep=0)  # (B, L, vocab)
    answers = v.answers.to(logits.device)
    answer = F.cross_entropy(logits[:, -1], torch.where(answers, judge.yes_id, judge.no_id))
    image = ids == judge.model.config.image_token_id
    text = (image.cumsum(1) == image.sum(1, keepdim=True)) & ~image & (ids != judge.tok.pad_token_id)
    labels = torch.where(text & answers[:, None], ids, -100)[:, 1:]  # (B, L - 1) next-token targets, yes rows
    statement = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100) \
        if (labels >= 0).any() else 0.
    return answer + statement_weight * statement


def vqa_step_loss(judge, n, res, seed, families, statement_weight, device="cpu", counts=None):
    """n // len(families) questions of each family, or counts[family] where given; the one-image questions in one
    forward, the two-image "same" questions in another; every question weighs the same.

    Two families need many more examples than an equal share. Same-subject (two images) stayed at chance (0.52)
    with 4 per step; at batch 36, 24 per step -> 0.81, 48 -> 0.91. Relative size ("is the red circle bigger than
    the blue square ?") sat at chance on some seeds with 8 per step beside the 48 (0.445 on seed 0), and 400 more
    steps of the same mix left it there (0.46); with 24 per step it went 0.425 -> 0.925 in 300 steps."""
    share, counts = max(2, n // len(families)), counts or {}
    batches = [questions.vqa_batch(f, counts.get(f, share), res, device, seed) for f in families]
    one, two = [v for v in batches if v.images2 is None], [v for v in batches if v.images2 is not None]
    parts = [(vqa_loss(judge, v, statement_weight), len(v.questions)) for v in two]
    if one:
        cat = questions.VQA("mixed", torch.cat([v.images for v in one]), sum([v.questions for v in one], []),
                       torch.cat([v.answers for v in one]))
        parts.append((vqa_loss(judge, cat, statement_weight), len(cat.questions)))
    return sum(loss * k for loss, k in parts) / sum(k for _, k in parts)


def family_batch(cfg):
    """--vlm_family_batch="same:48,size:24" -> {"same": 48, "size": 24}; an unknown family is an error."""
    counts = {}
    for item in filter(None, cfg.vlm_family_batch.split(",")):
        family, _, k = item.partition(":")
        if family not in questions.FAMILIES or not k.isdigit() or int(k) < 2:
            raise ValueError(f"bad --vlm_family_batch item {item!r}: family:count, families from {questions.FAMILIES}, "
                             "count >= 2")
        counts[family] = int(k)
    return counts


@torch.no_grad()
def vqa_accuracy(judge, n, res, seed=10_000, split="test", families=questions.FAMILIES, batch=100):
    """Accuracy per family on n held-out questions, half of them yes (so it is also the balanced accuracy)."""
    out = {}
    for f in families:
        right = 0
        for i in range(0, n, batch):
            v = questions.vqa_batch(f, min(batch, n - i), res, judge.model.device, seed + i, split)
            right += int((judge.answer(v.images, v.questions, v.images2) == v.answers).sum())
        out[f] = right / n
    return out


# ----------------------------------------------------------------------------- agreement, examples, python judges.py
def ask(scene, rng):
    """A colour, shape, position or count question about `scene` (true half the time) and its truth test for any
    Scene; the test reads only what the question names."""
    o, yes, kind = scene.objects[rng.integers(len(scene.objects))], rng.random() < 0.5, int(rng.integers(4))
    options, value = [(list(world.COLORS), o.color), (world.SHAPES, o.shape), (range(9), o.cell),
                      ((1, 2, 3), len(scene.objects))][kind]
    v = value if yes else [x for x in options if x != value][rng.integers(len(options) - 1)]
    where, n = world.CELLS[o.cell], ("one", "two", "three")[v - 1] if kind == 3 else ""
    return [(f"is the shape at the {where} {v} ?", lambda s: any((x.cell, x.color) == (o.cell, v) for x in s.objects)),
            (f"is the shape at the {where} a {v} ?",
             lambda s: any((x.cell, x.shape) == (o.cell, v) for x in s.objects)),
            (f"is the {o.color} {o.shape} at the {world.CELLS[v] if kind == 2 else ''} ?",
             lambda s: any((x.color, x.shape, x.cell) == (o.color, o.shape, v) for x in s.objects)),
            (f"are there {n} shape{'s' if v != 1 else ''} ?", lambda s: len(s.objects) == v)][kind]


@torch.no_grad()
def agreement(judge, ckpt, n=200, steps=16, seed=0):
    """How often the VLM and the exact parser (scorer.parse) give the same answer about a base model's samples
    (colour, shape, position and count questions, true for the prompt half the time); both are also scored
    against the prompt. A method that raises the judge's score but not the agreement is hacking the judge."""
    model, _ = load_model(ckpt, judge.model.device)
    rng = np.random.default_rng(seed)
    n_objects = 1 if model.config.max_text_len < world.MAX_TOKENS else None  # a --text_len base reads 1 object
    b = data.make_batch("t2i", n, model.config.image_size, judge.model.device, seed=seed, split="test",
                        n_objects=n_objects)
    noise = torch.randn(b.target.shape, generator=torch.Generator().manual_seed(seed)).to(b.target.device)
    x = euler(model, noise, model_inputs(b), steps).clamp(-1, 1)
    questions, tests = zip(*[ask(s, rng) for s in b.specs])
    vlm = judge.answer(x, list(questions)).tolist()
    parser = [test(scorer.parse(img)) for img, test in zip(x, tests)]
    truth = [test(s) for s, test in zip(b.specs, tests)]
    rate = lambda a, c: float(np.mean([u == v for u, v in zip(a, c)]))
    return dict(vlm_vs_parser=rate(vlm, parser), vlm_vs_prompt=rate(vlm, truth), parser_vs_prompt=rate(parser, truth))


@torch.no_grad()
def save_examples(judge, path, res, families=questions.FAMILIES, per_family=2):
    """A PNG: held-out images of every family (x4), the question, the judge's p(yes) and the true answer."""
    rows = []
    for f in families:
        v = questions.vqa_batch(f, per_family, res, judge.model.device, seed=123, split="test")
        p = judge.log_probs(v.images, v.questions, v.images2)[:, [judge.yes_id, judge.no_id]].softmax(1)[:, 0]
        for i in range(per_family):
            row = Image.new("RGB", (680, 128), "white")
            imgs = [v.images[i]] + ([v.images2[i]] if v.images2 is not None else [])
            row.paste(world.to_pil(torch.cat(imgs, 2)).resize((128 * len(imgs), 128), Image.NEAREST), (0, 0))
            verdict = "right" if (p[i] > 0.5) == bool(v.answers[i]) else "WRONG"
            ImageDraw.Draw(row).multiline_text((270, 40), f"[{f}] {v.questions[i]}\njudge: p(yes) = {p[i]:.2f}\n"
                                               f"truth: {'yes' if v.answers[i] else 'no'} -> {verdict}", fill="black")
            rows.append(row)
    sheet = Image.new("RGB", (680, 128 * len(rows)), "white")
    for i, r in enumerate(rows):
        sheet.paste(r, (0, 128 * i))
    sheet.save(path)


def step_loss(cfg, phase, net, seed, device, heads=None):
    """The loss of one training step: tower (with its TowerHeads) | caption | vqa (the VLM, a Judge) | alignment |
    aesthetic (the rewards)."""
    if phase == "tower" and heads.code is not None:  # the alignment data's scenes, in the world's own captions
        b, rng = data.make_batch("t2i", cfg.vlm_batch, cfg.res, device, seed=seed), np.random.default_rng(seed)
        return heads(net, b.target, b.specs, [world.caption(s, rng) for s in b.specs])
    if phase == "tower":
        images, _, scenes = caption_batch(cfg.vlm_batch, cfg.res, seed, device=device)
        return heads(net, images, scenes)
    if phase == "caption":
        return caption_loss(net, *caption_batch(cfg.vlm_batch, cfg.res, seed, device=device)[:2])
    if phase == "vqa":
        families = questions.FAMILIES if cfg.families == "all" else cfg.families.split(",")
        loss = vqa_step_loss(net, cfg.vlm_batch, cfg.res, seed, families, cfg.statement_weight, device,
                             family_batch(cfg))
        if cfg.vlm_rehearsal:  # without it, yes/no erases what captioning taught (held-out shape words: 0.70 -> 0.09)
            captions = caption_batch(cfg.vlm_batch // 2, cfg.res, seed, device=device)[:2]
            loss = loss + cfg.vlm_rehearsal * caption_loss(net, *captions)
        return loss
    if phase == "alignment":
        k = cfg.align_captions
        return alignment_loss(net, *alignment_batch(cfg.reward_batch, k, cfg.res, seed, device=device), k)
    return bt_loss(*map(net, aesthetic_batch(cfg.reward_batch, cfg.res, seed, device=device)))


def train_judge(cfg, env, kind, path):
    """Train the VLM (tower, captions, then questions) or a reward, save it to `path`, and return it frozen."""
    torch.manual_seed(cfg.seed)
    heads = None
    if kind == "vlm":
        model, processor = build_vlm(cfg.preset)
        net = Judge(model.to(env.device), processor, frozen=False)
        heads = TowerHeads(model.config.vision_config.hidden_size).to(env.device)
        phases = (("tower", cfg.vlm_tower_steps, cfg.vlm_tower_lr), ("caption", cfg.vlm_caption_steps, cfg.vlm_lr),
                  ("vqa", cfg.vlm_vqa_steps, cfg.vlm_lr))
    else:
        model = net = (Alignment(cfg.preset, cfg.res, cfg.align_pool) if kind == "alignment"
                       else Aesthetic(cfg.preset, cfg.res)).to(env.device)
        phases = ((kind, cfg.align_steps if kind == "alignment" else cfg.reward_steps, cfg.reward_lr),)
        if kind == "alignment":
            heads = TowerHeads(model.clip.config.vision_config.hidden_size,
                               model.clip.config.projection_dim if cfg.align_scene_code else 0).to(env.device)
            phases = (("tower", cfg.align_tower_steps, cfg.vlm_tower_lr),) + phases
    params = list(model.parameters()) + (list(heads.parameters()) if heads else [])
    opt = torch.optim.AdamW(params, lr=phases[0][2], weight_decay=0.0)
    print(f"training {kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          + ", ".join(f"{steps} {phase} steps" for phase, steps, _ in phases))
    for i, (phase, steps, lr) in enumerate(phases):
        if phase == "caption" and cfg.vlm_tower_frozen:
            model.model.vision_tower.requires_grad_(False)
        bar = tqdm(range(steps), desc=phase, disable=cfg.quiet)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, steps, lr, cfg.warmup)
            with env.ctx:
                loss = step_loss(cfg, phase, net, cfg.seed * 1_000_003 + 500_000 * i + step, env.device, heads)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 50 == 0 or step + 1 == steps:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if kind == "vlm":
        model.save_pretrained(path)
        processor.save_pretrained(path)
        return load_judge(path, env.device)
    model.eval().requires_grad_(False)
    with torch.no_grad():  # R = 0 halfway between preferred and rejected, so that -log sigmoid(R) means something
        better, worse = preference_pairs(model, kind, 256, cfg.res, seed=77_777, split="train")
        model.offset -= (better.mean() + worse.mean()) / 2
    save_checkpoint(path, kind=kind, preset=cfg.preset, res=cfg.res, state=model.state_dict(),
                    **(dict(pool=cfg.align_pool) if kind == "alignment" else {}))
    return model


# The recipe of the shared judges is Config's defaults: what `prerequisite` builds and caches under out/judges/<preset>/
# for the method scripts, and what that cache may hold (docs/judges.md has the measurements behind it).
RECIPE_FIELDS = ("res", "families", "vlm_tower_steps", "vlm_tower_lr", "vlm_tower_frozen", "vlm_caption_steps",
                 "vlm_vqa_steps", "statement_weight", "vlm_rehearsal", "vlm_batch", "vlm_family_batch", "vlm_lr",
                 "reward_steps", "reward_batch", "align_captions", "align_steps", "align_tower_steps", "align_pool",
                 "align_scene_code", "reward_lr", "warmup", "grad_clip", "seed")


def judge_path(cfg, kind):
    """Where judge `kind` is cached: --out, or out/judges/<preset>/ (the shared cache: the recipe's judges only)."""
    return os.path.join(cfg.out or f"out/judges/{cfg.preset}", "vlm" if kind == "vlm" else f"{kind}.pt")


def get_judge(cfg, kind, env=None):
    """The judge `kind` (vlm | alignment | aesthetic) cached at judge_path, trained first if missing; frozen."""
    env = env or setup(cfg)
    path = judge_path(cfg, kind)
    if os.path.exists(path) and not cfg.retrain:
        judge = load_judge(path, env.device) if kind == "vlm" else load_reward(path, env.device)
        if kind == "alignment" and judge.pool != cfg.align_pool:
            raise SystemExit(f"the cached alignment reward {path} pools its towers by {judge.pool!r}, not "
                             f"--align_pool={cfg.align_pool}: pass --retrain, or another --out")
        return judge
    return train_judge(cfg, env, kind, path)


def prerequisite(kind, preset="small", path="", device="auto", quiet=False):
    """A frozen judge for a method script: the one at `path` (it must exist: a path the user named is never
    trained), else the shared recipe's under out/judges/<preset>/, trained now if missing."""
    if path:
        if not os.path.exists(path):
            raise SystemExit(f"missing judge: {path} (leave the option out to use, or train, the {preset} recipe's "
                             f"{kind})")
        device = setup(Config(device=device)).device
        judge = load_judge(path, device) if kind == "vlm" else load_reward(path, device)
        if kind != "vlm" and not isinstance(judge, Alignment if kind == "alignment" else Aesthetic):
            raise SystemExit(f"{path} is a {type(judge).__name__.lower()} reward, not the {kind} one")
        return judge
    return get_judge(Config(preset=preset, device=device, quiet=quiet), kind)


def main(cfg):
    check_config(cfg)
    env, what, out = setup(cfg), cfg.what.split(","), dict(preset=cfg.preset)
    families = questions.FAMILIES if cfg.families == "all" else tuple(cfg.families.split(","))
    judges = {kind: get_judge(cfg, kind, env) for kind in what}  # trained or loaded before anything is written
    os.makedirs(cfg.results, exist_ok=True)
    if "vlm" in what:
        judge = judges["vlm"]
        out["vlm"] = vqa_accuracy(judge, cfg.eval_n, cfg.res, families=families)
        print("VLM yes/no accuracy, held-out scenes: " + "  ".join(f"{k} {v:.3f}" for k, v in out["vlm"].items()))
        save_examples(judge, os.path.join(cfg.results, "judges.png"), cfg.res, families)
        if cfg.agreement_ckpt:
            out["agreement"] = agreement(judge, cfg.agreement_ckpt)
            print("on generated images: " + "  ".join(f"{k} {v:.3f}" for k, v in out["agreement"].items()))
    if "alignment" in what:
        reward = judges["alignment"]
        out["alignment_retrieval_8"] = retrieval_accuracy(reward, cfg.eval_n, cfg.res)
        out["alignment_pairwise"] = pairwise_by_change(reward, cfg.eval_n, cfg.res)
        print(f"alignment: image -> caption among 8, one attribute apart: {out['alignment_retrieval_8']:.3f}; "
              "against one change: " + "  ".join(f"{k} {v:.3f}" for k, v in out["alignment_pairwise"].items()))
    if "aesthetic" in what:
        out["aesthetic_pairwise"] = pairwise_accuracy(judges["aesthetic"], cfg.eval_n, cfg.res)
        print(f"aesthetic: pairwise accuracy on held-out pairs: {out['aesthetic_pairwise']:.3f}")
    path = os.path.join(cfg.results, "judges.json")  # judges measured earlier (same preset) keep their figures
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    if "vlm" in out:
        old.pop("agreement", None)  # it belongs to the VLM measured before this one
    out = {**old, **out} if old.get("preset") == cfg.preset else out
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    return out


if __name__ == "__main__":
    main(parse_config(Config()))
