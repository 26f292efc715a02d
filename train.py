"""Flow-matching training of the base model, the expert teachers and the joint model; the shared models' recipes.

    python train.py --task=t2i                                          # a text-to-image model from scratch
    python train.py --task=local_edit --init_from=out/base/ckpt.pt      # an expert teacher (SFT on one task)
    python train.py --task=joint                                        # one model on the union of tasks
    torchrun --nproc_per_node=2 train.py --task=t2i                     # several processes (PyTorch DDP)

Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2023; SD3, Esser et al. 2024): draw t, noise
the target x_t = (1 - t) x0 + t eps, regress the model's velocity on eps - x0 (MSE). Captions are dropped
with probability `cond_drop` so classifier-free guidance works at sampling time (Ho & Salimans 2022).

The shared models the method scripts start from (the base, one expert per task, joint SFT) have one recipe per preset
(`RECIPES`) and one home under out/<preset>/; `prerequisite` returns a cached one or builds it with this file's
`train`, so two scripts can never build two different out/<preset>/base/ckpt.pt (docs/base.md: why this recipe).
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import world
from common import (check_config, cosine_lr, ema_update, load_checkpoint, model_inputs, option, parse_config, peek,
                    save_checkpoint, setup, step_generator)
from evaluate import evaluate_task
from model import PRESETS, DiT, DiTConfig, preset
from sample import euler, interpolate, velocity_target


@dataclass
class Config:
    task: str = option("t2i", choices=data.TASKS + ("joint",))  # t2i | local_edit | ... | customize | joint
    joint_tasks: str = option("t2i,local_edit,global_edit", each=data.TASKS)  # the union --task=joint trains on
    preset: str = option("small", choices=tuple(PRESETS))  # model preset (model.PRESETS): tiny | small | base
    pooled_text: bool = False      # model option: the caption's mean word feature joins the adaLN vector (docs/base.md)
    text_len: int = option(0, low=0, high=world.MAX_TOKENS)  # model option: caption tokens the model reads (0 =
                                   # world.MAX_TOKENS = 48); 24 (world.ONE_OBJECT_TOKENS) holds every 1-object
                                   # caption and edit instruction
    one_edit_token: bool = False   # model option: local and global edits share one task token (world option,
                                   # docs/danceopd.md); pass it again when fine-tuning such a model
    edit_data: str = option("clean", choices=tuple(data.EDIT_DATA))  # world option: clean | pipeline (edit targets
                                   # blurred, noisy and misregistered as generated edit datasets are: data.EDIT_DATA)
    init_from: str = option("", path="file")  # checkpoint to fine-tune from ("" = train from scratch)
    manifest: str = option("", path="file")  # your own pairs: a JSONL or CSV manifest (data.load_manifest) instead
                                   # of the world's; every step draws its batch from the rows of the step's task
    out: str = option("out/base", path="dir", required=True)  # run directory: ckpt.pt, log.jsonl, samples.png
    resume: bool = False           # continue out/ckpt.pt to `steps`
    steps: int = option(4000, low=1)  # optimizer steps (the learning-rate schedule spans these)
    stop_at: int = option(0, low=0)  # stop (and checkpoint) after this step, as an interrupted run would (0 = steps)
    batch_size: int = option(32, low=1)  # global batch (split across DDP processes)
    lr: float = option(1e-3, above=0)  # peak AdamW learning rate
    warmup: int = option(100, low=1)  # linear warm-up steps
    min_lr: float = option(0.05, low=0, high=1)  # cosine decay ends at min_lr * lr
    weight_decay: float = option(0.0, low=0)  # AdamW weight decay
    grad_clip: float = option(1.0, above=0)  # max global grad norm
    ema: float = option(0.995, low=0, high=1)  # EMA decay of the weights we sample and evaluate with
    t_sampling: str = option("uniform", choices=("uniform", "logit_normal"))  # training times t: uniform |
                                   # logit_normal (sigmoid of N(0, 1), SD3's mid-noise bias)
    cond_drop: float = option(0.1, low=0, high=1)  # probability of an empty caption (classifier-free guidance)
    grid_rate: float = option(0.1, low=0, high=1)  # fraction of t2i steps whose batch is two-panel subject grids
                                   # ("two images of the same ...", (res, 2 res) canvases: data.grid)
    n_objects: int = option(0, low=0, high=3)  # objects per t2i/inpaint/outpaint scene (0 = 1-3 at random)
    sample_steps: int = option(16, low=1)  # Euler steps for samples and the end-of-run evaluation
    cfg_scale: float = 1.0         # guidance scale for samples and evaluation
    eval_n: int = option(128, low=0)  # test examples scored at the end (0 = skip)
    log_every: int = option(50, low=1)  # steps between log lines (the only place losses leave the device)
    ckpt_every: int = option(1000, low=1)  # steps between checkpoints (and one at the end)
    seed: int = option(0, low=0)   # everything random is a function of (seed, step)
    device: str = option("auto", choices=("auto", "cpu", "cuda"), device=True)  # auto | cpu | cuda
    compile: str = option("auto", choices=("auto", "on", "off"))  # auto (= on for CUDA) | on | off
    precision: str = option("auto", choices=("auto", "fp32"))  # auto (= bf16 autocast on CUDA, fp32 on the CPU)
    quiet: bool = False            # no progress bar

    def check(self):
        """The relations between options, before anything is built: one problem per line."""
        ckpt = os.path.join(self.out, "ckpt.pt")
        scenes = [t for t in self.tasks() if t in ("t2i", "inpaint", "outpaint")]  # 1-3 objects unless n_objects
        yield f"--stop_at={self.stop_at} is beyond --steps={self.steps}" if self.stop_at > self.steps else ""
        yield (f"--text_len={self.text_len} is shorter than the longest edit instruction or one-object caption: use "
               f"{world.ONE_OBJECT_TOKENS} or more") if 0 < self.text_len < world.ONE_OBJECT_TOKENS else ""
        yield (f"--text_len={self.text_len} is too short for the {scenes[0]} captions of 2- and 3-object scenes: add "
               f"--n_objects=1") if 0 < self.text_len < world.MAX_TOKENS and scenes and self.n_objects != 1 else ""
        if self.resume and not os.path.exists(ckpt):
            yield f"--resume: there is no {ckpt} to continue (leave --resume out to start it)"
        elif self.resume:
            made = peek(ckpt).get("step", 0)
            yield (f"--resume: {ckpt} is at step {made}, beyond --steps={self.steps} (a resume only goes forward: "
                   f"pass --steps={made} or more)") if made > self.steps else ""
            yield (f"--resume: {ckpt} is at step {made}, so --stop_at={self.stop_at} would go back (a resume only "
                   f"goes forward)") if 0 < self.stop_at <= made else ""
            yield changed_world(ckpt, self)
        else:
            yield f"{ckpt} exists: pass --resume to continue it, or choose another --out" \
                if os.path.exists(ckpt) else ""

    def tasks(self):
        return self.joint_tasks.split(",") if self.task == "joint" else [self.task]


# ----------------------------------------------------------------------------- the method
def flow_matching_loss(model, batch, noise):
    """MSE between the model's velocity at (x_t, t) and eps - x0. Returns (loss, logs)."""
    x0, t, eps = batch.target, noise["t"], noise["eps"]
    inputs = model_inputs(batch)
    inputs["tokens"] = torch.where(noise["drop"][:, None], 0, inputs["tokens"])  # the empty caption: all pads
    v = model(interpolate(x0, eps, t), t, **inputs)
    per_example = F.mse_loss(v.float(), velocity_target(x0, eps), reduction="none").mean((1, 2, 3))
    return per_example.mean(), dict(loss=per_example.mean().detach())


def task_of_step(cfg, step):
    tasks = cfg.tasks()
    return tasks[int(torch.randint(len(tasks), (1,), generator=step_generator(cfg.seed, step, salt=1)))]


def get_batch(cfg, env, step, res, manifest=None):
    """This process's slice of the global batch of `step` and of its noise (t, eps, caption drop). With a manifest
    ({task: rows}, `own_data`), the batch is batch_size of the task's rows, drawn with replacement."""
    task, text_len = task_of_step(cfg, step), cfg.text_len or world.MAX_TOKENS
    if manifest is not None:
        pick = torch.randint(len(manifest[task]), (cfg.batch_size,), generator=step_generator(cfg.seed, step, salt=2))
        batch = data.collate([manifest[task][i] for i in pick.tolist()], env.device, text_len)
    else:
        grids = task == "t2i" and float(torch.rand(1, generator=step_generator(cfg.seed, step, salt=3))) < cfg.grid_rate
        batch = data.make_batch(task, cfg.batch_size, res, env.device, seed=cfg.seed * 1_000_003 + step,
                                grids=grids, n_objects=cfg.n_objects or None, text_len=text_len,
                                edit_data=cfg.edit_data)
    gen = step_generator(cfg.seed, step)
    t = torch.randn(cfg.batch_size, generator=gen).sigmoid() if cfg.t_sampling == "logit_normal" else \
        torch.rand(cfg.batch_size, generator=gen)
    noise = dict(t=t, eps=torch.randn(batch.target.shape, generator=gen),
                 drop=torch.rand(cfg.batch_size, generator=gen) < cfg.cond_drop)
    n = cfg.batch_size // env.world
    rows = slice(env.rank * n, (env.rank + 1) * n)
    for f in ("text", "tokens", "target", "cond", "ref", "mask", "specs", "sources"):
        v = getattr(batch, f)
        setattr(batch, f, v[rows] if v is not None else None)
    return batch, {k: v[rows].to(env.device) for k, v in noise.items()}


def own_data(path, tasks, mcfg):
    """The manifest's rows grouped by task ({task: rows}); every task trained on must have rows."""
    try:
        rows = data.load_manifest(path, mcfg.image_size, mcfg.max_text_len)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    grouped = {t: [r for r in rows if r["task"] == t] for t in tasks}
    missing = [t for t, r in grouped.items() if not r]
    if missing:
        raise SystemExit(f"{path} has no rows of task {missing[0]} (it has: "
                         f"{', '.join(sorted({r['task'] for r in rows}))}): choose --task (or --joint_tasks) from them")
    return grouped


@torch.no_grad()
def save_samples(model, tasks, res, device, path, steps, cfg_scale, n=8, n_objects=None):
    """A PNG: for each task a row of conditions (if any), a row of samples, a row of targets."""
    rows = []
    for task in tasks:
        b = data.make_batch(task, n, res, device, seed=20_000, split="test", n_objects=n_objects,
                            text_len=model.config.max_text_len)
        x = euler(model, torch.randn(b.target.shape, generator=torch.Generator().manual_seed(1)).to(device),
                  model_inputs(b), steps, cfg_scale).clamp(-1, 1)
        cond = b.cond[:, :3] if b.cond is not None else b.ref
        rows += ([cond] if cond is not None else []) + [x, b.target]
    grid = torch.cat([torch.cat(list(r), 2) for r in rows], 1)
    world.to_pil(grid).save(path)


def train(cfg):
    check_config(cfg)  # options and their relations, before anything is built (parse_config checks them too)
    env = setup(cfg)
    tasks = cfg.tasks()
    if cfg.batch_size % env.world:
        raise SystemExit(f"--batch_size={cfg.batch_size} is not divisible by {env.world} processes")
    mcfg = preset(cfg.preset, vocab_size=len(world.VOCAB), max_text_len=cfg.text_len or world.MAX_TOKENS,
                  pooled_text=cfg.pooled_text, one_edit_token=cfg.one_edit_token)
    manifest = own_data(cfg.manifest, tasks, mcfg) if cfg.manifest else None
    torch.manual_seed(cfg.seed)  # the initial weights; everything later draws from step_generator
    model = DiT(mcfg).to(env.device)
    ckpt_path, start, trained = os.path.join(cfg.out, "ckpt.pt"), 0, []
    if cfg.init_from:
        # the same network; how it reads task ids (one_edit_token) may change with the fine-tune
        was = DiTConfig(**peek(cfg.init_from)["model_config"]).one_edit_token
        if was != cfg.one_edit_token:
            print(f"note: {cfg.init_from} read edits with one_edit_token={was}; this run reads them with "
                  f"{cfg.one_edit_token}")
        init = load_checkpoint(cfg.init_from, dataclasses.replace(mcfg, one_edit_token=was))
        model.load_state_dict(init["ema"])  # fine-tune from the smoothed weights
        trained = init.get("tasks", [])
    ema = DiT(mcfg).to(env.device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    cuda = env.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay,
                            fused=cuda)
    if cfg.resume:
        ck = load_checkpoint(ckpt_path, mcfg)
        model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        start, trained = ck["step"], ck["tasks"]
    train_model = model
    if env.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(  # some tasks leave some embedders unused
            model, device_ids=[env.device] if cuda else None, find_unused_parameters=True)
    if env.compile:
        train_model = torch.compile(train_model)
    lr_at = lambda s: cosine_lr(s, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr)
    res = mcfg.image_size
    os.makedirs(cfg.out, exist_ok=True)
    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if env.master else None
    if env.master and start == 0:
        print(f"training {cfg.task} on {env.device} x{env.world}: preset {cfg.preset}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {cfg.steps} steps")
    end = cfg.stop_at or cfg.steps
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=cfg.quiet or not env.master)
    t0 = time.time()
    for step in bar:
        # checkpoint
        if env.master and step > start and step % cfg.ckpt_every == 0:
            save_checkpoint(ckpt_path, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                            step=step, tasks=sorted(set(trained) | set(tasks)), config=dataclasses.asdict(cfg),
                            model_config=dataclasses.asdict(mcfg))
        # batch
        batch, noise = get_batch(cfg, env, step, res, manifest)
        # forward under ctx, backward, clip, step, EMA
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with env.ctx:
            loss, logs = flow_matching_loss(train_model, batch, noise)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, cfg.ema)
        # log (the only host sync)
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            loss_v = logs["loss"].clone()
            if env.world > 1:
                dist.all_reduce(loss_v, op=dist.ReduceOp.AVG)
            row = dict(step=step + 1, task=batch.task, loss=loss_v.item(), grad_norm=grad_norm.item(),
                       lr=lr_at(step), minutes=(time.time() - t0) / 60)
            if env.master:
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                log.write(json.dumps(row) + "\n"), log.flush()
    if env.master:
        save_checkpoint(ckpt_path, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                        step=end, tasks=sorted(set(trained) | set(tasks)), config=dataclasses.asdict(cfg),
                        model_config=dataclasses.asdict(mcfg))
    if env.master and end == cfg.steps:
        save_samples(ema, tasks, res, env.device, os.path.join(cfg.out, "samples.png"), cfg.sample_steps,
                     cfg.cfg_scale, n_objects=cfg.n_objects or None)
        if cfg.eval_n:
            scores = {task: evaluate_task(ema, task, cfg.eval_n, res, env.device, n_objects=cfg.n_objects or None,
                                          steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale) for task in tasks}
            log.write(json.dumps(dict(step=cfg.steps, eval=scores)) + "\n")
            for task, m in scores.items():
                print(f"eval {task}: " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
    if log:
        log.close()
    if env.world > 1:
        dist.barrier()  # tear down together: a rank that leaves while rank 0 still saves can abort in gloo
        dist.destroy_process_group()
    return ckpt_path


# ----------------------------------------------------------------------------- the shared models
# One recipe per preset for each shared model: train.py options over Config's defaults (docs/base.md has the
# measurements behind them). small, the CPU recipe: a base that reads a pooled caption of 24 tokens, one object per
# scene, logit-normal times, 4,000 steps (0.950 one-object success); 1,500-step experts fine-tuned from it.
# base, the one-GPU recipe: 1-3 objects, full captions, 1,800 steps at batch 256; 1,000-step experts.
# tiny: the small recipe's shape in a few steps, for the tests. grid: the base fine-tuned on two-panel subject grids
# (four steps in five) and its own scenes, the grid-capable T2I model Diffusion Self-Distillation starts from.
# joint: SFT on the union of the experts' tasks at the compute of the experts plus a distillation (DanceOPD's main
# baseline): every expert's steps plus `distill_steps`, the distillation's wall time in SFT steps (small: 300
# distillation steps took 4.9 min, as long as about 1,200 SFT steps; base: 400 took about 3 min after compiling,
# about 1,000 steps at 0.2 s).
CPU_BASE = dict(task="t2i", n_objects=1, pooled_text=True, text_len=world.ONE_OBJECT_TOKENS, t_sampling="logit_normal",
                grid_rate=0.0)
FILL = dict(task="joint", joint_tasks="inpaint,outpaint")  # ByteEdit's generator: one model fills holes and borders
RECIPES = {
    "tiny": dict(base=dict(CPU_BASE, steps=2, batch_size=4), expert=dict(steps=1, batch_size=4),
                 grid=dict(task="t2i", steps=2, batch_size=4, grid_rate=0.5), fill=dict(FILL, steps=1, batch_size=4),
                 joint=dict(task="joint", distill_steps=1, batch_size=4, grid_rate=0.0)),
    "small": dict(base=dict(CPU_BASE, steps=4000, batch_size=64), expert=dict(steps=1500, t_sampling="logit_normal"),
                  grid=dict(task="t2i", steps=3000, batch_size=64, grid_rate=0.8, t_sampling="logit_normal"),
                  fill=dict(FILL, steps=2000, t_sampling="logit_normal"),
                  joint=dict(task="joint", distill_steps=1200, t_sampling="logit_normal", grid_rate=0.0)),
    "base": dict(base=dict(task="t2i", n_objects=0, pooled_text=True, grid_rate=0.0, steps=1800, batch_size=256,
                           lr=3e-4, warmup=300),
                 expert=dict(steps=1000, batch_size=256, lr=3e-4, warmup=100),
                 grid=dict(task="t2i", steps=1000, batch_size=256, lr=3e-4, warmup=100, grid_rate=0.8),
                 fill=dict(FILL, steps=2000, batch_size=256, lr=3e-4, warmup=100),
                 joint=dict(task="joint", distill_steps=1000, batch_size=256, lr=3e-4, warmup=100, grid_rate=0.0)),
}


CLEAN_WORLD = dict(edit_data="clean", one_edit_token=False)  # the world options (Config) of an expert or joint SFT


def made_world(path):
    """The world options the checkpoint at `path` was made in: its edit data (clean where the run predates the
    option) and whether its model reads local and global edits with one token."""
    ckpt = peek(path)
    return dict(edit_data=ckpt.get("config", {}).get("edit_data") or "clean",
                one_edit_token=bool(ckpt.get("model_config", {}).get("one_edit_token")))


def changed_world(ckpt, cfg):
    """"" or the line refusing to resume `ckpt` under cfg in another world than it was trained in (--resume keeps
    its data)."""
    made = made_world(ckpt)
    other = [k for k in CLEAN_WORLD if made[k] != getattr(cfg, k)]
    return f"--resume: {ckpt} was trained with --{other[0]}={str(made[other[0]]).lower()}: pass it again" \
        if other else ""


def world_tag(world):
    """The folder suffix of experts and joint SFT made in a world other than the clean one: "" for CLEAN_WORLD,
    else e.g. "_pipeline_one_token" (world: a dict of CLEAN_WORLD's keys)."""
    world = {**CLEAN_WORLD, **world}
    return "" if world == CLEAN_WORLD else f"_{world['edit_data']}" + "_one_token" * world["one_edit_token"]


def shared_path(preset_name, name, base="", world=None, tasks=()):
    """Where a shared model lives: the base at out/<preset>/base/ckpt.pt; an expert beside the base it was
    fine-tuned from, at <base dir>/experts/<task>/ckpt.pt (so experts of another base never mix with these) and joint
    SFT at <base dir>/joint/ckpt.pt (joint_<task>_<task>/ for other `tasks` than Config.joint_tasks'), both folders
    tagged with their world (`world_tag`: experts_pipeline_one_token/); the grid model at <base dir>/grid/ckpt.pt,
    the fill model at <base dir>/fill/ckpt.pt."""
    if name == "base":
        return os.path.join("out", preset_name, "base", "ckpt.pt")
    if name in ("grid", "fill"):
        return os.path.join(os.path.dirname(base), name, "ckpt.pt")
    tag = world_tag(world or {})
    if name == "joint" and set(tasks) != set(Config.joint_tasks.split(",")):
        tag = "_" + "_".join(sorted(tasks)) + tag
    folder = f"joint{tag}" if name == "joint" else os.path.join(f"experts{tag}", name)
    return os.path.join(os.path.dirname(base), folder, "ckpt.pt")


def prerequisite(preset_name, name, path="", base="", device="auto", compile="auto", quiet=False, world=None,
                 tasks=()):
    """The checkpoint of a shared model: name "base", "grid" (the base taught two-panel subject grids), "fill" (the
    base taught inpainting and outpainting, one model: ByteEdit's generator), a task for its expert (SFT from the
    checkpoint `base`) or "joint" (SFT from `base` on `tasks` at the experts' and a distillation's compute). Experts
    and joint SFT are made in `world` (CLEAN_WORLD's keys; default the clean world).

    `path` given: it must exist; a path the user named is never built, so a typo cannot start a long build.
    Else its place under out/ (`shared_path`), trained now with RECIPES[preset_name] if it is missing; a cached
    model trained for another number of steps is used, with a note; one made in another world or on other tasks is
    refused."""
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"missing checkpoint: {path} (leave the option out to use, or build, the "
                             f"{preset_name} recipe's {name})")
        return path
    world = {**CLEAN_WORLD, **(world or {})}
    path, recipe = shared_path(preset_name, name, base, world, tasks), RECIPES[preset_name]
    options = dict(recipe[name if name in ("base", "grid", "fill", "joint") else "expert"])
    if name == "joint":  # compute matched to the experts of `tasks` and one distillation
        options.update(steps=recipe["expert"]["steps"] * sum(t != "t2i" for t in tasks) + options.pop("distill_steps"),
                       joint_tasks=",".join(tasks))
    if name != "base":  # the expert (or grid model) reads captions as its base does, and draws its scenes
        mcfg = DiTConfig(**peek(base)["model_config"])
        options.update(task=options.get("task", name), init_from=base, pooled_text=mcfg.pooled_text,
                       one_edit_token=mcfg.one_edit_token,
                       text_len=mcfg.max_text_len, n_objects=scene_objects(base) or 0)
        if name not in ("grid", "fill"):
            options.update(world)
    if os.path.exists(path):
        made = peek(path)
        source, config = made.get("config", {}).get("init_from"), made.get("config", {})
        if name != "base" and source != base:
            raise SystemExit(f"{path} was fine-tuned from {source}, not {base}: move it away, or name the experts "
                             "with --experts=TASK=PATH")
        other = {k: v for k, v in made_world(path).items() if v != world[k]}
        if name not in ("base", "grid", "fill") and other:
            raise SystemExit(f"{path} was made with {other}, not {world}: move it away")
        if name == "joint" and set(config.get("joint_tasks", "").split(",")) != set(tasks):
            raise SystemExit(f"{path} was trained on {config.get('joint_tasks')}, not {options['joint_tasks']}: move "
                             "it away, or leave the row out (--joint_sft=false)")
        if made.get("step") != options["steps"]:  # e.g. cached under an older recipe
            print(f"note: using cached {path}, trained {made.get('step')} steps (the {preset_name} recipe trains "
                  f"{options['steps']})")
        return path
    what = {"base": "the base model", "grid": f"the grid model (two-panel subject grids, from {base})",
            "fill": f"the fill model (inpaint and outpaint, from {base})",
            "joint": f"joint SFT on {options.get('joint_tasks')} (from {base})"}.get(
        name, f"the {name} expert (SFT from {base})")
    print(f"building {what}: {path}, {options['steps']} steps")
    return train(Config(preset=preset_name, out=os.path.dirname(path), device=device, compile=compile, quiet=quiet,
                        eval_n=0, **options))


def scene_objects(path):
    """Objects per text-to-image scene of the model at `path`, for its data and evaluation: the count it was trained
    on (train.py --n_objects; 0 -> None = 1-3), and 1 for a model that reads only one-object captions."""
    ckpt = peek(path)
    if ckpt["model_config"]["max_text_len"] < world.MAX_TOKENS:
        return 1
    return ckpt.get("config", {}).get("n_objects") or None


def preset_model_config(path, preset_name):
    """The DiTConfig of the checkpoint at `path` (model options such as pooled_text and the caption length come with
    it); its preset fields must be `preset_name`'s. Method scripts give their teachers and students this config."""
    mcfg = DiTConfig(**peek(path)["model_config"])
    want = preset(preset_name, vocab_size=len(world.VOCAB))
    fields = [*PRESETS[preset_name], "vocab_size"]
    diff = {k: (getattr(want, k), getattr(mcfg, k)) for k in fields if getattr(want, k) != getattr(mcfg, k)}
    if diff:
        raise SystemExit(f"{path} is not a --preset={preset_name} model (wanted, found): {diff}")
    return mcfg


if __name__ == "__main__":
    train(parse_config(Config()))
