"""The CUDA path (bf16 autocast + torch.compile + flash attention) computes what the fp32 path computes.

Skipped without a GPU (CI has none); run on one with: python -m pytest -q tests/test_cuda.py
The models are jittered away from their zero init, since an untrained adaLN-Zero DiT outputs exactly 0 in any
precision and would make every comparison pass.
"""
import copy
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
import train
import world
from model import DiT, preset
from sample import euler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def jittered_model(name="small", std=0.02):
    torch.manual_seed(0)
    model = DiT(preset(name, vocab_size=len(world.VOCAB), max_text_len=world.MAX_TOKENS)).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def env(fast):
    """The default CUDA path (bf16 autocast + TF32 + compile) or strict fp32 eager. setup() sets TF32 for the
    whole process, so call this right before computing with it."""
    env = common.setup(train.Config(device="cuda") if fast else
                      train.Config(device="cuda", precision="fp32", compile="off"))
    assert isinstance(env.ctx, torch.autocast) == fast == env.compile == torch.backends.cuda.matmul.allow_tf32
    return env


def loss_and_grad(model, env, batch, noise):
    model.zero_grad(set_to_none=True)
    net = torch.compile(model) if env.compile else model
    with env.ctx:
        loss, _ = train.flow_matching_loss(net, batch, noise)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("task", ["t2i", "local_edit", "customize"])
def test_bf16_compiled_loss_and_grad_match_fp32(task):
    torch._dynamo.reset()
    model = jittered_model()
    batch, noise = train.get_batch(train.Config(task=task, batch_size=16), env(False), 0, model.config.image_size)
    ref_loss, ref_grad = loss_and_grad(model, env(False), batch, noise)
    loss, grad = loss_and_grad(copy.deepcopy(model), env(True), batch, noise)
    assert abs(loss - ref_loss) / ref_loss < 1e-2, (loss, ref_loss)
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99
    assert (grad.norm() / ref_grad.norm() - 1).abs() < 0.05


def test_flash_attention_serves_the_model_under_bf16():
    model = jittered_model().eval()
    batch, _ = train.get_batch(train.Config(batch_size=4), env(True), 0, model.config.image_size)
    x, t = torch.randn_like(batch.target), torch.rand(4, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        default = model(x, t, **common.model_inputs(batch))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if the flash kernel cannot take these inputs
            flash = model(x, t, **common.model_inputs(batch))
    assert ((flash - default).float().norm() / default.float().norm()).item() < 1e-2


def test_compiled_bf16_sampler_matches_fp32():
    torch._dynamo.reset()
    model = jittered_model().eval()
    batch, _ = train.get_batch(train.Config(batch_size=8), env(False), 0, model.config.image_size)
    noise = torch.randn_like(batch.target)
    ref = euler(model, noise, common.model_inputs(batch), 8, 3.0)
    with env(True).ctx:
        out = euler(torch.compile(model), noise, common.model_inputs(batch), 8, 3.0).float()
    assert (ref - noise).abs().mean() > 0.1  # a field that moves the sample
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


def test_train_py_default_cuda_run_follows_the_fp32_run(tmp_path):
    def run(out, *args):
        train.train(common.parse_config(train.Config(), ["--preset=tiny", "--batch_size=32", "--steps=30",
                                                        "--warmup=5", "--eval_n=0", "--quiet", "--log_every=1",
                                                        "--device=cuda", f"--out={out}", *args]))
        return [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]

    torch._dynamo.reset()
    fast = run(tmp_path / "fast")
    fp32 = run(tmp_path / "fp32", "--precision=fp32", "--compile=off")
    assert len(fast) == len(fp32) == 30
    assert fast[-1] < 0.9 * fast[0]  # it trains
    assert all(abs(a - b) / b < 0.05 for a, b in zip(fast, fp32)), list(zip(fast, fp32))


def test_dual_process_bf16_compiled_step_matches_fp32():
    """dual_process.control_loss (no-grad prefix, one grad call, the judge's -log p(Yes) through the pixels, the
    keep questions; the LoRA where the script puts it) under bf16 autocast + torch.compile gives the fp32 loss and
    LoRA gradient."""
    import dual_process as dp
    import vlm
    from model import add_lora, lora_parameters
    torch.manual_seed(0)
    vlm_model, processor = vlm.build_vlm("tiny")
    judge = vlm.Judge(vlm_model.cuda(), processor)
    control = dp.CONTROLS["night"]
    specs, _, tokens = dp.control_prompts(control, 8, "train", 0)
    inputs = dict(task=torch.zeros(8, dtype=torch.long, device="cuda"), tokens=tokens.cuda(), cond=None, ref=None)
    noise = torch.randn(8, 3, 32, 32, device="cuda")
    out = {}
    for fast in (False, True):
        torch._dynamo.reset()
        model = add_lora(jittered_model("tiny"), 8, parts=tuple(dp.Config.lora_parts.split(",")))  # the default
        e = env(fast)
        net = torch.compile(model) if e.compile else model
        with e.ctx:                                                     # with the default keep questions
            loss, _ = dp.control_loss(net, judge, control, inputs, dp.questions_for(control, specs), noise, 5, 16,
                                      kept=dp.keep_questions(control, specs), keep=dp.Config.keep)
        loss.backward()
        out[fast] = loss.item(), torch.cat([p.grad.flatten() for p in lora_parameters(model) if p.grad is not None])
    (ref_loss, ref_grad), (loss, grad) = out[False], out[True]
    assert abs(loss - ref_loss) / abs(ref_loss) < 2e-2, (loss, ref_loss)
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.98


def test_self_distill_bf16_compiled_fine_tune_matches_fp32():
    """self_distill.dsd_loss on the two-panel canvas (the reference through the projection on the left panel, the
    LoRA and the projection trainable, as finetune sets them) under bf16 autocast + torch.compile gives the fp32 loss
    and gradient."""
    import data
    import self_distill as sd
    mcfg = preset("small", vocab_size=len(world.VOCAB), max_text_len=world.MAX_TOKENS)
    b = data.make_batch("customize", 8, 32, seed=0)
    ref, target, tokens = b.ref.cuda(), b.target.cuda(), b.tokens.cuda()
    noise = sd.step_noise(sd.Config(ref_drop=0.25), 0, (8, 3, 32, 64), "cuda")
    out = {}
    for fast in (False, True):
        torch._dynamo.reset()
        model = sd.adapted(mcfg, jittered_model("small").state_dict(), "parallel", 8).cuda()
        with torch.no_grad():
            model.cond_embedder.weight.normal_(std=0.02)                   # away from its zero init
        e = env(fast)
        net = torch.compile(model) if e.compile else model
        with e.ctx:
            loss = sd.dsd_loss(net, "parallel", ref, target, tokens, noise)
        loss.backward()
        out[fast] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    (ref_loss, ref_grad), (loss, grad) = out[False], out[True]
    assert abs(loss - ref_loss) / abs(ref_loss) < 2e-2, (loss, ref_loss)
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.98


def test_feedback_bf16_compiled_step_matches_fp32():
    """feedback.feedback_loss (flow matching; the no-grad PeFL prefix from the noised masked input and one call with
    gradient; the rewards, L1 and the perceptual distance; the coherence term) under bf16 autocast + torch.compile
    gives the fp32 loss and gradient."""
    import data
    import feedback as fb
    from model import frozen
    from rewards import Aesthetic, Alignment, Discriminator
    torch.manual_seed(0)
    rewards = frozen(Aesthetic("tiny").cuda()), frozen(Alignment("tiny").cuda())
    disc = Discriminator(3).cuda()
    b = data.make_batch("inpaint", 8, 32, "cuda", seed=0)
    noise = dict(t=torch.rand(8, device="cuda"), eps=torch.randn(8, 3, 32, 32, device="cuda"),
                 drop=torch.zeros(8, dtype=torch.bool, device="cuda"))
    out = {}
    for fast in (False, True):
        torch._dynamo.reset()
        model = jittered_model("small")
        e = env(fast)
        net = torch.compile(model) if e.compile else model
        with e.ctx:
            loss, _ = fb.feedback_loss(net, b, noise, rewards, disc, fb.Config(), "pefl+adv", 8,
                                       torch.Generator().manual_seed(1))
        loss.backward()
        out[fast] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    (ref_loss, ref_grad), (loss, grad) = out[False], out[True]
    assert abs(loss - ref_loss) / abs(ref_loss) < 2e-2, (loss, ref_loss)
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.98
