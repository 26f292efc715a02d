"""bench.py: the exact FLOP count equals what torch's FlopCounterMode counts, layer for layer, for every sequence
layout and for the LoRA student and DanceOPD step; and the benchmark runs end to end and writes its JSON."""
import contextlib
import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import common
import bench
import data
import world
import distill_onpolicy as opd
import train
from model import DiT, add_lora, preset

MCFG = preset("tiny", vocab_size=len(world.VOCAB), max_text_len=world.MAX_TOKENS)


def counted(fn, math_attention=False):
    """{op name: FLOPs} that FlopCounterMode records for fn(). On the CPU, SDPA's fused kernel is not counted
    (no formula for it); the MATH backend decomposes it into two bmm, which are."""
    backend = sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, backend:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("task,lora_rank,pooled", [("t2i", 0, False), ("local_edit", 0, False), ("customize", 0, False),
                                                ("t2i", 4, False), ("t2i", 0, True)])
def test_forward_flops_equal_flop_counter(task, lora_rank, pooled):
    torch.manual_seed(0)
    mcfg = dataclasses.replace(MCFG, pooled_text=pooled)  # the pooled caption adds one Linear per image
    model = DiT(mcfg)
    if lora_rank:
        add_lora(model, lora_rank)
    b = data.make_batch(task, 3, MCFG.image_size)
    inputs = common.model_inputs(b)
    assert (inputs["cond"] is not None) == (task in bench.COND_TASKS)
    assert (inputs["ref"] is not None) == (task in bench.REF_TASKS)
    want = bench.forward_flops(mcfg, task, batch=3, lora_rank=lora_rank)
    forward = lambda: model(b.target, torch.rand(3), **inputs)

    got = counted(forward)
    sdpa = sum(n for op, n in got.items() if "attention" in op)   # counted on CUDA, not by the CPU kernel
    assert sum(got.values()) - sdpa == want["linear"]             # every Linear, LoRA matmul and conv, exactly
    assert sdpa in (0, want["attention"])
    got = counted(forward, math_attention=True)
    assert got["aten.bmm"] == want["attention"]                   # QK^T and AV: 4 T^2 D per layer, text included
    assert sum(got.values()) == want["total"]
    # the count follows the layout: a reference image adds N tokens to every DiT block and attention
    if task == "customize":
        assert want["tokens"] == bench.forward_flops(MCFG, "t2i")["tokens"] + (MCFG.image_size // MCFG.patch_size) ** 2


def test_danceopd_step_flops_equal_flop_counter():
    """The forward half of a real distill_loss (rollout + teacher query + student forward) is counted exactly;
    the step's count adds 2 forwards of the student for the backward."""
    dcfg = opd.resolve(opd.Config(preset="tiny", batch_size=2, rollout_steps=3, lora_rank=4))
    torch.manual_seed(0)
    teacher = DiT(MCFG).eval().requires_grad_(False)
    student = opd.make_student(teacher.state_dict(), MCFG, dcfg.lora_rank, 1.0, "cpu")
    batch = opd.get_batch(dcfg, ["local_edit"], 0, MCFG.image_size, "cpu")
    got = counted(lambda: opd.distill_loss(student, {"local_edit": teacher}, batch, dcfg, common.step_generator(0, 0)),
                  math_attention=True)
    student_fwd = bench.forward_flops(MCFG, "local_edit", 1, lora_rank=4)["total"]
    step = bench.danceopd_step_flops(MCFG, dcfg, "local_edit", 2)
    assert sum(got.values()) == step - 2 * 2 * student_fwd
    assert step == 2 * ((3 + 3) * student_fwd + bench.forward_flops(MCFG, "local_edit")["total"])


def test_bench_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--device=cpu", "--preset=tiny", "--batch_size=2", "--rollout_steps=2", "--sample_batches=1,2",
            "--sample_steps=1,2", "--gemm_size=64", "--warmup=1", "--iters=1", "--sample_iters=1", "--compile=off",
            f"--out={out}"]
    report = bench.main(common.parse_config(bench.Config(), args))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert {"device", "config", "model", "gemm", "train", "sample"} <= set(report)
    assert report["gemm"]["tflops"] > 0
    for method in ("flow_matching", "danceopd"):
        r = report["train"][method]
        assert {"images_per_s", "step_ms", "tflops", "mfu", "peak_gib"} <= set(r["eager"])
        assert r["eager"]["images_per_s"] > 0 and r["compile_speedup"] is None and "compiled" not in r
    assert report["train"]["flow_matching"]["step_gflop"] * 1e9 == pytest.approx(
        3 * bench.forward_flops(MCFG, "t2i", 2)["total"])
    assert [(r["mode"], r["batch"], r["steps"]) for r in report["sample"]] == \
        [("eager", b, s) for b in (1, 2) for s in (1, 2)]
    assert all(r["ms_per_step"] > 0 and r["peak_gib"] is None for r in report["sample"])


def test_bench_times_the_short_caption_model_of_the_cpu_recipe(tmp_path):
    """--text_len=24 --pooled_text=true times the model the CPU recipe builds: 24 caption tokens per sequence,
    and batches tokenized to that width (a 48-wide batch would fail nothing but time pads the model drops)."""
    args = ["--device=cpu", "--preset=tiny", "--batch_size=2", "--rollout_steps=2", "--sample_batches=1",
            "--sample_steps=1", "--gemm_size=64", "--warmup=1", "--iters=1", "--sample_iters=1", "--compile=off",
            "--text_len=24", "--pooled_text=true", f"--out={tmp_path / 'bench.json'}"]
    report = bench.main(common.parse_config(bench.Config(), args))
    short = preset("tiny", vocab_size=len(world.VOCAB), max_text_len=24, pooled_text=True)
    assert report["model"]["tokens"] == 1 + 24 + (short.image_size // short.patch_size) ** 2
    assert report["train"]["flow_matching"]["step_gflop"] * 1e9 == pytest.approx(
        3 * bench.forward_flops(short, "t2i", 2)["total"])
