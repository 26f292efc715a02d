"""DanceOPD: on-policy distillation of several frozen expert velocity fields into one student.

    python distill_onpolicy.py                                      # teachers, joint SFT (built if missing) -> student
    python distill_onpolicy.py --edit_data=clean --one_edit_token=false --out=out/opd_clean --name=clean  # no conflict
    python distill_onpolicy.py --tasks=local_edit,global_edit --out=out/danceopd_edits --name=danceopd_edits
    python distill_onpolicy.py --mode=offpolicy --out=out/opd_off --name=offpolicy    # ablations: one flag each
    python distill_onpolicy.py --compare=mine=out/mine/ckpt.pt,other=out/other/ckpt.pt    # extra rows in the table

Zhou et al. 2026, "DanceOPD: On-Policy Generative Field Distillation" (METHODS.md section 1). Each capability
has a frozen teacher velocity field: the T2I teacher is the base model itself, an edit teacher is the base
fine-tuned on its own pairs (train.py). The student starts as the base + LoRA; the source-image input and task
embeddings, which the T2I base never trained, train in full. One optimizer step:
  1. hard routing: one capability m per step, uniform; the whole batch comes from m's data bucket;
  2. its conditions c (caption; for edits the source image) from data.make_batch;
  3. roll out the current student with no gradient: Euler, 16 steps, the state before each step;
  4. K=1 query state per rollout at index floor(u * 16), u ~ Beta(5, 2) (the low-noise end);
  5. target: the routed teacher's velocity at that detached state (optionally CFG-guided with alpha);
  6. loss: plain MSE between the student's (unguided) and the teacher's velocity; 7. clip 1.0, AdamW.
For Euler transitions with shared Gaussian noise the KL between student and teacher transitions is
proportional to |dt (v_student - v_teacher)|^2: MSE on the student's own states is on-policy reverse-KL.
Ablations and baselines, each a flag: --mode=offpolicy (states from forward-noised data) | dense (all 16 states
weighted by dt^2/2, DiffusionOPD), --routing=soft (average of all teachers), --query=median|high|low|uniform|
curriculum, --query_k=4, --cfg_alpha (CFG absorption), --rollin (teacher roll-in, DAgger); weight merging of the
experts and joint SFT at matched compute (rows of the table); --compare=LABEL=PATH adds any checkpoint as a row.
The world is by default the one where the paper's premise holds, joint SFT losing to its experts (docs/danceopd.md):
edit data made by a pipeline (blurred, noisy, shifted targets) and one token for local and global edits. The base,
the experts and joint SFT are the shared models of train.py (train.prerequisite: cached under out/<preset>/, built
from train.RECIPES when missing). No EMA (METHODS.md names none): the checkpoint's "ema" holds the merged student.
Findings, ablations and probes: docs/danceopd.md.
"""
import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data
import world
from common import (check_config, command_flags, load_checkpoint, load_model, load_teacher, model_inputs, option,
                    pairs, parse_config, peek, save_checkpoint, setup, step_generator, wants_cuda)
from evaluate import evaluate_task, paired_difference, plain_name_problem, write_results
from model import DiT, PRESETS, add_lora, merged_copy
from sample import euler, guided_velocity, interpolate, rollout, timesteps
from train import changed_world, made_world, preset_model_config, prerequisite, scene_objects


@dataclass
class Config:
    preset: str = option("auto", choices=("auto",) + tuple(PRESETS))  # tiny | small | base (auto = base on CUDA,
                                   # small on the CPU)
    out: str = option("", path="dir")  # run directory: ckpt.pt (the merged student), log.jsonl ("" = out/<preset>/
                                   # danceopd)
    resume: bool = False           # continue out/ckpt.pt to `steps`
    base: str = option("", path="file")  # the base = T2I teacher = student init, unless --init ("" = out/<preset>/
                                   # base/ckpt.pt, built from train.RECIPES if missing; a path given must exist)
    experts: str = option("", pairs=data.TASKS)  # TASK=PATH,... of the other teachers (a task not named: the
                                   # base's expert in the run's world, <base dir>/experts_pipeline_one_token/<task>/
                                   # ckpt.pt by default, built from train.RECIPES: train.shared_path)
    init: str = option("", path="file")  # the student's start ("" = the base; e.g. joint SFT: one that already edits)
    tasks: str = option("t2i,local_edit,global_edit", each=data.TASKS)  # the capabilities routed to, one teacher each
    steps: int = option(0, low=0)  # distillation steps (0 = DEFAULTS: 300 on CPU, 400 at base; paper: 3000)
    stop_at: int = option(0, low=0)  # stop (and checkpoint) after this step, as an interrupted run would (0 = steps)
    batch_size: int = option(0, low=0)  # rollouts per step, all from the routed task (0 = DEFAULTS: 16 CPU, 64 base)
    lr: float = option(0.0, low=0)  # AdamW learning rate, constant (0 = DEFAULTS: 1e-3 CPU, 3e-4 base; paper: 2e-4)
    weight_decay: float = option(0.0, low=0)  # AdamW weight decay (paper: 0)
    grad_clip: float = option(1.0, above=0)  # max global grad norm (paper: 1.0)
    lora_rank: int = option(32, low=0)  # student LoRA rank (paper: 128 on a much wider model); 0 = full fine-tune
    lora_scale: float = 1.0        # LoRA scale (alpha / r)
    rollout_steps: int = option(16, low=1)  # Euler steps of the student rollout (and of evaluation)
    query_k: int = option(1, low=1)  # query states per rollout, drawn independently (paper: 1 vs 4 vs 16)
    query: str = option("beta", choices=("beta", "median", "high", "low", "uniform", "curriculum"))  # query position
                                   # (QUERY below): beta = Beta(5, 2) | median | high | low | uniform | curriculum
    mode: str = option("onpolicy", choices=("onpolicy", "offpolicy", "dense"))  # onpolicy | offpolicy (forward-
                                   # noised data) | dense (all states, dt^2/2)
    edit_data: str = option("pipeline", choices=tuple(data.EDIT_DATA))  # world option (docs/danceopd.md): the edit
                                   # experts' and joint SFT's targets, and those --mode=offpolicy noises (clean |
                                   # pipeline: blurred, noisy, shifted as generated edit datasets are)
    one_edit_token: bool = True    # world option: local and global edits share one task token, scope is read from the
                                   # words (false: a token per task; with --edit_data=clean: the world of no conflict)
    joint_sft: bool = True         # a row of the table: joint SFT at matched compute (train.RECIPES, built if missing)
    routing: str = option("hard", choices=("hard", "soft"))  # hard (the routed teacher) | soft (mean of all teachers)
    rollin: float = option(0.0, low=0, high=1)  # DAgger roll-in: P(a rollout step is the teacher's), falling
                                   # linearly to 0 (0 = off)
    cfg_alpha: float = 1.0         # CFG absorption: teacher guided with alpha, student unguided (1.0 = off)
    log_every: int = option(50, low=1)  # steps between log lines (loss, field error on fixed probes)
    ckpt_every: int = option(500, low=1)  # steps between checkpoints (and one at the end)
    eval_n: int = option(128, low=0)  # test examples per task for the final table (0 = skip)
    merged: bool = True            # also score the weight average of the teachers (weight-merging baseline)
    compare: str = option("", pairs=None)  # extra rows in the table: LABEL=PATH,... (e.g. joint SFT from train.py)
    name: str = "danceopd"         # results/danceopd/<name>.md and .json
    seed: int = option(0, low=0)   # everything random is a function of (seed, step)
    device: str = option("auto", choices=("auto", "cpu", "cuda"), device=True)  # auto | cpu | cuda
    compile: str = option("auto", choices=("auto", "on", "off"))  # auto (= on for CUDA) | on | off
    quiet: bool = False            # no progress bars

    def check(self):
        """Relations between options, before anything is built or trained."""
        cfg, tasks = resolve(self), self.tasks.split(",")
        ckpt = os.path.join(cfg.out, "ckpt.pt")
        yield plain_name_problem(cfg.name, "danceopd")
        yield f"--stop_at={cfg.stop_at} is beyond --steps={cfg.steps}" if cfg.stop_at > cfg.steps else ""
        yield "" if all(label for label, _ in pairs(cfg.compare)) else "--compare takes LABEL=PATH,..."
        for task, path in pairs(cfg.experts):  # named teachers: checkpoints of this preset, trained for their task
            yield "" if task in tasks and task != "t2i" else \
                f"--experts={task}=...: {task} is not an edit task of --tasks={cfg.tasks} (the T2I teacher is --base)"
            yield "" if task in peek(path).get("tasks", []) else f"{path} was trained for " \
                f"{', '.join(peek(path).get('tasks', []))}, so it cannot teach {task}"
            made = made_world(path)
            yield "" if made == dict(edit_data=cfg.edit_data, one_edit_token=cfg.one_edit_token) else \
                f"{path} was trained with --edit_data={made['edit_data']} --one_edit_token=" \
                f"{str(made['one_edit_token']).lower()}: pass these, so that the student reads edits as its teachers " \
                "do and off-policy states and the table describe their world"
        for path in [p for p in (cfg.base, cfg.init) if p] + [p for _, p in pairs(cfg.experts)]:
            preset_model_config(path, cfg.preset)  # a one-line error for a checkpoint of another preset
        for _, path in pairs(cfg.compare):
            peek(path)                             # a one-line error for a file that is no checkpoint
        if cfg.resume and not os.path.exists(ckpt):
            yield f"--resume: there is no {ckpt} to continue (leave --resume out to start it)"
        elif cfg.resume:
            made = peek(ckpt)
            yield f"{ckpt} is not a --preset={cfg.preset} run of this script" \
                if made.get("config", {}).get("preset") != cfg.preset else ""
            yield (f"--resume: {ckpt} is at step {made.get('step')}, beyond --steps={cfg.steps} (a resume only goes "
                   f"forward)") if made.get("step", 0) > cfg.steps else ""
            yield (f"--resume: {ckpt} is at step {made.get('step')}, so --stop_at={cfg.stop_at} would go back (a "
                   f"resume only goes forward)") if 0 < cfg.stop_at <= made.get("step", 0) else ""
            yield changed_world(ckpt, cfg)
            rank = made.get("config", {}).get("lora_rank") if "student" in made else "no student"
            yield "" if rank == cfg.lora_rank else \
                f"{ckpt} is not a run of this script with --lora_rank={cfg.lora_rank} (it has {rank})"
        else:
            yield f"{ckpt} exists: pass --resume to continue it, or choose another --out" \
                if os.path.exists(ckpt) else ""


# Query position u in [0, 1) -> state index floor(u * n). sample.timesteps runs from t=1 (noise) down to t=0, so
# states[0] is pure noise and states[i] sits at t = 1 - i / n (shift 1): a LARGE index is a LOW-noise state.
# Beta(5, 2) (mean 5/7) thus favours the low-noise end, as METHODS.md says ("biased toward the low-noise end");
# it is the paper's "low-t" row. median = Beta(5, 5) and high = Beta(2, 5) (its mirror) are the median-t and
# high-t ablations; low = always the last state before the final step (t = 1/n); uniform = Beta(1, 1); curriculum
# = high with probability 1 - step / steps, else beta: the noise end (where edits are decided) first.
QUERY = {"beta": (5, 2), "median": (5, 5), "high": (2, 5), "uniform": (1, 1), "low": None, "curriculum": None}

# ----------------------------------------------------------------------------- the method
def get_batch(cfg, tasks, step, res, device, text_len=world.MAX_TOKENS, n_objects=None):
    """Step 1-2, hard routing: one task per step, uniform, drawn from (seed, step); the batch is its bucket.
    text_len: the models' caption length; n_objects: the T2I teacher's scenes (edits: unaffected)."""
    route = tasks[int(torch.randint(len(tasks), (1,), generator=step_generator(cfg.seed, step, salt=1)))]
    return data.make_batch(route, cfg.batch_size, res, device, seed=cfg.seed * 1_000_003 + step,
                           n_objects=n_objects, text_len=text_len, edit_data=cfg.edit_data)


def query_index(gen, shape, n, position="beta", progress=0.0):
    """State indices floor(u * n), u ~ Beta(a, b) of QUERY[position] (convention above QUERY; the a-th smallest of
    a + b - 1 uniforms is exactly Beta(a, b), so it can use `gen`); curriculum mixes at progress = step / steps."""
    if position == "curriculum":
        high, beta = query_index(gen, shape, n, "high"), query_index(gen, shape, n, "beta")
        return torch.where(torch.rand(shape, generator=gen) < progress, beta, high)
    if QUERY[position] is None:
        return torch.full(shape, n - 1, dtype=torch.long)
    a, b = QUERY[position]
    u = torch.rand(*shape, a + b - 1, generator=gen).sort(-1).values[..., a - 1]
    return (u * n).long().clamp(max=n - 1)                                       # (*shape,) in 0..n-1


def query_states(cfg, student, batch, gen, teacher=None, progress=0.0):
    """Steps 3-4: the states the teacher is asked about, detached, with their times, weights and inputs, at
    `progress` = step / steps. With --rollin, an Euler step of the rollout may be `teacher`'s (the batch's step).

    Returns x (N, 3, H, W), t (N,), w (N,) with N = B * K, and the model inputs repeated K times."""
    inputs = model_inputs(batch)
    B, n, device = len(batch.text), cfg.rollout_steps, batch.target.device
    noise = torch.randn(batch.target.shape, generator=gen).to(device)             # (B, 3, H, W)
    ts = timesteps(n, device=device)                                               # (n + 1,) from 1 to 0
    if cfg.mode == "dense":  # DiffusionOPD: every state, weighted by dt^2 / 2 (the Gaussian-transition KL)
        idx = torch.arange(n).expand(B, n)
        w = ((ts[1:] - ts[:-1]) ** 2 / 2)[idx.to(device)]                          # (B, n)
    else:
        idx = query_index(gen, (B, cfg.query_k), n, cfg.query, progress)
        w = torch.full((B, cfg.query_k), 1 / cfg.query_k, device=device)         # plain mean over queries
    idx = idx.to(device)
    K, t = idx.shape[1], ts[idx]                                                   # (B, K)
    if cfg.mode == "offpolicy":  # forward-noised dataset targets at the same times
        x = interpolate(batch.target.repeat_interleave(K, 0), noise.repeat_interleave(K, 0), t.flatten())
    else:
        rollin = cfg.rollin * (1 - progress)                                      # falls linearly to 0
        field = [teacher if u < rollin else student for u in torch.rand(n, generator=gen).tolist()]
        states, _, _ = rollout(field, noise, inputs, n)                            # (n, B, 3, H, W), no grad
        x = states[idx, torch.arange(B, device=device)[:, None]].flatten(0, 1)     # (B K, 3, H, W)
    inputs = {k: None if v is None else v.repeat_interleave(K, 0) for k, v in inputs.items()}
    return x.detach(), t.flatten(), w.flatten(), inputs


@torch.no_grad()
def teacher_velocity(teachers, route, x, t, inputs, routing="hard", cfg_alpha=1.0):
    """Step 5: the routed teacher's velocity (soft: the mean over all teachers), guided with cfg_alpha."""
    fields = list(teachers.values()) if routing == "soft" else [teachers[route]]
    return torch.stack([guided_velocity(m, x, t, inputs, cfg_alpha).float() for m in fields]).mean(0)


def distill_loss(student, teachers, batch, cfg, gen, progress=0.0):
    """Steps 3-6 on one batch of the routed bucket: weighted MSE of student vs teacher velocity. (loss, logs)"""
    x, t, w, inputs = query_states(cfg, student, batch, gen, teachers.get(batch.task), progress)
    target = teacher_velocity(teachers, batch.task, x, t, inputs, cfg.routing, cfg.cfg_alpha)
    v = student(x, t, **inputs)                                                    # unguided, (N, 3, H, W)
    mse = (v.float() - target).square().mean((1, 2, 3))                            # (N,)
    loss = (w * mse).sum() / len(batch.text)
    return loss, dict(loss=loss.detach(), mse=mse.mean().detach())


@torch.no_grad()
def field_errors(student, teacher, batch, noise, steps=16, cfg_alpha=1.0):
    """(steps,) mean squared student-teacher velocity difference at each state of the student's own rollout,
    from pure noise (index 0) to the last state before the final step."""
    inputs = model_inputs(batch)
    states, ts, _ = rollout(student, noise, inputs, steps)
    return torch.stack([(student(x, ts[i].expand(len(x)), **inputs).float()
                         - guided_velocity(teacher, x, ts[i], inputs, cfg_alpha).float()).square().mean()
                        for i, x in enumerate(states)])


# ----------------------------------------------------------------------------- the student and the baselines
# Kept fully trainable beside the LoRA: the T2I base never trained its source-image input (cond_embedder, zero at
# init) nor the edit tasks' embeddings, so with LoRA alone the student could not even see what it is asked to edit.
STUDENT_TRAINABLE = ("cond_embedder", "task_embedder")


def make_student(base_state, mcfg, lora_rank, lora_scale, device):
    """The base weights + LoRA on every block's Linear layers, plus the condition input and task embeddings
    (STUDENT_TRAINABLE); everything else frozen. lora_rank 0 = full fine-tune."""
    student = DiT(mcfg)
    student.load_state_dict(base_state)
    if lora_rank:
        add_lora(student, lora_rank, lora_scale, trainable=STUDENT_TRAINABLE)
    return student.to(device).train()


def merge_weights(state_dicts):
    """The weight-merging baseline: the plain average of the teachers' weights (all fine-tuned from one base)."""
    return {k: torch.stack([sd[k].float() for sd in state_dicts]).mean(0).to(state_dicts[0][k].dtype)
            for k in state_dicts[0]}


# ----------------------------------------------------------------------------- evaluation
ATTRIBUTES = ("shape", "color", "size", "cell", "line", "count", "horizon", "sky", "ground")  # scorer's per-attribute


@torch.no_grad()
def evaluate_all(cfg, tasks, student, teachers, paths, extra, n_objects, device):
    """Score the student, every teacher, the merged teachers and `extra` (label -> checkpoint: joint SFT, --compare)
    on every task (same seeds, exact scorer); print and write results/danceopd/<name>.md, .json and .png. Returns
    {label: {task: metrics}}."""
    models = {cfg.name: (student, 1.0)}  # label -> (model, CFG scale); teachers at the alpha they taught with
    for task, teacher in teachers.items():
        models.setdefault("base (t2i teacher)" if task == "t2i" else f"{task} teacher", (teacher, cfg.cfg_alpha))
    if cfg.merged and len(teachers) > 1:
        merged = DiT(student.config).to(device).eval()  # reads task ids as the student does (one_edit_token)
        merged.load_state_dict(merge_weights([m.state_dict() for m in teachers.values()]))
        models["merged teachers"] = (merged, 1.0)
    for label, path in extra.items():
        models[label] = (load_model(path, device)[0], 1.0)
    res, results = student.config.image_size, {}
    for label, (model, scale) in tqdm(models.items(), desc="evaluate", disable=cfg.quiet):
        results[label] = {t: evaluate_task(model, t, cfg.eval_n, res, device, n_objects=n_objects,
                                           steps=cfg.rollout_steps, cfg_scale=scale, per_example=True) for t in tasks}
        for r in results[label].values():  # a graded companion to the all-or-nothing success
            r["attributes"] = sum(r[k] for k in ATTRIBUTES if k in r) / sum(k in r for k in ATTRIBUTES)
        results[label]["average"] = {k: sum(results[label][t][k] for t in tasks) / len(tasks)
                                     for k in ("success", "attributes")}
    columns = tasks + ["average"]
    lines = [f"Exact-scorer success / mean attribute accuracy of the DanceOPD student and its references, {cfg.eval_n} "
             f"test examples per task, {cfg.rollout_steps} Euler steps, t2i scenes of {n_objects or '1-3'} "
             f"object(s); student unguided, teachers at CFG {cfg.cfg_alpha}. Student: {cfg.mode}, {cfg.routing} "
             f"routing, query {cfg.query} K={cfg.query_k}, {cfg.steps} steps. Command: `python distill_onpolicy.py "
             f"{command_args(cfg)}`", "",
             "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(f"{r[c]['success']:.3f} / {r[c]['attributes']:.3f}" for c in columns) + " |"
              for label, r in results.items()]
    lines += teacher_gaps(results, tasks, teachers)
    own = {t: "base (t2i teacher)" if t == "t2i" else f"{t} teacher" for t in tasks}
    rows = ["teacher", cfg.name] + ["joint SFT"] * ("joint SFT" in models)
    texts = save_png(f"results/danceopd/{cfg.name}.png", {t: [models[own[t]]] + [models[k] for k in rows[1:]]
                                                          for t in tasks}, n_objects, res, device, cfg.rollout_steps)
    lines += ["", f"`{cfg.name}.png`: the first 4 test examples of each task ({', '.join(tasks)}, left to right), "
              f"the evaluation's noise; rows: the source image (edits), {', '.join(rows)}, the truth. Their words: "
              + "; ".join(f"{t}: " + " / ".join(texts[t]) for t in tasks) + "."]
    write_results(f"danceopd/{cfg.name}", lines, dict(config=dataclasses.asdict(cfg), teachers=paths, rows=extra,
                                                      results=results))
    return results


@torch.no_grad()
def save_png(path, models, n_objects, res, device, steps, n=4):
    """For the first n test examples of each task (evaluate_task's, with its noise), side by side: the source image
    (a blank tile for text-to-image), then each of models[task] (model, CFG scale) from that noise, then the truth.
    Returns each task's captions or instructions."""
    blocks, texts = [], {}
    for task, rows in models.items():
        b = data.make_batch(task, n, res, device, seed=0, split="test", n_objects=n_objects,
                            text_len=rows[0][0].config.max_text_len)
        noise = torch.randn(b.target.shape, generator=torch.Generator().manual_seed(0)).to(device)
        source = b.cond[:, :3] if b.cond is not None else b.ref if b.ref is not None else torch.zeros_like(b.target)
        made = [euler(model, noise, model_inputs(b), steps, scale).clamp(-1, 1) for model, scale in rows]
        blocks.append(torch.cat([torch.cat(list(r), 2) for r in [source] + made + [b.target]], 1))
        texts[task] = b.text
    os.makedirs(os.path.dirname(path), exist_ok=True)
    world.to_pil(torch.cat(blocks, 2)).save(path)
    return texts


def teacher_gaps(results, tasks, teachers):
    """Table lines: each model minus the task's teacher, paired over the same examples and noise (mean +- SE), in
    success and PSNR to the truth; the teacher rows themselves are left out. Moves the per-example lists out of
    `results` (its JSON keeps these gaps instead)."""
    own = {t: "base (t2i teacher)" if t == "t2i" else f"{t} teacher" for t in tasks if t in teachers}
    each = {label: {t: r[t].pop("per_example") for t in tasks} for label, r in results.items()}
    lines = ["", "Each model minus the task's teacher on the same examples and noise, mean +- one standard error: "
             "success; PSNR to the truth (dB).", "", "| model | " + " | ".join(tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for label, r in results.items():
        if label in own.values():
            continue
        cells = []
        for t in tasks:
            gap = {k: paired_difference(each[label][t][k], each[own[t]][t][k]) for k in ("success", "psnr_truth")
                   if k in each[label][t]}
            r[t]["vs_teacher"] = gap
            cells.append("; ".join(f"{m:+.3f} +- {se:.3f}" if k == "success" else f"{m:+.2f} +- {se:.2f} dB"
                                   for k, (m, se) in gap.items()))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def command_args(cfg):
    """The command's flags that reproduce a run: its preset (auto differs by device), then every --key=value
    that differs from the preset's defaults."""
    return command_flags(cfg, resolve(Config(device=cfg.device, preset=cfg.preset)))


# ----------------------------------------------------------------------------- the run
# Distillation steps, batch and learning rate when left at 0, per preset: small (and tiny, for tests) the CPU run,
# base the one-GPU run (docs/danceopd.md). The base and the experts come from train.RECIPES.
DEFAULTS = dict(tiny=dict(steps=300, batch_size=16, lr=1e-3), small=dict(steps=300, batch_size=16, lr=1e-3),
                base=dict(steps=400, batch_size=64, lr=3e-4))


def resolve(cfg):
    """cfg with --preset=auto resolved (base on CUDA, small on the CPU), then options left at 0 or "" filled in."""
    name = cfg.preset if cfg.preset != "auto" else "base" if wants_cuda(cfg.device) else "small"
    d = DEFAULTS[name]
    return dataclasses.replace(cfg, preset=name, out=cfg.out or os.path.join("out", name, "danceopd"),
                               steps=cfg.steps or d["steps"], batch_size=cfg.batch_size or d["batch_size"],
                               lr=cfg.lr or d["lr"])


def train(cfg):
    check_config(cfg)  # options and their relations, before anything is built (parse_config checks them too)
    tasks, cfg = cfg.tasks.split(","), resolve(cfg)
    env = setup(cfg)
    if env.world > 1:
        raise SystemExit("distill_onpolicy.py runs in one process (no torchrun)")
    ckpt_path, start = os.path.join(cfg.out, "ckpt.pt"), 0
    run = dict(device=cfg.device, compile=cfg.compile, quiet=cfg.quiet)
    base = prerequisite(cfg.preset, "base", cfg.base, **run)
    mcfg = preset_model_config(base, cfg.preset)  # the teachers and the student take the base's model config
    named, where = dict(pairs(cfg.experts)), dict(edit_data=cfg.edit_data, one_edit_token=cfg.one_edit_token)
    paths = {t: base if t == "t2i" else prerequisite(cfg.preset, t, named.get(t, ""), base, world=where, **run)
             for t in tasks}
    extra = dict(pairs(cfg.compare))  # more rows of the table; first joint SFT, the paper's main comparison
    if cfg.joint_sft and cfg.eval_n and len(tasks) > 1:  # built before the student, as every prerequisite
        extra = {"joint SFT": prerequisite(cfg.preset, "joint", "", base, world=where, tasks=tasks, **run), **extra}
    base_ckpt, n_objects = load_checkpoint(base, mcfg), scene_objects(base)
    own = {t: dataclasses.replace(mcfg, one_edit_token=preset_model_config(paths[t], cfg.preset).one_edit_token)
           for t in tasks}  # the base reads tasks with a token each; edit teachers as the world says (checked)
    mcfg = dataclasses.replace(mcfg, one_edit_token=cfg.one_edit_token)  # the student reads as its edit teachers
    teachers = {task: load_teacher(paths[task], own[task], task, env.device) for task in tasks}
    torch.manual_seed(cfg.seed)  # the LoRA init; everything later draws from step_generator
    init = load_checkpoint(cfg.init, dataclasses.replace(mcfg, one_edit_token=preset_model_config(
        cfg.init, cfg.preset).one_edit_token))["ema"] if cfg.init else base_ckpt["ema"]  # same weights, any token
    student = make_student(init, mcfg, cfg.lora_rank, cfg.lora_scale, env.device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=env.device.type == "cuda")
    if cfg.resume:
        ck = load_checkpoint(ckpt_path, mcfg)
        student.load_state_dict(ck["student"]), opt.load_state_dict(ck["opt"])
        start = ck["step"]
    # compiled modules for the hot loop; save, merge and evaluate from the plain ones
    train_student = torch.compile(student) if env.compile else student
    fields = {k: torch.compile(m) if env.compile else m for k, m in teachers.items()}
    res, n_probe = mcfg.image_size, min(16, cfg.batch_size)
    probes = {task: (data.make_batch(task, n_probe, res, env.device, seed=10_000, split="test",
                                     n_objects=n_objects, text_len=mcfg.max_text_len),
                     torch.randn(n_probe, 3, res, res, generator=torch.Generator().manual_seed(10_000)).to(env.device))
              for task in tasks}  # fixed conditions and noise for the field error in the log

    def save(step):  # model = ema = the merged student (a standard checkpoint); student + opt for --resume
        merged = merged_copy(student).state_dict()
        save_checkpoint(ckpt_path, model=merged, ema=merged, student=student.state_dict(), opt=opt.state_dict(),
                        step=step, tasks=sorted(set(base_ckpt.get("tasks", [])) | set(tasks)),
                        config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(mcfg))

    os.makedirs(cfg.out, exist_ok=True)
    log = open(os.path.join(cfg.out, "log.jsonl"), "a")
    print(f"DanceOPD on {env.device}: preset {cfg.preset}, teachers {', '.join(tasks)}, {cfg.mode} {cfg.routing}, "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable params, steps {start} to {cfg.steps}")
    end = cfg.stop_at or cfg.steps
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=cfg.quiet)
    t0 = time.time()
    for step in bar:
        if step > start and step % cfg.ckpt_every == 0:                           # checkpoint
            save(step)
        batch = get_batch(cfg, tasks, step, res, env.device, mcfg.max_text_len, n_objects)  # routing: the bucket
        # forward under ctx (rollout without grad inside), backward, clip, step
        with env.ctx:
            loss, logs = distill_loss(train_student, fields, batch, cfg, step_generator(cfg.seed, step),
                                      step / cfg.steps)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:                    # log (the only host sync)
            with env.ctx:
                fe = {t: field_errors(student, teachers[t], *probes[t], cfg.rollout_steps, cfg.cfg_alpha).tolist()
                      for t in tasks}
            row = dict(step=step + 1, task=batch.task, loss=logs["loss"].item(), mse=logs["mse"].item(),
                       grad_norm=grad_norm.item(), field_error={t: sum(e) / len(e) for t, e in fe.items()},
                       field_error_by_state={t: [round(x, 4) for x in e] for t, e in fe.items()},
                       minutes=(time.time() - t0) / 60)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            log.write(json.dumps(row) + "\n"), log.flush()
    save(end)
    if end == cfg.steps and cfg.eval_n:
        results = evaluate_all(cfg, tasks, merged_copy(student), teachers, paths, extra, n_objects,
                               env.device)
        log.write(json.dumps(dict(step=cfg.steps, eval=results)) + "\n")
    log.close()
    return ckpt_path


if __name__ == "__main__":
    train(parse_config(Config()))
