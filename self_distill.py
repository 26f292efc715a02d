"""Diffusion Self-Distillation: a text-to-image model makes its own paired data and becomes image+text -> image.

    python self_distill.py                                 # every stage and every row of the table
    python self_distill.py --rows=dsd,text                 # some rows (the data stages run as needed)
    python self_distill.py --n_grids=512 --steps=100       # a quicker, rougher run

Cai et al. 2025, "Diffusion Self-Distillation for Zero-Shot Customized Image Generation" (METHODS.md section 3).
Stages, each cached under --out (a partial one continues) and each printing what it made and how long it took:
  1. prompts: "two images of the same <subject> at <context>", subjects and contexts drawn by the world's grammar;
  2. grids: the grid model (train.py's grid recipe: the base taught two-panel grids) draws each prompt; the left and
     right panels are cropped into a (reference, target) pair. The scorer measures how often a pair really shows one
     subject; nothing downstream reads that;
  3. curation: the frozen VLM asks "are these the same object ?" of the two panels and keeps the pairs whose
     p(yes) > --threshold; the target's caption is the context the prompt asked for ("this object at the top left ,
     navy background"), its words about the subject dropped;
  4. fine-tune ("parallel processing", the paper's design): a two-panel canvas, the reference added to the left
     panel's noisy tokens through a zero-initialised projection (the DiT's pixel-aligned input, re-zeroed), both
     panels denoised with the loss on both, the right panel the output; LoRA on the DiT blocks, the projection in full.
Rows, on subjects never drawn in any grid (the world's held-out colour-shape pairs) and on seen ones: DSD; the same
on uncurated pairs and with a noisier curator; channel concatenation and extra reference tokens on the same data;
the grid model given a text description of the subject; a per-instance LoRA on the one reference (DreamBooth-LoRA);
the parallel design trained on the world's true pairs (upper bound). Scores: concept preservation (the subject's
shape, two colours and pattern), prompt following (cell and background), their product, and a de-biased CP that is
0 when the output copies the reference's context (scorer.score("customize")).
"""
import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import scorer
import world
from common import (check_config, command_flags, ema_update, load_checkpoint, option, parse_config, resume_problem,
                    save_checkpoint, setup, step_generator, wants_cuda)
from evaluate import plain_name_problem, write_results
from grids import (consistent, curated, draw_grids, grid_prompts, p_same, panels, precision_recall, read_cache,
                   target_tokens)
from judges import prerequisite as judge_prerequisite
from model import DiT, PRESETS, add_lora, lora_parameters
from sample import euler, interpolate, timesteps, velocity_target
from train import preset_model_config, prerequisite

ROWS = ("dsd", "uncurated", "noisy", "concat", "tokens", "text", "lora", "truth")
TRAINED = {"dsd": "parallel", "uncurated": "parallel", "noisy": "parallel", "truth": "parallel",
           "concat": "concat", "tokens": "tokens"}  # fine-tuned rows and their architecture
EVAL_SEED = 10_000
RESUME_SAME = ("preset", "n_grids", "grid_cfg", "sample_steps", "threshold", "curator_noise", "seed", "lora_rank",
               "lr", "ref_lr", "batch_size", "ema", "ref_drop", "text_drop")  # a resumed row keeps its data and recipe


@dataclass
class Config:
    preset: str = option("auto", choices=("auto",) + tuple(PRESETS))  # tiny | small | base (auto = base on CUDA,
                                   # small on the CPU)
    base: str = option("", path="file")  # the grid-capable T2I model ("" = train.py's grid recipe beside
                                   # out/<preset>/base/ckpt.pt, built if missing)
    judge: str = option("", path="exists")  # the curator, a local transformers VLM ("" = out/judges/<preset>/vlm)
    rows: str = option(",".join(ROWS), each=ROWS)  # table rows: dsd | uncurated | noisy | concat | tokens | text |
                                   # lora (per instance) | truth
    out: str = option("", path="dir")  # stage caches and row checkpoints ("" = out/<preset>/self_distill)
    resume: bool = False           # continue each row's ckpt.pt to `steps` (a finished one is only evaluated)
    n_grids: int = option(2048, low=1)  # prompts, grids and candidate pairs
    grid_cfg: float = option(1.0, low=1)  # guidance scale the grid model draws with
    threshold: float = option(0.5, above=0, high=1)  # the curator keeps a pair when p(same) > threshold
    curator_noise: float = option(0.3, low=0, high=1)  # row noisy: each curator decision flipped with this chance
    steps: int = option(600, low=1)  # fine-tune optimizer steps per row
    stop_at: int = option(0, low=0)  # stop (and checkpoint) after this step, as an interrupted run would (0 = steps)
    batch_size: int = option(32, low=1)  # pairs per step
    lr: float = option(1e-3, above=0)  # AdamW learning rate, constant
    ref_lr: float = option(0.0, low=0)  # learning rate of the new reference input (the projection; 0 = --lr)
    lora_rank: int = option(0, low=0)  # LoRA rank on the DiT blocks (0 = fine-tune every weight)
    ema: float = option(0.99, low=0, high=1)  # EMA decay of the fine-tuned weights, which are the ones evaluated
    ref_drop: float = option(0.1, low=0, high=1)  # chance of training without the reference (image CFG)
    text_drop: float = option(0.1, low=0, high=1)  # chance of training without the caption (text CFG)
    cfg_image: float = option(1.0, low=0)  # s_i of image+text CFG (1 and cfg_text 1: no guidance, one call)
    cfg_text: float = option(1.0, low=0)  # s_t: v = v_none + s_i (v_img - v_none) + s_t (v_img,txt - v_img)
    sample_steps: int = option(16, low=1)  # Euler steps of the grid model and of every row
    eval_n: int = option(128, low=1)  # references per subject split in the table
    instance_n: int = option(16, low=0)  # row lora: references with a LoRA of their own (the first eval ones)
    instance_steps: int = option(100, low=1)  # row lora: steps on its one reference
    log_every: int = option(50, low=1)  # steps between log lines
    ckpt_every: int = option(100, low=1)  # steps between checkpoints (and one at the end)
    name: str = "self_distill"     # results/self_distill/<name>.md, .json and .png
    seed: int = option(0, low=0)   # everything random is a function of (seed, step)
    device: str = option("auto", choices=("auto", "cpu", "cuda"), device=True)  # auto | cpu | cuda
    compile: str = option("auto", choices=("auto", "on", "off"))  # auto (= on for CUDA) | on | off
    quiet: bool = False            # no progress bars

    def check(self):
        yield plain_name_problem(self.name, "self_distill")
        yield f"{self.judge} is not a saved transformers model (no config.json)" \
            if self.judge and not os.path.isfile(os.path.join(self.judge, "config.json")) else ""
        cfg = resolve(self)
        yield f"--stop_at={cfg.stop_at} is beyond --steps={cfg.steps}" if cfg.stop_at > cfg.steps else ""
        for row in (r for r in cfg.rows.split(",") if r in TRAINED):
            yield resume_problem(os.path.join(cfg.out, row, "ckpt.pt"), cfg, RESUME_SAME)


def resolve(cfg):
    """cfg with --preset=auto resolved (base on CUDA, small on the CPU) and the default --out."""
    name = cfg.preset if cfg.preset != "auto" else "base" if wants_cuda(cfg.device) else "small"
    return dataclasses.replace(cfg, preset=name, out=cfg.out or os.path.join("out", name, "self_distill"))


# ----------------------------------------------------------------------------- stage 4: the fine-tune
def adapted(mcfg, state, arch, rank, seed=0):
    """The grid model with a trainable reference input: for parallel and concat the pixel-aligned projection
    (cond_embedder), re-zeroed, so that at step 0 the model is the grid model exactly; for tokens the reference-token
    embedder and its type embedding. rank > 0: a fresh LoRA on the DiT blocks and the rest frozen (the paper's);
    rank 0: every weight trainable (docs/self_distill.md: what LoRA did here)."""
    torch.manual_seed(seed)                                                        # the LoRA init
    model = DiT(mcfg)
    model.load_state_dict(state)
    torch.nn.init.zeros_(model.cond_embedder.weight), torch.nn.init.zeros_(model.cond_embedder.bias)
    if not rank:
        return model.requires_grad_(True)
    add_lora(model, rank, parts=("blocks",), trainable=("ref_embedder",) if arch == "tokens" else ("cond_embedder",))
    model.ref_type.requires_grad_(arch == "tokens")
    return model


def inputs(arch, ref, tokens, text=None):
    """The model's keyword inputs for a reference (B, 3, H, W) under `arch` (a zero reference = none)."""
    zeros = torch.zeros_like(ref[:, :1])
    cond = {"parallel": lambda: torch.cat([torch.cat([ref, torch.zeros_like(ref)], -1),
                                           torch.cat([zeros, zeros], -1)], 1),   # the left panel only
            "concat": lambda: torch.cat([ref, zeros], 1), "tokens": lambda: None}[arch]()
    return dict(task=torch.zeros(len(ref), dtype=torch.long, device=ref.device), tokens=tokens, cond=cond,
                ref=ref if arch == "tokens" else None, text=text)


def canvas(arch, ref, target):
    """What the model denoises: both panels side by side for parallel, the target alone otherwise."""
    return torch.cat([ref, target], -1) if arch == "parallel" else target


def dsd_loss(model, arch, ref, target, tokens, noise):
    """Flow matching on the canvas (for parallel: the reference rebuilt on the left, the target on the right)."""
    drop_ref, drop_text = noise["drop_ref"][:, None, None, None], noise["drop_text"][:, None]
    x0 = canvas(arch, ref, target)
    x_t = interpolate(x0, noise["eps"], noise["t"])
    v = model(x_t, noise["t"], **inputs(arch, torch.where(drop_ref, 0, ref), torch.where(drop_text, 0, tokens)))
    return F.mse_loss(v.float(), velocity_target(x0, noise["eps"]))


def step_noise(cfg, step, shape, device):
    gen = step_generator(cfg.seed, step, salt=1)
    return dict(t=torch.randn(shape[0], generator=gen).sigmoid().to(device),     # logit-normal, as the base's
                eps=torch.randn(shape, generator=gen).to(device),
                drop_ref=(torch.rand(shape[0], generator=gen) < cfg.ref_drop).to(device),
                drop_text=(torch.rand(shape[0], generator=gen) < cfg.text_drop).to(device))


def finetune(cfg, env, mcfg, state, arch, pairs, ckpt_path, log=None):
    """Stage 4 for one row: `pairs` (ref, target, tokens) drawn batch_size at a time; checkpoints, --resume.
    Returns the model, the training seconds (across resumes) and the last step."""
    model = adapted(mcfg, state, arch, cfg.lora_rank, cfg.seed).to(env.device).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    ema = copy.deepcopy(model).eval().requires_grad_(False)                       # what is sampled and scored
    new = [n for n in trainable if n.startswith(("cond_embedder", "ref_"))]        # the reference input
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([dict(params=[params[n] for n in trainable if n not in new]),
                             dict(params=[params[n] for n in new], lr=cfg.ref_lr or cfg.lr)], lr=cfg.lr,
                            weight_decay=0.0, fused=env.device.type == "cuda")
    start, before = 0, 0.0
    if ckpt_path and cfg.resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, mcfg)
        model.load_state_dict(ck["trained"], strict=False), ema.load_state_dict(ck["ema"], strict=False)
        opt.load_state_dict(ck["opt"])
        start, before = ck["step"], ck["seconds"]
    train_model = torch.compile(model) if env.compile else model
    end, t0 = min(cfg.steps, cfg.stop_at or cfg.steps), time.time()
    ref, target, tokens = pairs

    def save(step):
        pick = lambda m: {k: v for k, v in m.state_dict().items() if k in params}  # noqa: E731
        save_checkpoint(ckpt_path, trained=pick(model), ema=pick(ema), opt=opt.state_dict(), step=step, arch=arch,
                        seconds=before + time.time() - t0, config=dataclasses.asdict(cfg),
                        model_config=dataclasses.asdict(mcfg))

    for step in tqdm(range(start, end), initial=start, total=cfg.steps, disable=cfg.quiet, desc=arch):
        if ckpt_path and step > start and step % cfg.ckpt_every == 0:             # checkpoint
            save(step)
        pick = torch.randint(len(ref), (cfg.batch_size,), generator=step_generator(cfg.seed, step))  # batch
        r, x, tok = (v[pick].to(env.device) for v in (ref, target, tokens))
        noise = step_noise(cfg, step, canvas(arch, r, x).shape, env.device)
        with env.ctx:                                                              # forward under ctx
            loss = dsd_loss(train_model, arch, r, x, tok, noise)
        loss.backward()                                                            # backward, clip, step
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, cfg.ema)
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == end):
            log.write(json.dumps(dict(step=step + 1, loss=loss.item(), grad_norm=grad_norm.item(),
                                      minutes=(time.time() - t0) / 60)) + "\n")
            log.flush()
    if ckpt_path:
        save(end)
    return ema, before + time.time() - t0, end


@torch.no_grad()
def customize(model, arch, ref, tokens, noise, steps, s_img=1.0, s_txt=1.0):
    """Image+text -> image by Euler sampling; image+text CFG v = v_none + s_i (v_img - v_none) + s_t (v_img,txt -
    v_img) when s_i or s_t is not 1. noise: the canvas's (B, 3, H, 2H) for parallel; single-panel rows take its right
    half. Returns the output panel (B, 3, H, H)."""
    ts, x = timesteps(steps, device=ref.device), noise if arch == "parallel" else panels(noise)[1]
    guided = s_img != 1 or s_txt != 1
    refs = torch.cat([ref, ref, torch.zeros_like(ref)]) if guided else ref        # img+txt, img, none
    toks = torch.cat([tokens, torch.zeros_like(tokens), torch.zeros_like(tokens)]) if guided else tokens
    cond = inputs(arch, refs, toks, model.encode_text(toks))
    for i in range(steps):
        v = model(torch.cat([x] * (3 if guided else 1)), ts[i].expand(len(refs)), **cond)
        if guided:
            v_all, v_img, v_none = v.chunk(3)
            v = v_none + s_img * (v_img - v_none) + s_txt * (v_all - v_img)
        x = x + (ts[i + 1] - ts[i]) * v
    return (panels(x)[1] if arch == "parallel" else x).clamp(-1, 1)


# ----------------------------------------------------------------------------- the baselines without image input
@torch.no_grad()
def from_text(model, batch, noise, steps, text_len):
    """The grid model told the subject in words: "two images of the same <subject> at <context>", right panel."""
    rng = np.random.default_rng(0)
    tokens = world.tokenize([world.caption(world.Grid([r, s]), rng) for r, s in zip(batch.sources, batch.specs)],
                            text_len).to(noise.device)
    return panels(t2i(model, tokens, noise, steps))[1]


def t2i(model, tokens, noise, steps):
    """Plain Euler text-to-image from `noise` (any canvas)."""
    return euler(model, noise, dict(task=torch.zeros(len(noise), dtype=torch.long, device=noise.device),
                                    tokens=tokens), steps).clamp(-1, 1)


def instance_lora(cfg, env, mcfg, state, ref, ref_scene, target_scene, noise):
    """DreamBooth-LoRA: a fresh LoRA tuned on the one reference, captioned "this object at the center <background>"
    (the identifier "this object"), then asked for the new context. Returns (output (1, 3, H, H), seconds)."""
    t0 = time.time()
    model = adapted(mcfg, state, "concat", cfg.lora_rank or 16, cfg.seed).to(env.device).train()  # always a LoRA
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    own, new = world.tokenize([data.context_text(s, np.random.default_rng(0)) for s in (ref_scene, target_scene)],
                              mcfg.max_text_len).to(env.device)
    n = min(8, cfg.batch_size)
    for step in range(cfg.instance_steps):
        gen = step_generator(cfg.seed, step, salt=2)
        t, eps = torch.randn(n, generator=gen).sigmoid().to(env.device), torch.randn(n, *ref.shape[1:],
                                                                                      generator=gen).to(env.device)
        x0 = ref.expand(n, -1, -1, -1)
        with env.ctx:
            v = model(interpolate(x0, eps, t), t, task=torch.zeros(n, dtype=torch.long, device=env.device),
                      tokens=own[None].expand(n, -1))
            loss = F.mse_loss(v.float(), velocity_target(x0, eps))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.time() - t0
    return t2i(model.eval(), new[None], panels(noise)[1], cfg.sample_steps), seconds


# ----------------------------------------------------------------------------- evaluation and the run
def eval_batch(split, n, res, text_len):
    """n customisation references and targets, captioned as the fine-tune's targets are (grids.target_tokens):
    split heldout = subjects of the world's held-out colour-shape pairs, which no grid prompt (train split) ever
    draws; test = subjects of the kind the grids drew."""
    b = data.make_batch("customize", n, res, seed=EVAL_SEED, split=split, text_len=text_len)
    return dataclasses.replace(b, tokens=target_tokens(b.specs, text_len, EVAL_SEED))


def score(images, batch):
    m, _ = scorer.score("customize", images, batch)
    n = len(images)
    return dict(m, se=float(np.sqrt(m["concept_x_prompt"] * (1 - m["concept_x_prompt"]) / n)), n=n)


def pairs_of(row, cfg, grids, context, keep):
    """The (ref, target, tokens) a fine-tuned row trains on."""
    if row == "truth":  # the world's own pairs, as many as the grids made
        b = data.make_batch("customize", cfg.n_grids, grids.shape[-2], seed=cfg.seed, text_len=context.shape[1])
        return b.ref, b.target, target_tokens(b.specs, context.shape[1], cfg.seed)
    left, right = panels(grids)
    k = {"dsd": keep["curated"], "concat": keep["curated"], "tokens": keep["curated"], "noisy": keep["noisy"],
         "uncurated": torch.ones(len(grids), dtype=torch.bool)}[row]
    return left[k], right[k], context[k]


def train(cfg):
    check_config(cfg)
    cfg = resolve(cfg)
    env = setup(cfg)
    run, t_start = dict(device=cfg.device, compile=cfg.compile, quiet=cfg.quiet), time.time()
    if not cfg.base:  # the grid recipe fine-tunes the shared base: both cached under out/<preset>/base
        cfg = dataclasses.replace(cfg, base=prerequisite(cfg.preset, "grid", base=prerequisite(cfg.preset, "base",
                                                                                                  **run), **run))
    mcfg = preset_model_config(cfg.base, cfg.preset)
    state = load_checkpoint(cfg.base, mcfg)["ema"]
    grid_model = DiT(mcfg)
    grid_model.load_state_dict(state)
    grid_model = grid_model.to(env.device).eval()
    os.makedirs(cfg.out, exist_ok=True)
    print(f"prerequisites (grid model {cfg.base}) ready at {time.time() - t_start:.0f} s")
    made = paired_data(cfg, env, grid_model, mcfg)                                # stages 1-3
    res, L = mcfg.image_size, mcfg.max_text_len
    splits = {s: eval_batch(s, cfg.eval_n, res, L) for s in ("heldout", "test")}
    noise = {s: torch.randn(cfg.eval_n, 3, res, 2 * res, generator=torch.Generator().manual_seed(EVAL_SEED + k))
             .to(env.device) for k, s in enumerate(splits)}
    results, outputs = {}, {}
    for row in cfg.rows.split(","):                                                # stage 4 and the rows
        t0 = time.time()
        got = row_outputs(row, cfg, env, mcfg, state, grid_model, made, splits, noise)
        if got is None:  # stopped early (--stop_at), or no per-instance LoRA asked for
            continue
        outputs[row], seconds, n_pairs = got
        results[row] = {s: score(v, subset(splits[s], len(v))) for s, v in outputs[row].items()}
        results[row].update(train_s=seconds, pairs=n_pairs, minutes=(time.time() - t0) / 60)
        print(f"row {row}: " + ", ".join(f"{s} CPxPF {r['concept_x_prompt']:.3f}" for s, r in results[row].items()
                                         if isinstance(r, dict)) + f" ({results[row]['minutes']:.1f} min)")
    if "lora" in results:  # the other rows on the per-instance LoRA's references, for a like-for-like comparison
        k = results["lora"]["heldout"]["n"]
        for row in (r for r in ("dsd", "text") if r in outputs):
            results[f"{row}, first {k}"] = {s: score(outputs[row][s][:k], subset(splits[s], k)) for s in splits}
    lines = table(cfg, results, made["stats"], made["curation"], time.time() - t_start)
    write_results(f"self_distill/{cfg.name}", lines, dict(config=dataclasses.asdict(cfg), results=results,
                                                          grids=made["stats"], curation=made["curation"]))
    save_png(f"results/self_distill/{cfg.name}.png", splits["heldout"], outputs)
    return results


def paired_data(cfg, env, grid_model, mcfg):
    """Stages 1-3: prompts, grids (and what the scorer finds in them), the curator's p(same) and decisions."""
    res, L = mcfg.image_size, mcfg.max_text_len
    prompts, context = grid_prompts(cfg.n_grids, res, cfg.seed, L)
    t0 = time.time()
    grids = draw_grids(cfg, env, grid_model, prompts, os.path.join(cfg.out, "grids.pt"))
    left, right = panels(grids)
    seconds, t0 = dict(grids=time.time() - t0), time.time()
    truth = consistent(left, right)
    asked = consistent(world.render([g.panels[0] for g in prompts.specs], res), left)  # drew the prompt's subject
    stats = dict(consistent=truth.float().mean().item(), left_is_prompt=asked.float().mean().item(), seconds=seconds)
    seconds["scorer"] = time.time() - t0
    print(f"grids, by the scorer ({time.time() - t0:.0f} s): {stats['consistent']:.3f} show one subject in both "
          f"panels; the left panel is the prompt's subject in {stats['left_is_prompt']:.3f}")
    out = dict(grids=grids, context=context, stats=stats, curation={}, keep={})
    if not any(r in TRAINED and r not in ("truth", "uncurated") for r in cfg.rows.split(",")):
        return out
    judge = judge_prerequisite("vlm", "tiny" if cfg.preset == "tiny" else "small", cfg.judge, cfg.device, cfg.quiet)
    t0, path = time.time(), os.path.join(cfg.out, "curation.pt")
    key = dict(base=cfg.base, n=cfg.n_grids, seed=cfg.seed, steps=cfg.sample_steps, cfg=cfg.grid_cfg,
               judge=cfg.judge or "default")                                       # the grids' key, and the judge
    cache = read_cache(path, key) or dict(key=key, p=p_same(judge, left.to(env.device), right.to(env.device)))
    save_checkpoint(path, **cache)
    out["p"] = p = cache["p"]
    out["keep"] = dict(curated=curated(cfg, p), noisy=curated(cfg, p, cfg.curator_noise))
    out["curation"] = {k: precision_recall(v, truth) for k, v in out["keep"].items()}
    out["curation"]["sweep"] = {f"{th:.2f}": precision_recall(p > th, truth) for th in (.1, .3, .5, .7, .9, .97)}
    c, seconds["curation"] = out["curation"]["curated"], time.time() - t0
    print(f"stage curation: {len(p)} pairs in {time.time() - t0:.0f} s; kept {c['kept']:.3f}, precision "
          f"{c['precision']:.3f}, recall {c['recall']:.3f}")
    return out


def row_outputs(row, cfg, env, mcfg, state, grid_model, made, splits, noise):
    """One row's outputs on every split ({split: (n, 3, H, H)}), its training seconds and pairs; None if it has
    none (stopped by --stop_at, or --instance_n=0)."""
    if row == "text":
        return {s: from_text(grid_model, b, noise[s], cfg.sample_steps, mcfg.max_text_len).cpu()
                for s, b in splits.items()}, 0.0, 0
    if row == "lora":  # one LoRA per reference, the first instance_n of each split
        k, out, seconds = min(cfg.instance_n, cfg.eval_n), {}, 0.0
        if not k:
            return None
        for s, b in splits.items():
            done = [instance_lora(cfg, env, mcfg, state, b.ref[j:j + 1].to(env.device), b.sources[j],
                                  b.specs[j], noise[s][j:j + 1]) for j in range(k)]
            out[s], seconds = torch.cat([d[0] for d in done]).cpu(), seconds + sum(d[1] for d in done) / k / 2
        return out, seconds, 1
    pairs = pairs_of(row, cfg, made["grids"], made["context"], made["keep"])
    if not len(pairs[0]):
        raise SystemExit(f"row {row}: the curator kept none of {cfg.n_grids} pairs (p(same) <= "
                         f"--threshold={cfg.threshold}): lower --threshold, or give a better --judge")
    with open(os.path.join(cfg.out, f"{row}_log.jsonl"), "a") as log:
        model, seconds, end = finetune(cfg, env, mcfg, state, TRAINED[row], pairs,
                                       os.path.join(cfg.out, row, "ckpt.pt"), log)
    if end < cfg.steps:
        return None
    return {s: customize(model, TRAINED[row], b.ref.to(env.device), b.tokens.to(env.device), noise[s],
                         cfg.sample_steps, cfg.cfg_image, cfg.cfg_text).cpu() for s, b in splits.items()}, \
        seconds, len(pairs[0])


def subset(batch, k):
    return dataclasses.replace(batch, text=batch.text[:k], tokens=batch.tokens[:k], target=batch.target[:k],
                               ref=batch.ref[:k], specs=batch.specs[:k], sources=batch.sources[:k])


NAMES = {"dsd": "DSD, curated pairs", "uncurated": "DSD, uncurated pairs", "noisy": "DSD, noisier curator",
         "concat": "channel concatenation", "tokens": "reference as extra tokens",
         "text": "grid model, subject in words",
         "lora": "per-instance LoRA", "truth": "upper bound: true pairs"}


def table(cfg, results, stats, curation, seconds):
    head = (f"Diffusion Self-Distillation, preset {cfg.preset}: {cfg.n_grids} grids from {cfg.base}; fine-tunes of "
            f"{cfg.steps} steps x {cfg.batch_size} pairs, LoRA rank {cfg.lora_rank} + the reference input in full, "
            f"lr {cfg.lr}; {cfg.sample_steps} Euler steps, CFG image {cfg.cfg_image} text {cfg.cfg_text}. "
            f"{cfg.eval_n} references per split: held-out subjects (colour-shape pairs no grid drew) and seen "
            f"ones. CP = concept preserved (shape, both colours, pattern), PF = prompt followed (cell, background), "
            f"CP debiased = CP of outputs that do not copy the reference's context; +- one standard error. "
            f"{time.strftime('%H:%M:%S', time.gmtime(seconds))} wall. Command: `python self_distill.py "
            f"{command_args(cfg)}`")
    noisy = curation.get("noisy", {})
    lines = [head, "", f"Grids: {stats['consistent']:.3f} of the pairs show one subject in both panels (scorer); the "
             f"left panel is the prompt's subject in {stats['left_is_prompt']:.3f}."]
    if curation:
        c = curation["curated"]
        lines += [f"Curation (p(same) > {cfg.threshold}): kept {c['kept']:.3f}, precision {c['precision']:.3f}, "
                  f"recall {c['recall']:.3f}; the noisier curator (decisions flipped at {cfg.curator_noise}): "
                  f"precision {noisy['precision']:.3f}, recall {noisy['recall']:.3f}. Threshold sweep (precision / "
                  f"recall / kept): " + ", ".join(f"{t}: {r['precision']:.2f} / {r['recall']:.2f} / {r['kept']:.2f}"
                                                  for t, r in curation["sweep"].items())]
    lines += ["", "| row | pairs | held-out CP | PF | CP x PF | CP debiased | seen CP | PF | CP x PF | CP debiased "
                  "| train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        cells = [f"{r[s]['concept']:.3f} | {r[s]['prompt']:.3f} | {r[s]['concept_x_prompt']:.3f} +- {r[s]['se']:.3f} "
                 f"| {r[s]['concept_debiased']:.3f}" for s in ("heldout", "test")]
        name = NAMES.get(row, NAMES.get(row.split(",")[0], row) + "," + row.split(",", 1)[-1] if "," in row else row)
        lines.append(f"| {name} | {r.get('pairs', '') or ''} | {cells[0]} | {cells[1]} | {r.get('train_s', 0):.0f} |")
    return lines


def save_png(path, batch, outputs, n=8):
    """References, then each row's outputs from the same noise, then the truth: held-out subjects."""
    n = min([n] + [len(v["heldout"]) for v in outputs.values()])
    rows = [batch.ref[:n]] + [v["heldout"][:n] for v in outputs.values()] + [batch.target[:n]]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    world.to_pil(torch.cat([torch.cat(list(r), 2) for r in rows], 1)).save(path)
    print(f"wrote {path}: rows reference, {', '.join(outputs)}, truth")


def command_args(cfg):
    return command_flags(cfg, resolve(Config(device=cfg.device, preset=cfg.preset)), skip=("base",))


if __name__ == "__main__":
    train(parse_config(Config()))
