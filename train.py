"""Flow-matching training of the base model and the expert teachers, and the plumbing every script shares.

    python train.py --task=t2i                                          # the base text-to-image model
    python train.py --task=local_edit --init_from=out/base/ckpt.pt      # an expert teacher (SFT on one task)
    python train.py --task=joint                                        # one model on the union of tasks
    torchrun --nproc_per_node=2 train.py --task=t2i                     # several processes (PyTorch DDP)

Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2023; SD3, Esser et al. 2024): draw t, noise
the target x_t = (1 - t) x0 + t eps, regress the model's velocity on eps - x0 (MSE). Captions are dropped
with probability `cond_drop` so classifier-free guidance works at sampling time (Ho & Salimans 2022).

Shared plumbing, in one place for all method scripts: `parse_config` (typed --key=value, unknown keys are
errors), `setup` (device, DDP, bf16 autocast + torch.compile on CUDA, fp32 eager on CPU), `ema_update`,
`save_checkpoint` (atomic) / `load_checkpoint` (config checked), `model_inputs` (batch -> model kwargs).
Every step's data, noise and t are a pure function of (seed, step), so a resumed run is bitwise the
uninterrupted one and a DDP run sees exactly the global batch of a one-process run.
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import world
from model import DiT, DiTConfig, preset
from sample import euler, interpolate, velocity_target


@dataclass
class Config:
    task: str = "t2i"              # t2i | local_edit | global_edit | inpaint | outpaint | customize | joint
    joint_tasks: str = "t2i,local_edit,global_edit"  # the union that --task=joint trains on
    preset: str = "small"          # model preset (model.PRESETS): tiny | small | base
    pooled_text: bool = False      # model option: the caption's mean word feature joins the adaLN vector (README)
    text_len: int = 0              # model option: caption tokens the model reads (0 = world.MAX_TOKENS = 48); 24
                                   # (world.ONE_OBJECT_TOKENS) holds every 1-object caption and edit instruction
    init_from: str = ""            # checkpoint to fine-tune from ("" = train from scratch)
    out: str = "out/base"          # run directory: ckpt.pt, log.jsonl, samples.png
    resume: bool = False           # continue out/ckpt.pt to `steps`
    steps: int = 4000              # optimizer steps (the learning-rate schedule spans these)
    stop_at: int = 0               # stop (and checkpoint) after this step, as an interrupted run would (0 = steps)
    batch_size: int = 32           # global batch (split across DDP processes)
    lr: float = 1e-3               # peak AdamW learning rate
    warmup: int = 100              # linear warm-up steps
    min_lr: float = 0.05           # cosine decay ends at min_lr * lr
    weight_decay: float = 0.0      # AdamW weight decay
    grad_clip: float = 1.0         # max global grad norm
    ema: float = 0.995             # EMA decay of the weights we sample and evaluate with (0.999 lagged 3000 steps)
    t_sampling: str = "uniform"    # training times t: uniform | logit_normal (sigmoid of N(0, 1), SD3's mid-noise bias)
    cond_drop: float = 0.1         # probability of an empty caption (classifier-free guidance)
    grid_rate: float = 0.1         # fraction of t2i examples that are "a grid of four images of the same ..."
    n_objects: int = 0             # objects per t2i/inpaint/outpaint scene (0 = 1-3 at random)
    sample_steps: int = 16         # Euler steps for samples and the end-of-run evaluation
    cfg_scale: float = 1.0         # guidance scale for samples and evaluation
    eval_n: int = 128              # test examples scored at the end (0 = skip)
    log_every: int = 50            # steps between log lines (the only place losses leave the device)
    ckpt_every: int = 1000         # steps between checkpoints (and one at the end)
    seed: int = 0                  # everything random is a function of (seed, step)
    device: str = "auto"           # auto | cpu | cuda
    compile: str = "auto"          # auto (= on for CUDA) | on | off
    precision: str = "auto"        # auto (= bf16 autocast on CUDA, fp32 on the CPU) | fp32
    quiet: bool = False            # no progress bar


# ----------------------------------------------------------------------------- shared plumbing
def parse_config(cfg, argv=None):
    """Apply --key=value overrides to a dataclass config, with the field's type; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for arg in sys.argv[1:] if argv is None else argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in fields:
            raise SystemExit(f"unknown option {arg!r}; options: " + " ".join(f"--{k}" for k in fields))
        kind = type(getattr(cfg, key))
        if kind is bool:
            if value.lower() not in ("", "1", "true", "0", "false"):
                raise SystemExit(f"--{key} takes true or false, not {value!r}")
            value = value.lower() in ("", "1", "true")
        else:
            try:
                value = kind(value)
            except ValueError:
                raise SystemExit(f"--{key} takes a {kind.__name__}, not {value!r}") from None
        setattr(cfg, key, value)
    return cfg


@dataclass
class Env:
    device: torch.device
    ctx: contextlib.AbstractContextManager  # mixed precision around forward + loss only
    compile: bool
    rank: int = 0
    world: int = 1

    @property
    def master(self):
        return self.rank == 0


def wants_cuda(device):
    """--device=auto | cpu | cuda -> whether this run goes to CUDA."""
    return torch.cuda.is_available() if device == "auto" else device == "cuda"


def setup(cfg):
    """Device, DDP (from torchrun's environment), precision context and compile flag."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = wants_cuda(cfg.device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    precision = getattr(cfg, "precision", "auto")  # only train.py has the option; the other scripts use auto
    if precision not in ("auto", "fp32"):
        raise SystemExit(f"--precision takes auto or fp32, not {precision!r}")
    fast = cuda and precision == "auto"  # bf16 autocast and TF32 matmuls; --precision=fp32 is strict fp32
    if not cuda:  # late in training, subnormal floats (softmax tails, their grads) made CPU steps 2x slower
        torch.set_flush_denormal(True)  # measured on the trained alignment model: 0.49 -> 0.26 s per step
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if fast else contextlib.nullcontext()
    return Env(device, ctx, cfg.compile == "on" or (cfg.compile == "auto" and cuda), rank, world)


def step_generator(seed, step, salt=0):
    """The random stream of one step: identical for a resumed run and across DDP processes."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + salt) % 2**63)


def model_inputs(batch):
    """A data.Batch -> the model's keyword arguments."""
    task = torch.full((len(batch.text),), data.TASKS.index(batch.task), device=batch.target.device)
    return dict(task=task, tokens=batch.tokens, cond=batch.cond, ref=batch.ref)


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def save_checkpoint(path, **state):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, model_config=None, mmap=False):
    """Load a checkpoint (tensors and plain types only). If `model_config` is given it must match. mmap: the
    tensors are read only when used (to look at step and config)."""
    if not os.path.isfile(path):
        raise SystemExit(f"missing checkpoint: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise SystemExit(f"{path} is not a checkpoint of this project ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "ema" not in ckpt:
        raise SystemExit(f"{path} is not a checkpoint of this project (no model_config / ema)")
    if model_config is not None and ckpt["model_config"] != dataclasses.asdict(model_config):
        diff = {k: (v, ckpt["model_config"].get(k)) for k, v in dataclasses.asdict(model_config).items()
                if ckpt["model_config"].get(k) != v}
        raise SystemExit(f"{path} was trained with another model config (wanted, found): {diff}")
    return ckpt


def load_model(path, device="cpu", weights="ema"):
    """Rebuild any checkpoint's model (its config is stored with it); EMA weights by default."""
    ckpt = load_checkpoint(path)
    model = DiT(DiTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt[weights])
    return model.to(device).eval(), ckpt


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
    tasks = cfg.joint_tasks.split(",") if cfg.task == "joint" else [cfg.task]
    return tasks[int(torch.randint(len(tasks), (1,), generator=step_generator(cfg.seed, step, salt=1)))]


def get_batch(cfg, env, step, res):
    """This process's slice of the global batch of `step` and of its noise (t, eps, caption drop)."""
    task = task_of_step(cfg, step)
    batch = data.make_batch(task, cfg.batch_size, res, env.device, seed=cfg.seed * 1_000_003 + step,
                            grid_rate=cfg.grid_rate, n_objects=cfg.n_objects or None,
                            text_len=cfg.text_len or world.MAX_TOKENS)
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
    env = setup(cfg)
    tasks = cfg.joint_tasks.split(",") if cfg.task == "joint" else [cfg.task]
    bad = [t for t in tasks if t not in data.TASKS]
    if bad or cfg.batch_size % env.world:
        raise SystemExit(f"unknown task {bad[0]!r} (tasks: {', '.join(data.TASKS)}, joint)" if bad else
                         f"--batch_size={cfg.batch_size} is not divisible by {env.world} processes")
    if cfg.t_sampling not in ("uniform", "logit_normal"):
        raise SystemExit(f"--t_sampling takes uniform or logit_normal, not {cfg.t_sampling!r}")
    scenes = [t for t in tasks if t in ("t2i", "inpaint", "outpaint")]  # captions of whole scenes: 1-3 objects
    if 0 < cfg.text_len < world.MAX_TOKENS and scenes and cfg.n_objects != 1:
        raise SystemExit(f"--text_len={cfg.text_len} is too short for the {scenes[0]} captions of 2- and 3-object "
                         f"scenes: add --n_objects=1")
    mcfg = preset(cfg.preset, vocab_size=len(world.VOCAB), max_text_len=cfg.text_len or world.MAX_TOKENS,
                  pooled_text=cfg.pooled_text)
    torch.manual_seed(cfg.seed)  # the initial weights; everything later draws from step_generator
    model = DiT(mcfg).to(env.device)
    ckpt_path, start, trained = os.path.join(cfg.out, "ckpt.pt"), 0, []
    if cfg.init_from:
        init = load_checkpoint(cfg.init_from, mcfg)
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
    elif os.path.exists(ckpt_path):
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    train_model = model
    if env.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(  # some tasks leave some embedders unused
            model, device_ids=[env.device] if cuda else None, find_unused_parameters=True)
    if env.compile:
        train_model = torch.compile(train_model)
    lr_at = lambda s: cfg.lr * min(1, (s + 1) / cfg.warmup) * (
        cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1, s / cfg.steps))))
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
        batch, noise = get_batch(cfg, env, step, res)
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
            from evaluate import evaluate_task  # imported here: evaluate.py builds on this file
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


if __name__ == "__main__":
    train(parse_config(Config()))
