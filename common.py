"""The plumbing every script shares, in one place: options, device and precision, each step's random stream, EMA,
the learning-rate schedule, checkpoints, and loading models and frozen networks.

Nothing here is a method and nothing here runs a loop: train.py, judges.py and the method scripts each write their
own loop and call these few functions, so that diffing two scripts shows the methods, not plumbing (STYLE.md).
- `parse_config`: typed --key=value overrides of a dataclass Config; unknown keys are errors.
- `setup`: device, DDP from torchrun's environment, bf16 autocast + TF32 + torch.compile on CUDA, fp32 eager on the
  CPU. A script reads `env.ctx` (mixed precision around forward and loss only) and `env.compile`.
- `step_generator`: every step's data, noise and t are a pure function of (seed, step), so a resumed run is bitwise
  the uninterrupted one and DDP processes see exactly the global batch of one process.
- `save_checkpoint` is atomic; `load_checkpoint` reads tensors and plain types only and checks the model config.
- Teachers, judges and rewards are `frozen`: eval() and requires_grad_(False).
"""
import contextlib
import dataclasses
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
from model import DiT, DiTConfig, frozen


# ----------------------------------------------------------------------------- options
def option(default, **rules):
    """A Config field with the rules its value must keep, checked by `check_config` before any work:
    choices=(...): one of these; each=(...): a comma-separated list of distinct items from these; low / high:
    inclusive bounds, above: a strict lower bound (numbers must also be finite); required: not empty;
    path="file" | "image": an existing file (when given); path="exists": an existing file or directory;
    path="dir": a directory to write into; path="outfile":
    a file to write (suffix=(...): its allowed endings); pairs=(...): KEY=PATH,... with keys from these (None: any)
    and existing paths; device: auto | cpu | cuda, and cuda only where there is one."""
    return dataclasses.field(default=default, metadata=rules)


def parse_config(cfg, argv=None):
    """Apply --key=value overrides to a dataclass config, with the field's type (unknown keys are errors), then
    check every option and the relations between them (`check_config`): one line for the first problem."""
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
                raise SystemExit(f"--{key} takes {'an' if kind is int else 'a'} {kind.__name__}, not {value!r}") \
                    from None
        setattr(cfg, key, value)
    return check_config(cfg)


def check_config(cfg):
    """Every field's rules (`option`), then the Config's own `check()` of relations between fields, if it has one.
    The first problem is a SystemExit naming the option, the value and what is wrong. Returns cfg."""
    for f in dataclasses.fields(cfg):
        problem = check_value(f.name, getattr(cfg, f.name), f.metadata)
        if problem:
            raise SystemExit(f"--{f.name}={getattr(cfg, f.name)}: {problem}")
    problems = [p for p in (cfg.check() if hasattr(cfg, "check") else []) if p]
    if problems:
        raise SystemExit(problems[0])
    return cfg


def check_value(name, value, rules):
    """What is wrong with one option's value under its rules, or "" when nothing is."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if "choices" in rules and value not in rules["choices"]:
        return "must be one of " + ", ".join(map(str, rules["choices"]))
    if "each" in rules:
        items = value.split(",")
        bad = [i for i in items if i not in rules["each"]]
        if bad or len(set(items)) < len(items):
            return (f"unknown item {bad[0]!r}" if bad else "an item twice") + "; items: " + ", ".join(rules["each"])
    for rule, bad, what in (("low", lambda v, b: v < b, ">="), ("high", lambda v, b: v > b, "<="),
                            ("above", lambda v, b: v <= b, ">")):
        if rule in rules and bad(value, rules[rule]):
            return f"must be {what} {rules[rule]}"
    if rules.get("required") and not value:
        return "must not be empty"
    if rules.get("device") and value == "cuda" and not torch.cuda.is_available():
        return "there is no CUDA device here (use --device=cpu, or auto)"
    kind = rules.get("path")
    if "pairs" in rules:
        return check_pairs(value, rules["pairs"])
    if not value or kind is None:
        return ""
    if kind in ("file", "image"):
        return "" if os.path.isfile(value) else "no such file"
    if kind == "exists":
        return "" if os.path.exists(value) else "no such file or directory"
    return check_writable(value, kind, rules.get("suffix"))


def command_flags(cfg, default, skip=()):
    """The flags that reproduce a method script's run: its --preset (auto resolves differently per device), then every
    --key=value in which cfg differs from `default`, the script's resolved defaults for that preset and device."""
    return " ".join([f"--preset={cfg.preset}"] + [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()
                                                  if k not in ("preset", *skip) and getattr(default, k) != v])


def pairs(value):
    """KEY=PATH,KEY=PATH -> [(KEY, PATH), ...] (a bare PATH gets the key "")."""
    return [tuple(item.rpartition("=")[::2]) for item in value.split(",") if item]


def check_pairs(value, keys):
    for item in filter(None, value.split(",")):
        key, eq, path = item.rpartition("=")
        if keys is not None and (not eq or key not in keys or not path):
            return f"{item!r} must be KEY=PATH with KEY one of " + ", ".join(keys)
        if not path:
            return f"{item!r} has no path"
        if not os.path.exists(path):
            return f"no such file: {path}"
    return ""


def check_writable(path, kind, suffix=None):
    """Whether `path` can be written as a directory (kind "dir") or a file ("outfile", with an allowed suffix)."""
    if kind == "outfile" and suffix and not path.lower().endswith(tuple(suffix)):
        return "the file name must end in " + " or ".join(suffix)
    if os.path.exists(path) and os.path.isdir(path) != (kind == "dir"):
        return "is a file, not a directory" if kind == "dir" else "is a directory, not a file"
    if os.path.isdir(path):
        return "" if os.access(path, os.W_OK) else "is not writable"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, so nothing can be written under it"
    return "" if os.access(parent, os.W_OK) else f"{parent} is not writable"


# ----------------------------------------------------------------------------- device, precision, distribution
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
    """Device, DDP (from torchrun's environment), precision context and compile flag of a Config with `device`,
    `compile` and optionally `precision` (auto = bf16 autocast and TF32 on CUDA; fp32 = strict fp32)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = wants_cuda(cfg.device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    fast = cuda and getattr(cfg, "precision", "auto") == "auto"
    if not cuda:  # late in training, subnormal floats (softmax tails, their grads) made CPU steps 2x slower
        torch.set_flush_denormal(True)  # measured on the trained alignment model: 0.49 -> 0.26 s per step
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if fast else contextlib.nullcontext()
    return Env(device, ctx, cfg.compile == "on" or (cfg.compile == "auto" and cuda), rank, world)


# ----------------------------------------------------------------------------- the training step's pieces
def step_generator(seed, step, salt=0):
    """The random stream of one step: identical for a resumed run and across DDP processes."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + salt) % 2**63)


def model_inputs(batch):
    """A data.Batch -> the model's keyword arguments (task ids, caption tokens, pixel-aligned condition, reference)."""
    task = torch.full((len(batch.text),), data.TASKS.index(batch.task), device=batch.target.device)
    return dict(task=task, tokens=batch.tokens, cond=batch.cond, ref=batch.ref)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def cosine_lr(step, steps, lr, warmup, min_lr=0.05):
    """Linear warm-up over `warmup` steps, then cosine decay from lr to min_lr * lr at `steps`."""
    decay = 0.5 * (1 + math.cos(math.pi * min(1, step / steps)))                  # 1 -> 0 over `steps`
    return lr * min(1, (step + 1) / warmup) * (min_lr + (1 - min_lr) * decay)


# ----------------------------------------------------------------------------- checkpoints and models
def save_checkpoint(path, **state):
    """Write a temporary file, flush it to the disk, then rename it over `path`: neither a crash nor a power loss
    leaves a half-written or empty checkpoint (without the fsync, the rename may reach the disk before the data)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
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
    try:  # model options newer than the file take their defaults
        found = ckpt["model_config"] = dataclasses.asdict(DiTConfig(**ckpt["model_config"]))
    except TypeError as e:
        raise SystemExit(f"{path} has a model option this code does not know ({e})") from None
    if model_config is not None and found != dataclasses.asdict(model_config):
        diff = {k: (v, found[k]) for k, v in dataclasses.asdict(model_config).items() if found[k] != v}
        raise SystemExit(f"{path} was trained with another model config (wanted, found): {diff}")
    return ckpt


def peek(path):
    """A checkpoint's plain entries (step, config, model_config, tasks) without reading its tensors (mmap)."""
    return load_checkpoint(path, mmap=True)


def resume_problem(ckpt, cfg, same=()):
    """What forbids a run under cfg (with `resume` and `steps`) from writing the checkpoint `ckpt`, or "": it exists
    and --resume is off; it is past --steps; or it was made with another value of an option in `same` (a resumed run
    keeps its data and recipe)."""
    if not os.path.exists(ckpt):
        return ""
    if not cfg.resume:
        return f"{ckpt} exists: pass --resume to continue (or re-evaluate) it, or choose another --out"
    made = peek(ckpt)
    changed = [k for k in same if made.get("config", {}).get(k) != getattr(cfg, k)]
    if made["step"] > cfg.steps:
        return f"--resume: {ckpt} is at step {made['step']}, beyond --steps={cfg.steps}"
    stop = getattr(cfg, "stop_at", 0)
    if stop and stop <= made["step"] < cfg.steps:
        return f"--resume: {ckpt} is at step {made['step']}, so --stop_at={stop} would go back (or stay)"
    return f"--resume: {ckpt} was trained with --{changed[0]}={made['config'].get(changed[0])}" if changed else ""


def load_model(path, device="cpu", weights="ema"):
    """Rebuild any checkpoint's model (its config is stored with it); EMA weights by default."""
    ckpt = load_checkpoint(path)
    model = DiT(DiTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt[weights])
    return model.to(device).eval(), ckpt


def load_teacher(path, model_config, task, device):
    """A frozen teacher field for `task`: the checkpoint's EMA weights; it must be of `model_config` and have been
    trained for `task`."""
    ckpt = load_checkpoint(path, model_config)
    if task not in ckpt.get("tasks", []):
        raise SystemExit(f"{path} was trained for {', '.join(ckpt.get('tasks', []))}, so it cannot teach {task}")
    teacher = DiT(model_config)
    teacher.load_state_dict(ckpt["ema"])
    return frozen(teacher.to(device))
