"""Speed: training throughput and MFU, eager vs torch.compile, sampling latency, peak memory, in one process.

    python bench.py                 # base preset on a GPU (tiny on the CPU) -> results/speed/bench_<device>.json
    python bench.py --preset=small --compile=off --out=results/speed/bench_small.json
    OMP_NUM_THREADS=1 python bench.py --device=cpu --batch_size=4 --sample_batches=1,4   # quick CPU run (seconds)

What is timed is the project's own code: a flow-matching step is train.py's loop body around
`train.flow_matching_loss`; a DanceOPD step is distill_onpolicy.py's around `distill_onpolicy.distill_loss`
(student rollout without grad, teacher query, student forward + backward); sampling is `sample.euler` with CFG.
Batches are built once before timing, so the renderer is not measured. Every measurement makes `warmup` untimed
calls first (they include compilation) and synchronises the GPU around the timed calls.

Model-FLOPs utilisation (MFU; Chowdhery et al. 2022, "PaLM", appendix B) = model FLOPs of a step / step time /
peak FLOP/s. The model FLOPs are counted exactly by `forward_flops` (checked against
torch.utils.flop_counter.FlopCounterMode in tests/test_bench.py); the peak is measured here, in the same run, as
the FLOP/s of one large GEMM (bf16 on CUDA, fp32 on the CPU), so MFU says how close a step gets to what this
device's matmuls actually reach. On the CPU the same code runs at the tiny preset with small counts: only its
ratios (compiled / eager, DanceOPD / flow matching) mean anything.
Quick check: OMP_NUM_THREADS=1 python -m pytest -q tests/test_bench.py
"""
import dataclasses
import gc
import itertools
import json
import os
import time
from dataclasses import dataclass

import torch

import data
import world
import distill_onpolicy as opd
import train
from common import check_config, ema_update, model_inputs, option, parse_config, setup, step_generator
from model import PRESETS, DiT, compile_blocks, count_params, preset
from sample import euler


@dataclass
class Config:
    preset: str = option("auto", choices=("auto",) + tuple(PRESETS))  # tiny | small | base (auto = base on CUDA,
                                   # tiny on the CPU)
    task: str = option("t2i", choices=data.TASKS)  # the task of every batch: sets the sequence (condition channels,
                                   # reference tokens)
    batch_size: int = option(0, low=0)  # training batch of both steps (0 = 256 on CUDA, 8 on the CPU)
    rollout_steps: int = option(16, low=1)  # DanceOPD student rollout, Euler steps (distill_onpolicy's default)
    lora_rank: int = option(32, low=0)  # DanceOPD student LoRA rank (distill_onpolicy's default)
    text_len: int = option(0, low=0, high=world.MAX_TOKENS)  # caption tokens the model reads (train.py --text_len;
                                   # 0 = world.MAX_TOKENS = 48)
    pooled_text: bool = False      # model option (train.py --pooled_text); the CPU recipe's base: both, 24 tokens
    sample_batches: str = ""       # sampling batch sizes, before CFG doubles them ("" = 1,256 CUDA; 1,8 CPU)
    sample_steps: str = "1,4,28"   # Euler steps per sample
    cfg_scale: float = 3.0         # sampler guidance scale (not 1.0: the conditional and empty caption both run)
    gemm_size: int = option(0, low=0)  # side of the square GEMM that measures peak FLOP/s (0 = 8192 CUDA, 1024 CPU)
    warmup: int = option(0, low=0)  # untimed calls before each measurement, compilation included (0 = 5 CUDA, 1 CPU)
    iters: int = option(0, low=0)  # timed training steps and GEMMs per measurement (0 = 20 CUDA, 2 CPU)
    sample_iters: int = option(0, low=0)  # timed sampler calls per (mode, batch, steps) (0 = 5 CUDA, 1 CPU)
    out: str = option("", path="outfile", suffix=(".json",))  # JSON written here ("" = results/speed/
                                   # bench_<device>.json)
    seed: int = option(0, low=0)   # weights, batches and noise
    device: str = option("auto", choices=("auto", "cpu", "cuda"), device=True)  # auto | cpu | cuda
    compile: str = option("auto", choices=("auto", "on", "off"))  # auto (= on for CUDA) | on | off: also time
                                   # torch.compile (and CUDA graphs)

    def check(self):
        for name in ("sample_batches", "sample_steps"):
            items = getattr(self, name).split(",") if getattr(self, name) else []
            yield "" if all(i.isdigit() and int(i) >= 1 for i in items) else \
                f"--{name}={getattr(self, name)}: a comma-separated list of whole numbers >= 1"


# The defaults that depend on the device (fields left at 0 / "" / "auto"): the base model at full size on a GPU;
# on the CPU the tiny preset with counts small enough for seconds.
AUTO = dict(cuda=dict(preset="base", batch_size=256, sample_batches="1,256", gemm_size=8192, warmup=5, iters=20,
                      sample_iters=5),
            cpu=dict(preset="tiny", batch_size=8, sample_batches="1,8", gemm_size=1024, warmup=1, iters=2,
                     sample_iters=1))

COND_TASKS = ("local_edit", "global_edit", "inpaint", "outpaint")  # data.make_batch gives them batch.cond
REF_TASKS = ("customize",)                                         # ... and these batch.ref
FREQ_DIM, CONV_WIDTH = 256, 32  # model.TimestepEmbedder's frequency features, model.ConvHead's width


# ----------------------------------------------------------------------------- the FLOP count
def forward_flops(cfg, task="t2i", batch=1, text_len=None, lora_rank=0):
    """Exact model FLOPs of one forward of model.DiT on `batch` samples of `task` (a multiply-add = 2 FLOPs).

    The sequence follows model.DiT.forward: [task token | L text tokens | N reference tokens (customize) | N target
    tokens], T tokens in all, N = (image_size / patch_size)^2, L = text_len (default max_text_len, the padded
    caption length). A Linear layer costs 2 * in * out for every row it is applied to:
      per target token   x_embedder (+ cond_embedder for edits / inpaint / outpaint), final_layer.linear
      per reference token ref_embedder (customize)
      per text token     the text encoder's blocks (qkv, proj, fc1, fc2) and its proj
      per sequence token each DiT block's qkv, proj, fc1, fc2 (+ LoRA's A and B: 2 * r * (in + out) each)
      per sample         t_embedder's MLP, every adaLN_modulation (6 D^2 per block, 2 D^2 final), text_pool
    plus the conv head (2 * H * W * 9 * c_in * c_out per 3x3 conv) and attention, 4 * T^2 * D per layer
    (QK^T and AV, 2 T^2 D each; the text encoder's with L). Embedding lookups, norms, activations, softmax and
    residual adds are not counted, as in FlopCounterMode and the usual MFU convention.

    Why 6 * params * T (Kaplan et al. 2020) is wrong for a DiT: it assumes every weight multiplies every token.
    Here the adaLN-Zero modulation, a third of each block's weights (6 D^2 of 18 D^2) and 28% of the base preset's,
    multiplies one vector per image; the text encoder (another 18%) sees only the L text tokens, the embedders and
    the final layer only the N image tokens; the word and task embeddings are lookups. For the base preset at t2i
    (T = 305) 6 N T is 1.66x the exact training FLOPs (3 forwards), although it leaves out attention's 4 T^2 D.
    (At the tiny preset the error flips sign, 0.97x: the conv head's weights act on every pixel, 16 per token.)

    Returns a dict of FLOPs: "linear" (every weight layer, the conv head included), "attention", "total", and the
    parts: "embed", "text_encoder", "blocks" (per-token layers), "adaLN" (t_embedder + modulations), "head"
    (final linear + conv head), "attention"."""
    D, p, H = cfg.hidden_size, cfg.patch_size, int(cfg.hidden_size * cfg.mlp_ratio)
    N = (cfg.image_size // p) ** 2
    L = cfg.max_text_len if text_len is None else text_len
    cond, ref = task in COND_TASKS, task in REF_TASKS
    T = 1 + L + ref * N + N
    out_channels = cfg.in_channels + (cfg.head_channels if cfg.conv_head else 0)

    def linear(rows, d_in, d_out, rank=0):  # 2 in out per row, + LoRA's x A^T B^T (2 r (in + out) per row)
        return 2 * rows * (d_in * d_out + rank * (d_in + d_out))

    def block(rows, rank=0):  # Attention.qkv, Attention.proj, Mlp.fc1, Mlp.fc2
        return (linear(rows, D, 3 * D, rank) + linear(rows, D, D, rank) + linear(rows, D, H, rank)
                + linear(rows, H, D, rank))

    conv_in = out_channels + cfg.in_channels  # [unpatchified output | x_t]
    conv = 2 * cfg.image_size ** 2 * 9 * (conv_in * CONV_WIDTH + CONV_WIDTH ** 2 + CONV_WIDTH * cfg.in_channels)
    parts = dict(
        embed=linear(N, p * p * cfg.in_channels, D) + cond * linear(N, p * p * cfg.cond_channels, D)
        + ref * linear(N, p * p * cfg.in_channels, D),
        text_encoder=cfg.text_depth * block(L) + linear(L, D, D),
        blocks=cfg.depth * block(T, lora_rank),
        adaLN=linear(1, FREQ_DIM, D) + linear(1, D, D) + cfg.depth * linear(1, D, 6 * D) + linear(1, D, 2 * D)
        + cfg.pooled_text * linear(1, D, D),                                # text_pool: the pooled caption
        head=linear(N, D, p * p * out_channels) + (conv if cfg.conv_head else 0),
        attention=4 * D * (cfg.text_depth * L ** 2 + cfg.depth * T ** 2))
    parts = {k: batch * v for k, v in parts.items()}
    lin = sum(v for k, v in parts.items() if k != "attention")
    return dict(linear=lin, attention=parts["attention"], total=lin + parts["attention"], tokens=T, parts=parts)


def danceopd_step_flops(cfg, dcfg, task, batch):
    """Model FLOPs of one DanceOPD step (distill_onpolicy.distill_loss, on-policy): the student's rollout of
    rollout_steps no-grad forwards on the batch, the teacher's forward on the B K query states (two if CFG-guided),
    and the student's forward + backward on them, counted as 3 forwards (the MFU convention, as for a full
    fine-tune, although LoRA's frozen base needs no weight gradients)."""
    student = forward_flops(cfg, task, 1, lora_rank=dcfg.lora_rank)["total"]
    teacher = forward_flops(cfg, task, 1)["total"] * (1 if dcfg.cfg_alpha == 1.0 else 2)
    queries = batch * dcfg.query_k
    return batch * dcfg.rollout_steps * student + queries * (teacher + 3 * student)


# ----------------------------------------------------------------------------- timing
def measure(fn, warmup, iters, device):
    """Seconds per call of fn() over `iters` timed calls after `warmup` untimed ones, and on CUDA the peak GiB
    allocated meanwhile (weights and optimizer state included)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    t1 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    seconds = (time.perf_counter() - t1) / iters
    return dict(seconds=seconds, warmup_s=t1 - t0, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def peak_gemm(n, device, warmup, iters):
    """FLOP/s of one large square matmul: bf16 on CUDA (what autocast runs the Linear layers in), fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    r = measure(lambda: a @ b, warmup, iters, device)
    return dict(size=n, dtype=str(dtype).removeprefix("torch."), tflops=2 * n ** 3 / r["seconds"] / 1e12)


def one_object(mcfg):
    """1 for a model that reads short captions (train.py --text_len): its scenes have one object; else 0."""
    return int(mcfg.max_text_len < world.MAX_TOKENS)


def compiled(module, how, mode=None):
    """module as the variant `how` runs it, from a clean dynamo cache (each variant compiles on its own, and the
    graphs and weights of the previous one are freed before its peak memory is measured): eager; compiled, the
    whole model (torch.compile, as the scripts do); regional, each block in place (model.compile_blocks)."""
    torch._dynamo.reset()
    gc.collect()
    return torch.compile(module, mode=mode) if how == "compiled" else compile_blocks(module) if how == "regional" \
        else module


def flow_matching_bench(cfg, env, mcfg, how):
    """train.py's step on `task`: forward + loss under ctx, backward, clip, AdamW, EMA. -> measure() dict."""
    tcfg = train.Config(task=cfg.task, batch_size=cfg.batch_size, seed=cfg.seed, text_len=mcfg.max_text_len,
                        n_objects=one_object(mcfg))
    batch, noise = train.get_batch(tcfg, env, 0, mcfg.image_size)
    torch.manual_seed(cfg.seed)
    model = DiT(mcfg).to(env.device)
    ema = DiT(mcfg).to(env.device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(0.9, 0.99), fused=env.device.type == "cuda")
    train_model = compiled(model, how)

    def step():
        with env.ctx:
            loss, _ = train.flow_matching_loss(train_model, batch, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, tcfg.ema)

    return measure(step, cfg.warmup, cfg.iters, env.device)


def danceopd_bench(cfg, env, mcfg, dcfg, how):
    """distill_onpolicy.py's step: distill_loss under ctx (rollout, teacher query, student forward), backward,
    clip, AdamW on the LoRA weights; the teacher is an untrained DiT (speed does not depend on the weights)."""
    batch = opd.get_batch(dcfg, [cfg.task], 0, mcfg.image_size, env.device, mcfg.max_text_len,
                          one_object(mcfg) or None)
    torch.manual_seed(cfg.seed)
    teacher = DiT(mcfg).to(env.device).eval().requires_grad_(False)
    student = opd.make_student(teacher.state_dict(), mcfg, dcfg.lora_rank, dcfg.lora_scale, env.device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=dcfg.lr, fused=env.device.type == "cuda")
    train_student = compiled(student, how)
    fields = {cfg.task: torch.compile(teacher) if how == "compiled" else compile_blocks(teacher) if how == "regional"
              else teacher}                                                 # as distill_onpolicy.train does
    calls = itertools.count()

    def step():
        with env.ctx:
            loss, _ = opd.distill_loss(train_student, fields, batch, dcfg, step_generator(cfg.seed, next(calls)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, dcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measure(step, cfg.warmup, cfg.iters, env.device)


def sampling_bench(cfg, env, mcfg, modes):
    """sample.euler with CFG at each batch size and step count; one row per (mode, batch, steps)."""
    torch.manual_seed(cfg.seed)
    model = DiT(mcfg).to(env.device).eval().requires_grad_(False)
    batches = {n: data.make_batch(cfg.task, n, mcfg.image_size, env.device, seed=cfg.seed, split="test",
                                  n_objects=one_object(mcfg) or None, text_len=mcfg.max_text_len)
               for n in map(int, cfg.sample_batches.split(","))}
    rows = []
    for mode, compile_mode in modes.items():
        for n, b in batches.items():
            inputs, noise = model_inputs(b), torch.randn_like(b.target)
            net = compiled(model, "eager" if mode == "eager" else "compiled", compile_mode)
            with env.ctx:
                warm = measure(lambda: euler(net, noise, inputs, 1, cfg.cfg_scale), cfg.warmup, 1, env.device)
                for steps in map(int, cfg.sample_steps.split(",")):
                    r = measure(lambda: euler(net, noise, inputs, steps, cfg.cfg_scale), 1, cfg.sample_iters,
                                env.device)
                    rows.append(dict(mode=mode, batch=n, steps=steps, ms_per_step=1e3 * r["seconds"] / steps,
                                     ms_total=1e3 * r["seconds"], warmup_s=warm["warmup_s"], peak_gib=r["peak_gib"]))
    return rows


# ----------------------------------------------------------------------------- the run
def main(cfg):
    check_config(cfg)
    env = setup(cfg)
    if env.world > 1:
        raise SystemExit("bench.py runs in one process (no torchrun)")
    for key, value in AUTO[env.device.type].items():
        if getattr(cfg, key) in (0, "", "auto"):
            setattr(cfg, key, value)
    mcfg = preset(cfg.preset, vocab_size=len(world.VOCAB), max_text_len=cfg.text_len or world.MAX_TOKENS,
                  pooled_text=cfg.pooled_text)
    dcfg = opd.resolve(opd.Config(preset=cfg.preset, batch_size=cfg.batch_size, rollout_steps=cfg.rollout_steps,
                                  lora_rank=cfg.lora_rank, seed=cfg.seed, device=env.device.type))
    cuda = env.device.type == "cuda"
    name = torch.cuda.get_device_name(env.device) if cuda else "cpu"
    fwd = forward_flops(mcfg, cfg.task)
    with torch.device("meta"):  # shapes only
        n_params = count_params(DiT(mcfg))
    print(f"bench on {name}, preset {cfg.preset}, task {cfg.task}: {n_params / 1e6:.2f}M params, {fwd['tokens']} "
          f"tokens/sample, forward {fwd['total'] / 1e9:.3f} GFLOP/sample "
          f"(6 N T / exact training FLOPs = {6 * n_params * fwd['tokens'] / (3 * fwd['total']):.2f})")
    gemm = peak_gemm(cfg.gemm_size, env.device, cfg.warmup, cfg.iters)
    print(f"peak GEMM {cfg.gemm_size}^3 {gemm['dtype']}: {gemm['tflops']:.2f} TFLOP/s")

    variants = ["eager"] + (["compiled", "regional"] if env.compile else [])  # regional: model.compile_blocks
    step_flops = dict(flow_matching=3 * forward_flops(mcfg, cfg.task, cfg.batch_size)["total"],
                      danceopd=danceopd_step_flops(mcfg, dcfg, cfg.task, cfg.batch_size))
    results = {}
    for method, bench in (("flow_matching", lambda on: flow_matching_bench(cfg, env, mcfg, on)),
                          ("danceopd", lambda on: danceopd_bench(cfg, env, mcfg, dcfg, on))):
        results[method] = dict(step_gflop=step_flops[method] / 1e9)
        for variant in variants:
            r = bench(variant)
            tflops = step_flops[method] / r["seconds"] / 1e12
            results[method][variant] = dict(images_per_s=cfg.batch_size / r["seconds"], step_ms=1e3 * r["seconds"],
                                            tflops=tflops, mfu=tflops / gemm["tflops"], warmup_s=r["warmup_s"],
                                            peak_gib=r["peak_gib"])
        results[method]["compile_speedup"] = (results[method]["eager"]["step_ms"]
                                              / results[method]["compiled"]["step_ms"] if env.compile else None)
    modes = dict(eager=None, **(dict(compiled="default") if env.compile else {}),
                 **(dict(cudagraphs="reduce-overhead") if env.compile and cuda else {}))
    rows = sampling_bench(cfg, env, mcfg, modes)

    gib = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"\ntraining, batch {cfg.batch_size} ({cfg.task}; DanceOPD: {cfg.rollout_steps}-step rollout, "
          f"LoRA rank {cfg.lora_rank})")
    print(f"{'step':<15}{'variant':<10}{'img/s':>10}{'ms/step':>10}{'TFLOP/s':>10}{'MFU':>8}{'warmup s':>10}"
          f"{'peak GiB':>10}")
    for method in results:
        for variant in variants:
            r = results[method][variant]
            print(f"{method:<15}{variant:<10}{r['images_per_s']:>10.1f}{r['step_ms']:>10.2f}{r['tflops']:>10.3f}"
                  f"{r['mfu']:>8.1%}{r['warmup_s']:>10.1f}{gib(r['peak_gib']):>10}")
        if env.compile:
            print(f"{'':<15}compiled / eager speed: x{results[method]['compile_speedup']:.2f}")
    print(f"\nsampling, Euler with CFG {cfg.cfg_scale} (the batch runs twice: conditional and empty caption)")
    print(f"{'mode':<12}{'batch':>6}{'steps':>6}{'ms/step':>10}{'ms total':>10}{'vs eager':>10}{'peak GiB':>10}")
    eager = {(r["batch"], r["steps"]): r["ms_per_step"] for r in rows if r["mode"] == "eager"}
    for r in rows:
        print(f"{r['mode']:<12}{r['batch']:>6}{r['steps']:>6}{r['ms_per_step']:>10.2f}{r['ms_total']:>10.1f}"
              f"{eager[r['batch'], r['steps']] / r['ms_per_step']:>9.2f}x{gib(r['peak_gib']):>10}")

    out = cfg.out or f"results/speed/bench_{env.device.type}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    report = dict(device=name, torch=torch.__version__, config=dataclasses.asdict(cfg),
                  model=dict(params=n_params, tokens=fwd["tokens"], forward_gflop=fwd["total"] / 1e9,
                             forward_parts_gflop={k: v / 1e9 for k, v in fwd["parts"].items()},
                             six_n_t_over_exact=6 * n_params * fwd["tokens"] / (3 * fwd["total"])),
                  gemm=gemm, train=results, sample=rows)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main(parse_config(Config()))
