"""Score checkpoints with the exact scorer and write the comparison table (markdown + JSON) to results/.

    python evaluate.py --ckpts=out/base/ckpt.pt --tasks=t2i --name=base
    python evaluate.py --ckpts=out/local_edit/ckpt.pt,out/global_edit/ckpt.pt,out/joint/ckpt.pt \
        --tasks=t2i,local_edit,global_edit --name=interference

Every checkpoint is sampled on the same fixed-seed test examples of every task it was trained for (from the
same noise), and scored by scorer.py: no learned judge. t2i is also reported on single- and two-object scenes
and on held-out colour-shape pairs (never seen in training). A label can be given per checkpoint as
LABEL=PATH. Scores are fractions in [0, 1] except PSNR (dB) and seam error ([0, 1] pixel units).
"""
import dataclasses
import json
import os
from dataclasses import dataclass

import torch

import data
import scorer
import world
from common import check_config, load_model, model_inputs, option, pairs, parse_config, peek, wants_cuda
from sample import euler, rollout, x0_from_v


@dataclass
class Config:
    ckpts: str = option("", pairs=None, required=True)  # comma-separated checkpoints, each PATH or LABEL=PATH
    tasks: str = option("t2i", each=data.TASKS)  # tasks to score (a checkpoint not trained for one gets "-")
    n: int = option(200, low=1)   # examples per task and split
    batch_size: int = option(100, low=1)  # sampling batch
    steps: int = option(16, low=1)  # Euler steps
    cfg_scale: float = 1.0        # classifier-free guidance
    seed: int = option(0, low=0)  # data and noise seed (the same for every checkpoint)
    name: str = "eval"            # results/<name>.md and results/<name>.json (a name, or TOPIC/NAME)
    shape_probe: int = option(0, low=0)  # t2i: also draw this many 1-object scenes once per shape word (0 = off)
    teachers: str = option("", pairs=data.TASKS)  # handover probe: TASK=PATH,...; each checkpoint and its task's
                                  # teacher share rollouts
    handover_at: str = "0,1,2,4,8,12,16"  # the Euler steps at which the probe hands one model's state to the other
                                  # ("" = no handover probe)
    source_probe: bool = False    # with --teachers: how much each model's x0 estimate follows the source, per state
    paired: bool = False          # with --teachers: each checkpoint minus its task's teacher on the same examples
                                  # and noise, success and PSNR to the truth, mean +- SE (docs/danceopd.md);
                                  # add --handover_at= to skip the handover probe
    device: str = option("auto", choices=("auto", "cpu", "cuda"), device=True)  # auto | cpu | cuda

    def check(self):
        yield name_problem(self.name)
        steps_at = [k.strip() for k in self.handover_at.split(",") if k.strip()]
        yield "" if all(k.isdigit() and (int(k) <= self.steps or not self.teachers) for k in steps_at) else \
            f"--handover_at={self.handover_at}: each step must be a whole number in 0..{self.steps} (--steps)"
        yield "--source_probe=true needs --teachers=TASK=PATH,... (the probe runs on their rollouts)" \
            if self.source_probe and not self.teachers else ""
        yield "--paired=true needs --teachers=TASK=PATH,... (the references)" if self.paired and not self.teachers \
            else ""
        for label, path in pairs(self.ckpts):  # each must be a checkpoint trained for one of the tasks
            trained = peek(path).get("tasks", [])
            yield "" if set(trained) & set(self.tasks.split(",")) else \
                f"{path} was trained for {', '.join(trained) or 'no task'}, none of --tasks={self.tasks}"


# (label, split, n_objects) of the t2i rows; other tasks are scored on the test split. A model that reads shorter
# captions than world.MAX_TOKENS (train.py --text_len) cannot read 2- and 3-object captions: the 1-object rows.
T2I_SUBSETS = [("t2i", "test", None), ("t2i 1 object", "test", 1), ("t2i 2 objects", "test", 2),
               ("t2i held-out pairs", "heldout", None)]
T2I_SUBSETS_ONE_OBJECT = [("t2i 1 object", "test", 1), ("t2i held-out pairs, 1 object", "heldout", 1)]


@torch.no_grad()
def evaluate_task(model, task, n, res, device, split="test", n_objects=None, steps=16, cfg_scale=1.0, seed=0,
                  batch_size=100, first=None, handover=0, per_example=False):
    """Sample `model` on n fixed test examples of `task` and score them. Returns the scorer's means, and for
    local and global edits the success per edit kind ("success move": data.EDIT_KINDS). With `first`, that
    model takes the first `handover` Euler steps and `model` the rest, from the state `first` reached.
    per_example: also "per_example": {success: [...], psnr_truth: [...]} (where the task has it), for paired tests."""
    rows, weights, kinds, each = [], [], {}, {"success": [], "psnr_truth": []}
    for i in range(0, n, batch_size):
        b = data.make_batch(task, min(batch_size, n - i), res, device, seed=seed * 1000 + i, split=split,
                            n_objects=n_objects, text_len=model.config.max_text_len)
        noise = torch.randn(b.target.shape, generator=torch.Generator().manual_seed(seed * 1000 + i)).to(device)
        cond = model_inputs(b)
        x = noise if first is None else euler(first, noise, cond, steps, cfg_scale, stop=handover)
        x = euler(model, x, cond, steps, cfg_scale, start=0 if first is None else handover).clamp(-1, 1)
        means, success = scorer.score(task, x, b)
        if per_example:
            each["success"] += success
            each["psnr_truth"] += scorer.psnr(x, b.target).tolist() if "psnr_truth" in means else []
        rows.append(means)
        weights.append(len(b.text))
        for text, s in zip(b.text, success) if task in data.EDIT_KINDS else ():
            kinds.setdefault(data.edit_kind(task, text), []).append(s)
    out = {k: sum(r[k] * w for r, w in zip(rows, weights)) / sum(weights) for k in rows[0]}
    out |= {f"success {k}": sum(kinds[k]) / len(kinds[k]) for k in data.EDIT_KINDS.get(task, ()) if k in kinds}
    return out | (dict(per_example={k: v for k, v in each.items() if v}) if per_example else {})


def paired_difference(a, b):
    """Mean and standard error of a - b over examples scored on the same conditions and noise (lists)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need one per example on both sides, got {len(a)} and {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)  # SE: nan for one example
    return float(d.mean()), float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan")


@torch.no_grad()
def shape_probe(model, n, res, device, steps=16, cfg_scale=1.0, seed=0):
    """Draw n one-object test scenes four times, once per shape word, from the same noise. Returns
    confusion[asked][found] (counts; "other" = not exactly one object) and, for each pair of shape words, the
    mean |difference| of the two drawings divided by that of the two true renders: near 0 means the model
    draws the same thing whichever of the two shapes the caption names. Only colours that are never held out
    are used, so every swapped caption is a training combination."""
    colours = set(world.COLORS) - {c for c, _ in world.HELDOUT}
    batch = data.make_batch("t2i", 4 * n, res, device, seed=seed, split="test", n_objects=1)
    keep = [i for i, s in enumerate(batch.specs) if s.objects[0].color in colours][:n]
    noise = torch.randn(len(keep), 3, res, res, generator=torch.Generator().manual_seed(seed)).to(device)
    task = torch.zeros(len(keep), dtype=torch.long, device=device)
    drawn, rendered, confusion = {}, {}, {}
    for shape in world.SHAPES:
        specs = [dataclasses.replace(s, objects=[dataclasses.replace(s.objects[0], shape=shape)])
                 for s in (batch.specs[i] for i in keep)]
        texts = [" ".join(shape if w in world.SHAPES else w for w in batch.text[i].split()) for i in keep]
        tokens = world.tokenize(texts).to(device)
        drawn[shape] = euler(model, noise, dict(task=task, tokens=tokens), steps, cfg_scale).clamp(-1, 1)
        rendered[shape] = world.render(specs, res, device)
        found = [scorer.parse(x).objects for x in drawn[shape]]
        confusion[shape] = {k: sum(len(f) == 1 and f[0].shape == k for f in found) for k in world.SHAPES}
        confusion[shape]["other"] = sum(len(f) != 1 for f in found)
    pairs = [(a, b) for j, a in enumerate(world.SHAPES) for b in world.SHAPES[j + 1:]]
    sensitivity = {f"{a}/{b}": float((drawn[a] - drawn[b]).abs().mean() / (rendered[a] - rendered[b]).abs().mean())
                   for a, b in pairs}
    return dict(n=len(keep), confusion=confusion, sensitivity=sensitivity)


def probe_lines(label, p):
    head = ["", f"Shape probe of {label}: {p['n']} one-object test scenes drawn once per shape word from the same "
            "noise; rows = the shape asked for, columns = the shape the scorer reads.", "",
            "| asked | " + " | ".join(world.SHAPES) + " | other |", "|---|" + "---|" * (len(world.SHAPES) + 1)]
    rows = [f"| {a} | " + " | ".join(str(v) for v in p["confusion"][a].values()) + " |" for a in world.SHAPES]
    return head + rows + ["", "Drawings' difference / renders' difference, per pair of shape words: " +
                          ", ".join(f"{k} {v:.2f}" for k, v in p["sensitivity"].items())]


def handover_probe(student, teacher, task, cfg, steps_at, res, device):
    """Where along the trajectory does `student` lose its teacher? For each k in steps_at, the student takes the
    first k Euler steps and the teacher the rest ("student first"), and the other way round ("teacher first"),
    on the same examples and noise. "student first" at k says whether the student's state after k steps can
    still become the teacher's answer; "teacher first" whether the student finishes the teacher's states."""
    run = lambda first, rest, k: evaluate_task(rest, task, cfg.n, res, device, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                                               seed=cfg.seed, batch_size=cfg.batch_size, first=first, handover=k)
    out = {"student first": {}, "teacher first": {}}
    for k in steps_at:
        out["student first"][k] = run(student, teacher, k)
        out["teacher first"][k] = run(teacher, student, k)
        print(f"handover {task} at {k}: student first {out['student first'][k]['success']:.3f}, "
              f"teacher first {out['teacher first'][k]['success']:.3f}")
    return out


def handover_lines(label, task, h, steps):
    ks = list(h["student first"])
    return ["", f"Handover probe of {label} on {task}: success when one model takes the first k of "
            f"{steps} Euler steps and the other the rest, from the same noise.", "",
            "| first k steps by | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)] + \
        [f"| {who.split()[0]}, then the {'teacher' if who == 'student first' else 'student'} | " +
         " | ".join(f"{h[who][k]['success']:.3f}" for k in ks) + " |"
         for who in h]


@torch.no_grad()
def source_probe(model, teacher, task, cfg, res, device):
    """How much does `model`'s clean-image estimate follow the source image, state by state? On the teacher's
    rollouts of cfg.n test edits, each state's x0_hat = x_t - t v is computed twice, with the example's own
    source and with another example's (the batch rolled by one), and
        reliance = mean |x0_hat(other source) - x0_hat(own source)| / mean |other source - own source|,
    1 for a field that pastes whatever source it is given, 0 when the state alone decides. Returns
    {"model" | "teacher": {state index: reliance}} (state i sits at t = 1 - i / steps)."""
    b = data.make_batch(task, cfg.n, res, device, seed=cfg.seed * 1000, split="test",
                        text_len=model.config.max_text_len)
    noise = torch.randn(b.target.shape, generator=torch.Generator().manual_seed(cfg.seed * 1000)).to(device)
    own = model_inputs(b)
    other = dict(own, cond=own["cond"].roll(1, 0))
    states, ts, _ = rollout(teacher, noise, own, cfg.steps)
    gap = (other["cond"][:, :3] - own["cond"][:, :3]).abs().mean()
    x0 = lambda m, x, t, c: x0_from_v(x, t, m(x, t.expand(len(x)), **c))
    return {who: {i: float((x0(m, x, ts[i], other) - x0(m, x, ts[i], own)).abs().mean() / gap)
                  for i, x in enumerate(states)} for who, m in (("model", model), ("teacher", teacher))}


def source_lines(label, task, r):
    ks = list(r["model"])
    return ["", f"Source reliance of {label} on {task}, on its teacher's rollouts: |x0 estimate with another "
            "example's source - with its own| / |the two sources' difference|, per state (1 = pastes the source, "
            "0 = the state decides).", "", "| model | " + " | ".join(f"state {k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks)] + \
        [f"| {label if who == 'model' else 'teacher'} | " + " | ".join(f"{r[who][k]:.2f}" for k in ks) + " |"
         for who in r]


# ----------------------------------------------------------------------------- results tables
def name_problem(name):
    """What is wrong with a results name, or "": a file name, optionally in one topic folder ("danceopd/ablation")."""
    parts = name.split("/")
    if not name or len(parts) > 2 or any(not p or p.startswith(".") or "\\" in p for p in parts):
        return f"--name={name!r} must be a file name or TOPIC/NAME: results go to results/<name>.md and .json"
    return ""


def plain_name_problem(name, topic):
    """What is wrong with a method script's --name, or "": a plain file name, since its tables go to
    results/<topic>/<name>.md."""
    return "" if "/" not in name and not name_problem(name) else \
        f"--name={name!r} must be a plain file name (the tables go to results/{topic}/<name>.md)"


def write_results(name, lines, payload):
    """Print a table and write it to results/<name>.md, with `payload` as results/<name>.json (each atomically)."""
    if name_problem(name):
        raise SystemExit(name_problem(name))
    path = os.path.join("results", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for ext, text in ((".md", "\n".join(lines) + "\n"), (".json", json.dumps(payload, indent=1))):
        with open(path + ext + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ext + ".tmp", path + ext)
    print("\n".join(lines) + f"\nwrote {path}.md and {path}.json")


HEADLINE = {"psnr_outside": "PSNR out", "psnr_truth": "PSNR truth", "seam_error": "seam",
            "concept_debiased": "CP debiased", "prompt": "PF"}  # extra columns next to success


def main(cfg):
    check_config(cfg)
    device = "cuda" if wants_cuda(cfg.device) else "cpu"
    tasks = cfg.tasks.split(",")
    results, probes, handovers, sources = {}, {}, {}, {}
    steps_at = [int(k) for k in cfg.handover_at.split(",") if k.strip()]
    teachers = {task: load_model(path, device)[0] for task, path in pairs(cfg.teachers)}  # loaded once
    paired, references = {}, {}

    def reference(task, n_objects):  # the teacher's per-example scores on the same examples, computed once
        if (task, n_objects) not in references:
            references[task, n_objects] = evaluate_task(
                teachers[task], task, cfg.n, teachers[task].config.image_size, device, "test", n_objects, cfg.steps,
                cfg.cfg_scale, cfg.seed, cfg.batch_size, per_example=True)["per_example"]
        return references[task, n_objects]

    def pairable(task, split, n_objects, model):  # the teacher draws the same examples from the same noise
        t = teachers.get(task)
        return cfg.paired and t is not None and split == "test" and t.config.image_size == model.config.image_size \
            and (t.config.max_text_len >= world.MAX_TOKENS or n_objects == 1 or task != "t2i")

    def difference(mine, ref):  # {metric: (mean, SE)} of checkpoint - teacher
        return {k: paired_difference(mine[k], ref[k]) for k in mine if k in ref}

    for label, path in pairs(cfg.ckpts):
        label = label or os.path.basename(os.path.dirname(path)) or path
        model, ckpt = load_model(path, device)
        res, results[label] = model.config.image_size, {}
        for task in tasks:
            if task not in ckpt.get("tasks", []):
                continue
            short = model.config.max_text_len < world.MAX_TOKENS
            subsets = [(task, "test", None)] if task != "t2i" else T2I_SUBSETS_ONE_OBJECT if short else T2I_SUBSETS
            for name, split, n_obj in subsets:
                m = evaluate_task(model, task, cfg.n, res, device, split, n_obj, cfg.steps, cfg.cfg_scale, cfg.seed,
                                  cfg.batch_size, per_example=pairable(task, split, n_obj, model))
                if "per_example" in m:
                    paired[label, name] = difference(m.pop("per_example"), reference(task, n_obj))
                results[label][name] = m
                print(f"{label:>16s} {name:20s} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
            if task == "t2i" and cfg.shape_probe:
                probes[label] = shape_probe(model, cfg.shape_probe, res, device, cfg.steps, cfg.cfg_scale, cfg.seed)
            if task in teachers and steps_at:
                handovers[label, task] = handover_probe(model, teachers[task], task, cfg, steps_at, res, device)
            if task in teachers and cfg.source_probe:
                sources[label, task] = source_probe(model, teachers[task], task, cfg, res, device)
    columns = [c for c in dict.fromkeys(k for r in results.values() for k in r)]
    lines = [f"Exact-scorer success (fraction right) of each checkpoint, {cfg.n} test examples per column, "
             f"{cfg.steps} Euler steps, CFG {cfg.cfg_scale}. Command: `python evaluate.py {cfg_args(cfg)}`", "",
             "| checkpoint | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, r in results.items():
        cells = []
        for c in columns:
            m = r.get(c)
            extra = ", ".join(f"{HEADLINE[k]} {m[k]:.{1 if k.startswith('psnr') else 3}f}" for k in HEADLINE
                              if m and k in m)
            cells.append("-" if m is None else f"{m['success']:.3f}" + (f" ({extra})" if extra else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for task in (t for t in tasks if t in data.EDIT_KINDS):
        kinds = [k for k in data.EDIT_KINDS[task] if any(f"success {k}" in r.get(task, {}) for r in results.values())]
        if kinds:
            lines += ["", f"{task} success by edit kind:", "", "| checkpoint | " + " | ".join(kinds) + " |",
                      "|---|" + "---|" * len(kinds)]
            lines += [f"| {label} | " + " | ".join(f"{r[task].get(f'success {k}', 0):.3f}" for k in kinds) + " |"
                      for label, r in results.items() if task in r]
    if paired:
        lines += ["", "Each checkpoint minus its task's teacher (--teachers) on the same examples and noise, mean +- "
                  "one standard error: success, PSNR to the truth (dB):", "",
                  "| checkpoint | row | d success | d PSNR truth |", "|---|---|---|---|"]
        lines += [f"| {label} | {task} | " + " | ".join(f"{d[k][0]:+.3f} +- {d[k][1]:.3f}" if k in d else "-"
                                                         for k in ("success", "psnr_truth")) + " |"
                  for (label, task), d in paired.items()]
    for label, p in probes.items():
        lines += probe_lines(label, p)
    for (label, task), h in handovers.items():
        lines += handover_lines(label, task, h, cfg.steps)
    for (label, task), r in sources.items():
        lines += source_lines(label, task, r)
    extra = dict(shape_probe=probes, handover={f"{l} {t}": h for (l, t), h in handovers.items()},
                 paired={f"{l} {t}": d for (l, t), d in paired.items()},
                 source_probe={f"{l} {t}": r for (l, t), r in sources.items()})
    write_results(cfg.name, lines, dict(config=vars(cfg), results=results, **{k: v for k, v in extra.items() if v}))
    return results


def cfg_args(cfg):
    default = Config()
    return " ".join(f"--{k}={v}" for k, v in vars(cfg).items() if getattr(default, k) != v)


if __name__ == "__main__":
    main(parse_config(Config()))
