"""Dual-Process image generation: a frozen VLM rates images, and its gradient teaches the generator a new control.

    python dual_process.py                                       # every control: train, compare, write the tables
    python dual_process.py --controls=thick_outline              # one control
    python dual_process.py --mode=prompt --controls=night        # one LoRA per prompt, as the official code does
    python dual_process.py --controls=custom --questions="is it night ?" --oracle=sky=black,gray,navy \
        --prompts=sky=white,silver,sand                          # a control given on the command line

Luo et al. 2025, "Dual-Process Image Generation" (METHODS.md section 2). The generator is frozen and gets a fresh
LoRA per control; the judge, a VLM, is frozen too, but its gradient flows back through its input pixels. One step:
  1. B prompts the control applies to (CONTROLS[...].prompts), B noises from a fixed pool of 100;
  2. a random step i of the N-step Euler sampler: the first i steps with no gradient, to x_t;
  3. one model call with gradient: x0_hat = x_t - t v (the one-step clean estimate);
  4. the control's visual prompt, if any, drawn over x0_hat (questions.overlay, differentiable);
  5. loss = the mean over the control's questions of -log p("Yes" | x0_hat, question + " Answer with Yes or No.")
     (vlm.Judge: its own differentiable resize and normalisation); backward into the LoRA only; clip 1, AdamW.
A control is data (controls.py): its questions, the prompts it applies to, an optional visual prompt and the exact
check of it (`oracle`), an entry of CONTROLS or --questions/--oracle/--prompts. The training judge never grades
itself: every table scores the images with the exact scorer (scorer.parse) beside the judge, so reward hacking shows
as the gap.
Rows: the base; best-of-N with the same judge (N = 4, 16: the test-time alternative to training); the LoRA trained
over many prompts (--mode=control, a control the generator then has) on held-out prompts; one LoRA per prompt
(--mode=prompt, the official code's setting). Two departures from the official code, each measured in
docs/dual_process.md: the LoRA sits on the caption encoder (--lora_parts; on the DiT blocks the tiny judge was
fooled by textures), and --keep adds the judge's questions about what the prompt itself says (its object's shape,
colour, place, size, outline; its horizon; day or night), so that the control does not redraw the rest.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import scorer
import world
from common import (check_config, command_flags, load_checkpoint, model_inputs, option, parse_config, peek,
                    save_checkpoint, setup, step_generator, wants_cuda)
from controls import (CONTROLS, TRAIN_PROMPTS, caption_kept, control_prompts, custom_control, keep_questions,
                      oracle_check, questions_for)
from evaluate import plain_name_problem, write_results
from judges import prerequisite as judge_prerequisite
from model import DiT, PRESETS, add_lora, lora_parameters, merged_copy
from questions import overlay
from sample import euler, timesteps, x0_from_v
from train import preset_model_config, prerequisite


@dataclass
class Config:
    preset: str = option("auto", choices=("auto",) + tuple(PRESETS))  # tiny | small | base (auto = base on CUDA,
                                   # small on the CPU)
    base: str = option("", path="file")  # the generator ("" = out/<preset>/base/ckpt.pt, built if missing)
    judge: str = option("", path="exists")  # a local transformers VLM ("" = out/judges/<preset>/vlm, trained if
                                   # missing)
    controls: str = "thick_outline,horizon_guide,cool_palette,cool_strip,night,large"  # CONTROLS entries, or custom
    questions: str = ""            # custom: the judge's questions, "|"-separated ({color} {shape}: the prompt's object)
    oracle: str = ""               # custom: the exact check, ATTR=V1,V2;ATTR=... (the parsed image must show one)
    prompts: str = ""              # custom: the prompts it applies to, ATTR=V1,V2;... ("" = every one-object prompt)
    frees: str = ""                # custom: attributes it may change besides the oracle's, ATTR,... (not "kept")
    visual: str = ""               # custom: a visual prompt drawn over the image for the judge, line=ROW | strip=C1,C2
    mode: str = option("both", choices=("control", "prompt", "both"))  # control: one LoRA over many prompts |
                                   # prompt: one LoRA per prompt | both
    out: str = option("", path="dir")  # run directory ("" = out/<preset>/dual_process): <control>/ckpt.pt, log.jsonl
    resume: bool = False           # continue each control's ckpt.pt to `steps` (a finished one is only evaluated)
    steps: int = option(300, low=1)  # control mode: optimizer steps per control
    stop_at: int = option(0, low=0)  # stop (and checkpoint) after this step, as an interrupted run would (0 = steps)
    prompt_steps: int = option(100, low=1)  # prompt mode: steps per prompt (paper: 100)
    batch_size: int = option(8, low=1)  # prompts (and noises) per step
    lr: float = option(1e-3, above=0)  # AdamW learning rate, constant (paper: 5e-5 on FLUX)
    lora_rank: int = option(16, low=1)  # LoRA rank (paper: 16)
    lora_scale: float = option(1.0, above=0)  # LoRA scale (alpha / r)
    lora_parts: str = option("text_encoder.blocks", each=("blocks", "text_encoder.blocks"))  # where the LoRA goes:
                                   # the text encoder's blocks (how captions are read) | the DiT blocks (the paper's)
    keep: float = option(3.0, low=0)  # weight of the judge's -log p(Yes) on questions that hold the prompt's own
                                   # attributes (KEEP_QUESTIONS; 0 = off)
    anchor: float = option(0.0, low=0)  # weight of the mean squared x0 difference from the frozen base (0 = off)
    grad_clip: float = option(1.0, above=0)  # max global grad norm (paper: 1)
    sample_steps: int = option(16, low=1)  # N, the Euler steps of the sampler (and of evaluation)
    noise_pool: int = option(100, low=1)  # fixed noises training draws from (paper: 100)
    eval_n: int = option(64, low=0)  # held-out prompts per control in the table (0 = no evaluation)
    prompt_n: int = option(8, low=0)  # prompt mode: prompts, each with its own LoRA (the first eval prompts)
    best_of: str = "4,16"          # best-of-N rows, candidates scored by the same judge
    log_every: int = option(25, low=1)  # steps between log lines
    ckpt_every: int = option(100, low=1)  # steps between checkpoints (and one at the end)
    name: str = "dual_process"     # results/dual_process/<name>.md and .json, <name>_<control>.png
    seed: int = option(0, low=0)   # everything random is a function of (seed, step)
    device: str = option("auto", choices=("auto", "cpu", "cuda"), device=True)  # auto | cpu | cuda
    compile: str = option("auto", choices=("auto", "on", "off"))  # auto (= on for CUDA) | on | off
    quiet: bool = False            # no progress bars

    def check(self):
        yield plain_name_problem(self.name, "dual_process")
        yield f"{self.judge} is not a saved transformers model (no config.json)" \
            if self.judge and not os.path.isfile(os.path.join(self.judge, "config.json")) else ""
        for name in self.controls.split(","):
            if name == "custom":
                try:
                    custom_control(self)
                except ValueError as e:
                    yield f"custom control: {e}"
            elif name not in CONTROLS:
                yield f"--controls: unknown control {name!r} (one of {', '.join(CONTROLS)}, custom)"
        yield "" if all(n.isdigit() and int(n) >= 1 for n in self.best_of.split(",") if n) else \
            f"--best_of={self.best_of}: a comma-separated list of whole numbers >= 1"
        cfg = resolve(self)
        yield f"--stop_at={cfg.stop_at} is beyond --steps={cfg.steps}" if cfg.stop_at > cfg.steps else ""
        for name in self.controls.split(",") if self.mode != "prompt" else []:
            ckpt = os.path.join(cfg.out, name, "ckpt.pt")
            if os.path.exists(ckpt) and not cfg.resume:
                yield f"{ckpt} exists: pass --resume to continue (or re-evaluate) it, or choose another --out"
            elif os.path.exists(ckpt):
                yield resume_problem(cfg, ckpt, peek(ckpt))


def resume_problem(cfg, ckpt, saved):
    """What forbids continuing the checkpoint `ckpt` (its peeked dict) under cfg, or "": a resume goes forward only,
    with the LoRA it was saved with."""
    made, old = saved.get("step", 0), saved.get("config", {})
    if made > cfg.steps:
        return f"--resume: {ckpt} is at step {made}, beyond --steps={cfg.steps}"
    if cfg.stop_at and (cfg.stop_at < made or cfg.stop_at == made < cfg.steps):
        return f"--resume: {ckpt} is already at step {made}; --stop_at={cfg.stop_at} would go back (or stay)"
    changed = [k for k in ("preset", "lora_rank", "lora_parts", "lora_scale") if k in old and old[k] != getattr(cfg, k)]
    return f"--resume: {ckpt} was trained with --{changed[0]}={old[changed[0]]}" if changed else ""


def judge_log_p(judge, images, questions, visual=None):
    """Mean over each image's questions of log p(answer | image with the visual prompt, question): (B,). A question
    is a string (the answer "Yes") or a (question, answer) pair, answer True for "Yes", False for "No"."""
    images = overlay(images, visual)
    k = len(questions[0])
    flat = [q if isinstance(q, tuple) else (q, True) for qs in questions for q in qs]  # B k, image-major
    log_p = judge.log_probs(images.repeat_interleave(k, 0), [q for q, _ in flat])     # (B k, vocab)
    answer = torch.tensor([judge.yes_id if a else judge.no_id for _, a in flat], device=log_p.device)
    return log_p.gather(1, answer[:, None]).view(len(images), k).mean(1)


def control_loss(model, judge, control, inputs, questions, noise, i, steps, *, base=None, anchor=0.0, kept=None,
                 keep=0.0, detach_image=False):
    """Steps 2-5 on one batch: the first i Euler steps without gradient, one with, the judge's -log p(Yes) on the
    control's questions; with keep > 0, plus keep * that on the questions `kept` that hold the prompt (--keep); with
    anchor > 0, plus anchor * the mean squared difference of x0_hat from the frozen base's at the same state.
    Returns (loss, logs); detach_image cuts the image from the graph (tests: the LoRA learns through it only)."""
    x_t = euler(model, noise, inputs, steps, stop=i)                               # (B, 3, H, W), no grad
    t = timesteps(steps, device=noise.device)[i]
    x0 = x0_from_v(x_t, t, model(x_t, t.expand(len(x_t)), **inputs)).clamp(-1, 1)  # one call with grad
    if detach_image:
        x0 = x0.detach()
    log_p = judge_log_p(judge, x0, questions, control.visual)                      # (B,)
    loss, logs = -log_p.mean(), dict(p_yes=log_p.detach().exp().mean())
    if keep and kept and kept[0]:
        log_p_kept = judge_log_p(judge, x0, kept)                                  # the image itself, no prompt
        loss, logs["p_kept"] = loss - keep * log_p_kept.mean(), log_p_kept.detach().exp().mean()
    if anchor:
        with torch.no_grad():
            x0_base = x0_from_v(x_t, t, base(x_t, t.expand(len(x_t)), **inputs)).clamp(-1, 1)
        drift = (x0.float() - x0_base.float()).square().mean()
        loss, logs["drift"] = loss + anchor * drift, drift.detach()
    return loss, dict(logs, loss=loss.detach())


# ----------------------------------------------------------------------------- training a LoRA
def train_lora(cfg, env, base_state, mcfg, judge, control, specs, tokens, steps, log=None, ckpt_path=None):
    """A fresh LoRA on the frozen base, trained `steps` steps on the control over (specs, tokens): each step draws
    batch_size of them and as many noises from the pool. With ckpt_path: checkpoints, and --resume continues.
    Returns the merged model (a plain DiT), the training seconds (all of them, across resumes) and the last step."""
    torch.manual_seed(cfg.seed)                                                    # the LoRA init
    model = DiT(mcfg)
    model.load_state_dict(base_state)
    add_lora(model, cfg.lora_rank, cfg.lora_scale, parts=tuple(cfg.lora_parts.split(",")))  # the rest frozen
    model = model.to(env.device).train()
    base = None
    if cfg.anchor:                                                                 # frozen, for --anchor
        base = DiT(mcfg)
        base.load_state_dict(base_state)
        base = base.to(env.device).eval().requires_grad_(False)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=env.device.type == "cuda")
    start, before = 0, 0.0                                                         # steps and seconds so far
    if ckpt_path and cfg.resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, mcfg)
        missing = {k for k in model.state_dict() if "lora_" in k} - set(ck["lora"])
        if missing or set(ck["lora"]) - set(model.state_dict()):
            raise SystemExit(f"--resume: {ckpt_path} holds another LoRA ({len(missing)} of this one's tensors missing)")
        model.load_state_dict(ck["lora"], strict=False), opt.load_state_dict(ck["opt"])
        start, before = ck["step"], ck.get("seconds", 0.0)
    train_model = torch.compile(model) if env.compile else model
    pool = torch.randn(cfg.noise_pool, 3, mcfg.image_size, mcfg.image_size,
                       generator=torch.Generator().manual_seed(cfg.seed)).to(env.device)
    questions, kept = questions_for(control, specs), keep_questions(control, specs)
    end, t0 = min(steps, cfg.stop_at or steps), time.time()

    def save(step):
        lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        merged = merged_copy(model).state_dict()
        save_checkpoint(ckpt_path, lora=lora, opt=opt.state_dict(), step=step, model=merged, ema=merged,
                        seconds=before + time.time() - t0, tasks=["t2i"], config=dataclasses.asdict(cfg),
                        model_config=dataclasses.asdict(mcfg))

    for step in tqdm(range(start, end), initial=start, total=steps, disable=cfg.quiet or log is None):
        if ckpt_path and step > start and step % cfg.ckpt_every == 0:             # checkpoint
            save(step)
        gen = step_generator(cfg.seed, step)                                       # batch: prompts, noises, i
        pick = torch.randint(len(specs), (cfg.batch_size,), generator=gen).tolist()  # B prompts, with replacement
        noise = pool[torch.randint(cfg.noise_pool, (len(pick),), generator=gen).to(env.device)]
        i = int(torch.randint(cfg.sample_steps, (1,), generator=gen))
        inputs = dict(task=torch.zeros(len(pick), dtype=torch.long, device=env.device),
                      tokens=tokens[pick].to(env.device), cond=None, ref=None)
        with env.ctx:                                                              # forward under ctx
            loss, logs = control_loss(train_model, judge, control, inputs, [questions[k] for k in pick], noise, i,
                                      cfg.sample_steps, base=base, anchor=cfg.anchor, kept=[kept[k] for k in pick],
                                      keep=cfg.keep)
        loss.backward()                                                            # backward, clip, step
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == end):  # log
            log.write(json.dumps(dict(step=step + 1, **{k: v.item() for k, v in logs.items()},
                                      grad_norm=grad_norm.item(), i=i, minutes=(time.time() - t0) / 60)) + "\n")
            log.flush()
    if ckpt_path:
        save(end)
    return merged_copy(model), before + time.time() - t0, end


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(model, tokens, noise, steps, device):
    inputs = dict(task=torch.zeros(len(tokens), dtype=torch.long, device=device), tokens=tokens.to(device),
                  cond=None, ref=None)
    return euler(model, noise, inputs, steps).clamp(-1, 1)


@torch.no_grad()
def score_row(control, judge, images, specs, questions):
    """Oracle success, the judge's p(Yes) and its yes-rate, their gap, and the caption kept, for one row."""
    log_p, found = judge_log_p(judge, images, questions, control.visual), [scorer.parse(x) for x in images]
    (kept, broken), oracle = caption_kept(control, found, specs), oracle_check(control, found).float()
    judge_yes = (log_p > np.log(0.5)).float()
    return dict(oracle=oracle.mean().item(), judge_p_yes=log_p.exp().mean().item(), judge_yes=judge_yes.mean().item(),
                gap=(judge_yes.mean() - oracle.mean()).item(), caption_kept=kept.float().mean().item(), broken=broken,
                n=len(images))


@torch.no_grad()
def best_of(model, judge, control, tokens, questions, noises, steps, device):
    """For each prompt, the candidate (one per noise in noises, (N, B, 3, H, W)) the judge rates highest."""
    candidates = torch.stack([generate(model, tokens, x, steps, device) for x in noises])       # (N, B, 3, H, W)
    scores = torch.stack([judge_log_p(judge, c, questions, control.visual) for c in candidates])  # (N, B)
    return candidates[scores.argmax(0), torch.arange(candidates.shape[1])]


def timed(fn):
    """fn() and its wall-clock seconds, with the GPU's queued work finished before the clock stops."""
    t0 = time.time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.time() - t0


EVAL_SEED = 10_000  # evaluation noise, apart from the training pool's (seeded by --seed)


def eval_noise(n, mcfg, k, seed=EVAL_SEED):
    """The k-th evaluation noise of n prompts: k = 0 is every row's own sample, k > 0 best-of-N's other candidates."""
    return torch.randn(n, 3, mcfg.image_size, mcfg.image_size, generator=torch.Generator().manual_seed(seed + k))


def save_pair(path, base, trained, n=8):
    """A PNG: the base's samples above the trained model's, the same prompts and noise."""
    rows = [torch.cat(list(x[:n]), 2) for x in (base, trained)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    world.to_pil(torch.cat(rows, 1)).save(path)


def evaluate_control(cfg, env, mcfg, generator, base_state, judge, name, control, model, seconds):
    """The table rows of one control on cfg.eval_n held-out prompts, each row from the same noise: the base,
    best-of-N, the LoRA trained over many prompts (`model`, if any), and one LoRA per prompt (--mode=prompt)."""
    seen = control_prompts(control, TRAIN_PROMPTS, "train", cfg.seed)[0]                # held out: none of these
    specs, _, tokens = control_prompts(control, cfg.eval_n, "test", cfg.seed, mcfg.max_text_len, exclude=seen)
    questions, rows = questions_for(control, specs), {}
    noise = eval_noise(cfg.eval_n, mcfg, 0).to(env.device)
    generate(generator, tokens[:1], noise[:1], cfg.sample_steps, env.device)     # warm-up, untimed
    base_images, seconds_base = timed(lambda: generate(generator, tokens, noise, cfg.sample_steps, env.device))
    per_image = seconds_base / cfg.eval_n
    rows["base"] = dict(score_row(control, judge, base_images, specs, questions), train_s=0.0,
                        sample_ms=1e3 * per_image)
    for n in (int(n) for n in cfg.best_of.split(",") if n):
        noises = torch.stack([eval_noise(cfg.eval_n, mcfg, k) for k in range(n)]).to(env.device)
        chosen, spent = timed(lambda: best_of(generator, judge, control, tokens, questions, noises, cfg.sample_steps,
                                              env.device))
        rows[f"best-of-{n}"] = dict(score_row(control, judge, chosen, specs, questions), train_s=0.0,
                                    sample_ms=1e3 * spent / cfg.eval_n)
    if model is not None:
        images = generate(model.eval(), tokens, noise, cfg.sample_steps, env.device)
        rows["LoRA, one per control"] = dict(score_row(control, judge, images, specs, questions), train_s=seconds,
                                             sample_ms=1e3 * per_image)
        save_pair(f"results/dual_process/{cfg.name}_{name}.png", base_images, images)
    k = min(cfg.prompt_n, cfg.eval_n)
    if cfg.mode in ("prompt", "both") and k:
        images, seconds = [], 0.0
        for j in range(k):                                                         # a fresh LoRA per prompt
            lora, s, _ = train_lora(cfg, env, base_state, mcfg, judge, control, specs[j:j + 1], tokens[j:j + 1],
                                    cfg.prompt_steps)
            images.append(generate(lora.eval(), tokens[j:j + 1], noise[j:j + 1], cfg.sample_steps, env.device))
            seconds += s
        rows[f"LoRA, one per prompt (first {k})"] = dict(score_row(control, judge, torch.cat(images), specs[:k],
                                                                   questions[:k]), train_s=seconds / k,
                                                         sample_ms=1e3 * per_image)
        rows[f"base (first {k})"] = dict(score_row(control, judge, base_images[:k], specs[:k], questions[:k]),
                                         train_s=0.0, sample_ms=1e3 * per_image)
    return rows


# ----------------------------------------------------------------------------- the run
def resolve(cfg):
    """cfg with --preset=auto resolved (base on CUDA, small on the CPU) and the default --out."""
    name = cfg.preset if cfg.preset != "auto" else "base" if wants_cuda(cfg.device) else "small"
    return dataclasses.replace(cfg, preset=name, out=cfg.out or os.path.join("out", name, "dual_process"))


def train(cfg):
    check_config(cfg)
    cfg = resolve(cfg)
    env = setup(cfg)
    run = dict(device=cfg.device, compile=cfg.compile, quiet=cfg.quiet)
    base = prerequisite(cfg.preset, "base", cfg.base, **run)
    mcfg = preset_model_config(base, cfg.preset)
    judge = judge_prerequisite("vlm", "tiny" if cfg.preset == "tiny" else "small", cfg.judge, cfg.device, cfg.quiet)
    base_state = load_checkpoint(base, mcfg)["ema"]
    generator = DiT(mcfg)
    generator.load_state_dict(base_state)
    generator = generator.to(env.device).eval()
    controls = {n: custom_control(cfg) if n == "custom" else CONTROLS[n] for n in cfg.controls.split(",")}
    results, lines = {}, []
    os.makedirs(cfg.out, exist_ok=True)
    for name, control in controls.items():
        specs, _, tokens = control_prompts(control, TRAIN_PROMPTS, "train", cfg.seed, mcfg.max_text_len)
        model, seconds, end = None, 0.0, cfg.steps
        if cfg.mode in ("control", "both"):                                        # one LoRA over many prompts
            with open(os.path.join(cfg.out, f"{name}_log.jsonl"), "a") as log:
                model, seconds, end = train_lora(cfg, env, base_state, mcfg, judge, control, specs, tokens, cfg.steps,
                                                 log, os.path.join(cfg.out, name, "ckpt.pt"))
        if not cfg.eval_n or end < cfg.steps:                                      # no table: none asked, or stopped
            continue
        results[name] = evaluate_control(cfg, env, mcfg, generator, base_state, judge, name, control, model, seconds)
        lines += table_lines(name, control, results[name], cfg)
        print("\n".join(lines[-len(results[name]) - 5:]))
    if results:
        write_results(f"dual_process/{cfg.name}", [head_line(cfg)] + lines,
                      dict(config=dataclasses.asdict(cfg), base=base, results=results))
    return results


def head_line(cfg):
    return (f"Dual-Process controls, preset {cfg.preset}: {cfg.eval_n} held-out prompts per control, "
            f"{cfg.sample_steps} Euler steps; LoRA rank {cfg.lora_rank}, {cfg.steps} steps of {cfg.batch_size} prompts "
            f"at lr {cfg.lr} (per prompt: {cfg.prompt_steps} steps). oracle = the exact scorer's check; judge = the "
            f"training VLM's mean p(Yes) (per image, the geometric mean over the control's questions) and its "
            f"yes-rate (p > 0.5); gap = yes-rate - oracle; kept = the prompt's other attributes all right (most "
            f"broken: the attribute wrong most often, and how often). "
            f"Command: `python dual_process.py {command_args(cfg)}`")


def table_lines(name, control, rows, cfg):
    q = " / ".join(control.questions) + (f" (visual prompt {control.visual[0]})" if control.visual else "")
    return ["", f"**{name}**: {q}; oracle {control.oracle}", "",
            "| row | oracle | judge p(Yes) | judge yes | gap | caption kept | most broken | train s "
            "| sample ms/image |",
            "|---|---|---|---|---|---|---|---|---|"] + \
        [f"| {row} | {r['oracle']:.3f} | {r['judge_p_yes']:.3f} | {r['judge_yes']:.3f} | {r['gap']:+.3f} | "
         f"{r['caption_kept']:.3f} | {most_broken(r['broken'])} | {r['train_s']:.0f} | {r['sample_ms']:.1f} |"
         for row, r in rows.items()]


def most_broken(broken):
    """The attribute a row breaks most often, with its rate ("-" when none breaks)."""
    name, rate = max(broken.items(), key=lambda kv: kv[1])
    return f"{name} {rate:.2f}" if rate else "-"


def command_args(cfg):
    return command_flags(cfg, resolve(Config(device=cfg.device, preset=cfg.preset)))


if __name__ == "__main__":
    train(parse_config(Config()))
