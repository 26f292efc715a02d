"""ByteEdit: reward feedback for inpainting and outpainting, then the same quality in few steps.

    python feedback.py                                     # every arm and phase, and the table
    python feedback.py --arms=pefl+adv --phases=20,4       # one arm, two phases
    python feedback.py --arms=pefl --phases=20 --steps=300 # PeFL alone, at 20 steps, longer

Su et al. 2024, "ByteEdit: Boost, Comply and Accelerate Generative Image Editing" (METHODS.md section 4); no public
code, the feedback step follows ReFL (Xu et al. 2023, THUDM/ImageReward). The generator is the fill model (train.py's
fill recipe: the base taught inpainting and outpainting), fully fine-tuned, with an EMA. One optimizer step of a
phase with T sampling steps and (T1, T2) = PHASES[T]:
  1. a batch of one task, inpainting and outpainting in turn: caption, masked image, mask and the truth;
  2. the ordinary flow-matching loss on it (train.flow_matching_loss);
  3. perceptual feedback (PeFL): the masked input noised straight to t = T1 / T (not pure noise), Euler steps of the
     T-step grid with no gradient down to a random state j with t_j <= T2 / T, one call with gradient: x0_hat;
  4. rewards on x0_hat, each -log sigmoid(R): aesthetic R_a(x0_hat) and alignment R_b(x0_hat, caption), frozen
     (rewards.py, trained by judges.py); plus eta (L1 + perceptual) against the truth, the perceptual distance from
     the frozen aesthetic CNN's features (rewards.perceptual);
  5. pixel coherence (adversarial): the known pixels pasted around x0_hat's hole; the per-pixel discriminator
     (rewards.Discriminator) is asked which pixels are real, and the generator pays -log sigmoid(D) on the hole;
  6. loss = flow matching + feedback_weight (R_a + R_b terms + eta (L1 + perceptual)) + adv_weight coherence;
     clip 1, AdamW, EMA. Then the discriminator's own step: the truth is real everywhere, the pasted output is real
     outside the hole and fake inside it.
An arm is which of these a run uses (--arms: sft = steps 1-2 only; pefl = 1-4; pefl+adv = 1-5). Progressive
acceleration (--phases=20,8,4,1): each phase trains at its step count from the weights and the discriminator the
phase before it left. Rows, on held-out scenes and masks, inpainting and outpainting apart, each at its own step
count and from the same noise: the untrained fill model at every phase's steps, then every arm's every phase.
Columns: content success in the hole, seam error, PSNR outside, the whole caption right (all by the exact scorer),
and each reward's score (the hacking meter). Findings: docs/feedback.md.
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
from common import (check_config, command_flags, ema_update, load_checkpoint, model_inputs, option, parse_config, peek,
                    resume_problem, save_checkpoint, setup, step_generator, wants_cuda)
from evaluate import plain_name_problem, write_results
from judges import prerequisite as judge_prerequisite
from model import DiT, PRESETS
from rewards import Discriminator, perceptual
from sample import euler, interpolate, timesteps, x0_from_v
from train import flow_matching_loss, preset_model_config, prerequisite, scene_objects, shared_path

PHASES = {20: (15, 10), 8: (6, 3), 4: (3, 2), 2: (2, 1), 1: (1, 1)}  # T: (T1, T2); the paper's are 20 and 8
ARMS = ("sft", "pefl", "adv", "pefl+adv")
NAMES = {"sft": "flow matching only", "pefl": "PeFL", "adv": "adversarial only", "pefl+adv": "PeFL + adversarial"}
TASKS = ("inpaint", "outpaint")
EVAL_SEED = 10_000


@dataclass
class Config:
    preset: str = option("auto", choices=("auto",) + tuple(PRESETS))  # tiny | small | base (auto = base on CUDA,
                                   # small on the CPU)
    generator: str = option("", path="file")  # the fill model ("" = train.py's fill recipe beside
                                   # out/<preset>/base/ckpt.pt, built if missing)
    aesthetic: str = option("", path="file")  # the aesthetic reward ("" = out/judges/<preset>/aesthetic.pt)
    alignment: str = option("", path="file")  # the alignment reward ("" = out/judges/<preset>/alignment.pt)
    arms: str = option("sft,pefl,pefl+adv", each=ARMS)  # runs of the one loop: sft (flow matching only) | pefl | adv |
                                   # pefl+adv
    phases: str = "20,8,4,1"       # progressive acceleration: the sampling steps T of each phase, in order (keys of
                                   # PHASES); the untrained rows are sampled at each of them too
    out: str = option("", path="dir")  # checkpoints <arm>/T<T>/ckpt.pt and logs ("" = out/<preset>/feedback)
    resume: bool = False           # continue each phase's ckpt.pt to `steps` (a finished one is only evaluated)
    steps: int = option(150, low=1)  # optimizer steps per phase
    stop_at: int = option(0, low=0)  # stop (and checkpoint) each arm's phase at this step, as an interrupted run
                                   # would (0 = steps)
    batch_size: int = option(16, low=1)  # examples per step (one task per step, inpaint and outpaint in turn)
    lr: float = option(5e-5, above=0)  # AdamW learning rate of the generator, constant
    ema: float = option(0.95, low=0, high=1)  # EMA decay; the EMA is what is evaluated and what the next phase starts
    feedback_weight: float = option(0.05, low=0)  # weight of the PeFL terms (paper: 0.01)
    adv_weight: float = option(0.05, low=0)  # weight of the coherence (adversarial) term (paper: 0.05)
    eta: float = option(1.0, low=0)  # weight of L1 + perceptual against the truth, inside the PeFL terms
    disc_lr: float = option(1e-3, above=0)  # AdamW learning rate of the discriminator
    cond_drop: float = option(0.1, low=0, high=1)  # flow matching: chance of an empty caption, as the fill recipe
    eval_n: int = option(128, low=1)  # held-out examples per task in the table
    log_every: int = option(25, low=1)  # steps between log lines
    ckpt_every: int = option(50, low=1)  # steps between checkpoints (and one at the end of each phase)
    name: str = "feedback"         # results/feedback/<name>.md, .json and .png
    seed: int = option(0, low=0)   # everything random is a function of (seed, step)
    device: str = option("auto", choices=("auto", "cpu", "cuda"), device=True)  # auto | cpu | cuda
    compile: str = option("auto", choices=("auto", "on", "off"))  # auto (= on for CUDA) | on | off
    quiet: bool = False            # no progress bars

    def check(self):
        yield plain_name_problem(self.name, "feedback")
        items = self.phases.split(",")
        bad = [p for p in items if not p.isdigit() or int(p) not in PHASES] or len(set(items)) < len(items)
        yield f"--phases={self.phases}: distinct phases, each one of {', '.join(map(str, PHASES))} steps" \
            if bad else ""
        if bad:
            return
        for kind in ("aesthetic", "alignment"):
            yield reward_problem(getattr(self, kind), kind)
        made = peek(self.generator).get("tasks", []) if self.generator else TASKS
        yield (f"--generator={self.generator} was trained for {', '.join(made)}, not inpaint and outpaint: give a "
               f"fill model (train.py --task=joint --joint_tasks=inpaint,outpaint)") if set(TASKS) - set(made) else ""
        cfg = resolve(self)
        yield f"--stop_at={cfg.stop_at} is beyond --steps={cfg.steps}" if cfg.stop_at > cfg.steps else ""
        for arm in cfg.arms.split(","):
            for T in cfg.phase_list():
                yield resume_problem(phase_path(cfg, arm, T), cfg, RESUME_SAME)

    def phase_list(self):
        return [int(p) for p in self.phases.split(",")]


RESUME_SAME = ("preset", "generator", "phases", "steps", "batch_size", "lr", "ema", "feedback_weight", "adv_weight",
               "eta", "disc_lr", "cond_drop", "seed")  # a resumed phase keeps its recipe and its chain


def reward_problem(path, kind):
    """What is wrong with a reward file given on the command line, or "" (none given, or a saved `kind` reward)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True) if path else {"kind": kind}
    except Exception:
        ck = None
    return "" if isinstance(ck, dict) and ck.get("kind") == kind else \
        f"--{kind}={path} is not a saved {kind} reward of this project (python judges.py --what={kind} makes one)"


def resolve(cfg):
    """cfg with --preset=auto resolved (base on CUDA, small on the CPU), the default --out, and the default
    --generator: train.py's fill recipe beside the shared base (train() builds it when it is missing)."""
    name = cfg.preset if cfg.preset != "auto" else "base" if wants_cuda(cfg.device) else "small"
    return dataclasses.replace(cfg, preset=name, out=cfg.out or os.path.join("out", name, "feedback"),
                               generator=cfg.generator or shared_path(name, "fill", shared_path(name, "base")))


def phase_path(cfg, arm, T):
    return os.path.join(cfg.out, arm, f"T{T}", "ckpt.pt")


# ----------------------------------------------------------------------------- the method
def pefl_state(model, batch, T, gen):
    """Step 3's no-gradient part: the masked input noised straight to t = T1 / T, then Euler steps of the T-step grid
    down to a random index j with t_j <= T2 / T. Returns (x_j, t_j) (no grad)."""
    T1, T2 = PHASES[T]
    ts, start = timesteps(T, device=batch.target.device), T - T1
    j = int(torch.randint(T - T2, T, (1,), generator=gen))
    eps = torch.randn(batch.target.shape, generator=gen).to(batch.target.device)
    x = interpolate(batch.cond[:, :3], eps, ts[start])                              # the masked image, noised
    return euler(model, x, model_inputs(batch), T, start=start, stop=j), ts[j]


def composite(x0, batch):
    """The output in the hole, the known pixels around it: what the discriminator judges."""
    return batch.mask * x0 + (1 - batch.mask) * batch.target


def coherence(disc, x0, batch):
    """R_g per image: the discriminator's mean logit over the hole's pixels of the pasted output (higher = real)."""
    logits = disc(composite(x0, batch))
    return (logits * batch.mask).sum((1, 2, 3)) / batch.mask.sum((1, 2, 3)).clamp(min=1)


def disc_loss(disc, x0, batch):
    """Per-pixel real / fake: the truth real everywhere; the pasted output real outside the hole, fake inside (each
    class of pixels its own mean, so the hole's few pixels weigh as much as the rest)."""
    real, fake, m = disc(batch.target), disc(composite(x0.detach(), batch)), batch.mask
    mean = lambda x, w: (x * w).sum() / w.sum().clamp(min=1)                        # noqa: E731
    return F.softplus(-real).mean() + mean(F.softplus(fake), m) + mean(F.softplus(-fake), 1 - m)


def feedback_loss(model, batch, noise, rewards, disc, cfg, arm, T, gen):
    """Steps 2-5 on one batch. Returns (loss, logs)."""
    loss, logs = flow_matching_loss(model, batch, noise)                            # step 2
    logs = dict(fm=logs["loss"])
    if arm == "sft":
        return loss, logs
    x_j, t_j = pefl_state(model, batch, T, gen)                                     # step 3
    x0_raw = x0_from_v(x_j, t_j, model(x_j, t_j.expand(len(x_j)), **model_inputs(batch))).float()
    x0 = x0_raw.clamp(-1, 1)                                                        # what the rewards see
    if "pefl" in arm:                                                               # step 4
        aesthetic, alignment = rewards
        r_a, r_b = aesthetic(x0), alignment(x0, batch.text)
        l1, perc = (x0_raw - batch.target).abs().mean(), perceptual(aesthetic, x0, batch.target)
        pefl = -F.logsigmoid(r_a).mean() - F.logsigmoid(r_b).mean() + cfg.eta * (l1 + perc)
        loss = loss + cfg.feedback_weight * pefl
        logs.update(r_a=r_a.mean().detach(), r_b=r_b.mean().detach(), l1=l1.detach(), perc=perc.detach())
    if "adv" in arm:                                                                # step 5
        disc.requires_grad_(False)                                                  # no grad into D from here
        r_g = coherence(disc, x0, batch)
        disc.requires_grad_(True)
        loss = loss + cfg.adv_weight * -F.logsigmoid(r_g).mean()
        logs.update(r_g=r_g.mean().detach())
    return loss, dict(logs, x0=x0.detach())


def step_batch(cfg, step, res, n_objects, text_len, device):
    """Step `step`'s batch (inpaint on even steps, outpaint on odd) and its flow-matching noise."""
    task = TASKS[step % 2]
    batch = data.make_batch(task, cfg.batch_size, res, device, seed=cfg.seed * 1_000_003 + step,
                            n_objects=n_objects, text_len=text_len)
    gen = step_generator(cfg.seed, step)
    noise = dict(t=torch.randn(cfg.batch_size, generator=gen).sigmoid(),                # logit-normal t
                 eps=torch.randn(batch.target.shape, generator=gen),
                 drop=torch.rand(cfg.batch_size, generator=gen) < cfg.cond_drop)
    return batch, {k: v.to(device) for k, v in noise.items()}


def train_phase(cfg, env, mcfg, arm, T, start, rewards, n_objects, log=None):
    """One phase of one arm: from `start` (the state dicts it inherits: model, disc), `steps` steps at T sampling
    steps; checkpoints and --resume. Returns (EMA model, discriminator, training seconds, last step)."""
    model = DiT(mcfg)
    model.load_state_dict(start["model"])
    model = model.to(env.device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.random.fork_rng():                                                   # a fresh discriminator's init
        torch.manual_seed(cfg.seed)
        disc = Discriminator(3).to(env.device)
    if start.get("disc") is not None:
        disc.load_state_dict(start["disc"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=env.device.type == "cuda")
    d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.99), weight_decay=0.0)
    path, begin, before = phase_path(cfg, arm, T), 0, 0.0
    if cfg.resume and os.path.exists(path):
        ck = load_checkpoint(path, mcfg)
        model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        disc.load_state_dict(ck["disc"]), d_opt.load_state_dict(ck["d_opt"])
        begin, before = ck["step"], ck["seconds"]
    train_model = torch.compile(model) if env.compile else model
    end, t0 = min(cfg.steps, cfg.stop_at or cfg.steps) if cfg.stop_at > begin else cfg.steps, time.time()

    def save(step):
        save_checkpoint(path, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                        disc=disc.state_dict(), d_opt=d_opt.state_dict(), step=step, arm=arm, T=T,
                        seconds=before + time.time() - t0, tasks=list(TASKS), config=dataclasses.asdict(cfg),
                        model_config=dataclasses.asdict(mcfg))

    for step in tqdm(range(begin, end), initial=begin, total=cfg.steps, disable=cfg.quiet, desc=f"{arm} T={T}"):
        if step > begin and step % cfg.ckpt_every == 0:                             # checkpoint
            save(step)
        batch, noise = step_batch(cfg, step, mcfg.image_size, n_objects, mcfg.max_text_len, env.device)
        gen = step_generator(cfg.seed, step, salt=1)                                # the PeFL start and j
        with env.ctx:                                                               # forward under ctx
            loss, logs = feedback_loss(train_model, batch, noise, rewards, disc, cfg, arm, T, gen)
        loss.backward()                                                             # backward, clip, step
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, cfg.ema)
        if "adv" in arm:                                                            # the discriminator's step
            d_opt.zero_grad(set_to_none=True)
            with env.ctx:
                d_loss = disc_loss(disc, logs.pop("x0"), batch)
            d_loss.backward()
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
            logs["d_loss"] = d_loss.detach()
        logs.pop("x0", None)
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == end):
            log.write(json.dumps(dict(step=step + 1, T=T, task=batch.task, loss=loss.item(), grad_norm=grad_norm.item(),
                                      **{k: v.item() for k, v in logs.items()}, minutes=(time.time() - t0) / 60))
                      + "\n")
            log.flush()
    if end > begin or not os.path.exists(path):                                     # not a finished phase reloaded
        save(end)
    return ema, disc, before + time.time() - t0, end


# ----------------------------------------------------------------------------- evaluation
def eval_batches(n, res, n_objects, text_len):
    """The table's held-out examples (test split: scenes and masks no training step drew), per task."""
    return {task: data.make_batch(task, n, res, seed=EVAL_SEED, split="test", n_objects=n_objects, text_len=text_len)
            for task in TASKS}


@torch.no_grad()
def fill(model, batch, noise, steps):
    """Euler sampling from pure noise at `steps` steps, as a user samples; the raw output (nothing pasted back)."""
    return euler(model, noise, model_inputs(batch), steps).clamp(-1, 1)


@torch.no_grad()
def score(images, batch, rewards, disc=None):
    """The exact scorer's metrics (success and seam with one standard error), each reward's mean score, and the
    per-image success and seam error (for paired differences between rows)."""
    m, success = scorer.score(batch.task, images, batch)
    seam, n = scorer.seam_error(images, batch.target, batch.mask).cpu().numpy(), len(images)
    aesthetic, alignment = rewards
    out = dict(success=m["success"], success_se=float(np.std(success) / np.sqrt(n)), seam=m["seam_error"],
               seam_se=float(seam.std() / np.sqrt(n)), psnr_outside=m["psnr_outside"], caption=m["full"],
               r_a=aesthetic(images).mean().item(), r_b=alignment(images, batch.text).mean().item(), n=n)
    out |= dict(r_g=coherence(disc, images, batch).mean().item()) if disc is not None else {}
    return out, dict(success=np.array(success), seam=seam)


def paired(row, base):
    """The row's change against the untrained model at the same steps, on the same examples and noise: the mean
    per-image difference of success and of seam error, each with its standard error."""
    out = {}
    for k in ("success", "seam"):
        d = row[k] - base[k]
        out |= {f"d_{k}": float(d.mean()), f"d_{k}_se": float(d.std() / np.sqrt(len(d)))}
    return out


def rows_of(model, batches, noise, steps):
    """{task: images} of one model at `steps` steps, and the sampling milliseconds per image."""
    t0, out = time.time(), {}
    for task, b in batches.items():
        out[task] = fill(model, b, noise[task], steps).cpu()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, 1e3 * (time.time() - t0) / sum(len(b.text) for b in batches.values())


def moved(batch, device):
    """The tensors a fill batch's sampling and scoring read, on `device`."""
    return dataclasses.replace(batch, tokens=batch.tokens.to(device), target=batch.target.to(device),
                               cond=batch.cond.to(device), mask=batch.mask.to(device))


# ----------------------------------------------------------------------------- the run
def train(cfg):
    check_config(cfg)
    given, cfg = cfg.generator, resolve(cfg)
    env = setup(cfg)
    run, t_start = dict(device=cfg.device, compile=cfg.compile, quiet=cfg.quiet), time.time()
    if not given:  # the fill recipe fine-tunes the shared base: both cached under out/<preset>/base
        base = prerequisite(cfg.preset, "base", **run)
        prerequisite(cfg.preset, "fill", base=base, **run)                          # at cfg.generator
    mcfg = preset_model_config(cfg.generator, cfg.preset)
    judge = "tiny" if cfg.preset == "tiny" else "small"
    rewards = tuple(judge_prerequisite(k, judge, getattr(cfg, k), cfg.device, cfg.quiet)
                    for k in ("aesthetic", "alignment"))
    generator = load_checkpoint(cfg.generator, mcfg)["ema"]
    n_objects, res, L = scene_objects(cfg.generator), mcfg.image_size, mcfg.max_text_len
    print(f"prerequisites (fill model {cfg.generator}, rewards) ready at {time.time() - t_start:.0f} s")
    batches = {k: moved(b, env.device) for k, b in eval_batches(cfg.eval_n, res, n_objects, L).items()}
    noise = {task: torch.randn(cfg.eval_n, 3, res, res, generator=torch.Generator().manual_seed(EVAL_SEED + k))
             .to(env.device) for k, task in enumerate(TASKS)}
    model = DiT(mcfg)
    model.load_state_dict(generator)
    model = model.to(env.device).eval()
    images, info = {}, {}                                                           # row -> {task: images}
    for T in cfg.phase_list():                                                      # the untrained fill model
        images[("base", T)], ms = rows_of(model, batches, noise, T)
        info[("base", T)] = dict(train_s=0.0, sample_ms=ms)
    disc = None
    os.makedirs(cfg.out, exist_ok=True)
    for arm in cfg.arms.split(","):                                                 # each arm, phase after phase
        start = dict(model=generator, disc=None)
        for T in cfg.phase_list():
            with open(os.path.join(cfg.out, f"{arm}_log.jsonl"), "a") as log:
                ema, d, seconds, end = train_phase(cfg, env, mcfg, arm, T, start, rewards, n_objects, log)
            if end < cfg.steps:                                                     # stopped by --stop_at
                break
            images[(arm, T)], ms = rows_of(ema, batches, noise, T)
            info[(arm, T)] = dict(train_s=seconds, sample_ms=ms)
            disc = d if "adv" in arm else disc
            start = dict(model=ema.state_dict(), disc=d.state_dict())
            print(f"{NAMES[arm]}, T={T}: trained in {seconds:.0f} s")
    scored = {key: {task: score(images[key][task].to(env.device), batches[task], rewards, disc) for task in TASKS}
              for key in images}
    results = {f"{arm}@{T}": dict(info[(arm, T)], **{task: dict(m, **paired(per, scored[("base", T)][task][1]))
                                                      for task, (m, per) in scored[(arm, T)].items()})
               for arm, T in scored}
    lines = table(cfg, results, time.time() - t_start, disc is not None)
    write_results(f"feedback/{cfg.name}", lines, dict(config=dataclasses.asdict(cfg), results=results))
    save_png(f"results/feedback/{cfg.name}.png", batches, images, cfg)
    return results


def table(cfg, results, seconds, has_disc):
    head = (f"ByteEdit feedback, preset {cfg.preset}: the fill model {cfg.generator} fine-tuned per phase for "
            f"{cfg.steps} steps x {cfg.batch_size} at lr {cfg.lr} (EMA {cfg.ema}); feedback weight "
            f"{cfg.feedback_weight}, eta {cfg.eta}, adversarial weight {cfg.adv_weight}. {cfg.eval_n} held-out "
            f"examples per task, every row from the same noise at its own step count. success = the hole's content "
            f"right (exact scorer); seam = the jump across the hole's border against the truth's ([0, 1] units, lower "
            f"is better); caption = the whole scene right; R_a, R_b = the aesthetic and alignment rewards; R_g = the "
            f"coherence reward, the last adversarial phase's discriminator on the hole; d success, d seam = the row "
            f"minus the untrained model at the same steps, paired on the same examples and noise; +- one standard "
            f"error. "
            f"{time.strftime('%H:%M:%S', time.gmtime(seconds))} wall. Command: `python feedback.py "
            f"{command_args(cfg)}`")
    lines = [head]
    for task in TASKS:
        lines += ["", f"**{task}**", "", "| row | steps | success | seam | d success | d seam | PSNR out | caption "
                  "| R_a | R_b | R_g | train s | ms / image |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in results.items():
            arm, T = key.split("@")
            s = r[task]
            name = "fill model, untrained" if arm == "base" else f"{NAMES[arm]}, phase {T}"
            delta = "| - | - |" if arm == "base" else \
                f"| {s['d_success']:+.3f} +- {s['d_success_se']:.3f} | {s['d_seam']:+.4f} +- {s['d_seam_se']:.4f} |"
            lines.append(f"| {name} | {T} | {s['success']:.3f} +- {s['success_se']:.3f} | {s['seam']:.4f} +- "
                         f"{s['seam_se']:.4f} {delta} {s['psnr_outside']:.1f} | {s['caption']:.3f} | {s['r_a']:.2f} | "
                         f"{s['r_b']:.2f} | " + (f"{s['r_g']:.2f}" if has_disc else "-") +
                         f" | {r['train_s']:.0f} | {r['sample_ms']:.1f} |")
    return lines


def save_png(path, batches, images, cfg, n=4):
    """For n examples of each task: the masked input; then, at the first phase's steps, at 4 (when a phase) and at
    the last phase's, the untrained model and the last arm's model; then the truth. The same noise in every row."""
    arm, phases = cfg.arms.split(",")[-1], cfg.phase_list()
    steps = dict.fromkeys([phases[0]] + [4] * (4 in phases) + [phases[-1]])
    keys = [k for T in steps for k in (("base", T), (arm, T)) if k in images]
    cols = []
    for task, b in batches.items():
        rows = [b.cond[:n, :3].cpu()] + [images[k][task][:n] for k in keys] + [b.target[:n].cpu()]
        cols.append(torch.cat([torch.cat(list(r), 2) for r in rows], 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    world.to_pil(torch.cat(cols, 2)).save(path)
    print(f"wrote {path}: rows masked input, " + ", ".join(f"{k[0]} at {k[1]} steps" for k in keys) +
          ", truth; inpainting on the left, outpainting on the right")


def command_args(cfg):
    return command_flags(cfg, resolve(Config(device=cfg.device, preset=cfg.preset)))


if __name__ == "__main__":
    train(parse_config(Config()))
