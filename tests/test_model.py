"""The DiT (model.py) on the tiny preset: zero init, task layouts, the zero-init condition path, LoRA, overfitting."""
import copy

import pytest
import torch
import torch._dynamo

import data

from model import DiT, LoRALinear, add_lora, compile_blocks, count_params, lora_parameters, merge_lora, preset

B, RES = 2, 32


def inputs(seed=0, n=B, L=48):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(n, 3, RES, RES, generator=g), t=torch.rand(n, generator=g),
                task=torch.randint(0, 6, (n,), generator=g), tokens=torch.randint(0, 256, (n, L), generator=g),
                cond=torch.rand(n, 4, RES, RES, generator=g) * 2 - 1,
                ref=torch.rand(n, 3, RES, RES, generator=g) * 2 - 1)


def perturbed(model, seed=0, std=0.05):
    """A copy with every parameter jittered except cond_embedder: stands in for a trained T2I model."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("cond_embedder"):
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiT(preset("tiny"))


@pytest.mark.parametrize("conv_head", [True, False])
def test_initial_output_is_exactly_zero(conv_head):
    torch.manual_seed(0)
    m = DiT(preset("tiny", conv_head=conv_head))
    a = inputs()
    for kw in (dict(), dict(cond=a["cond"]), dict(ref=a["ref"]), dict(cond=a["cond"], ref=a["ref"])):
        v = m(a["x"], a["t"], a["task"], a["tokens"], **kw)
        assert v.shape == (B, 3, RES, RES) and torch.equal(v, torch.zeros_like(v))


@pytest.mark.parametrize("layout", ["t2i", "local_edit", "global_edit", "inpaint", "outpaint", "customize"])
def test_output_shape_per_task_layout(model, layout):
    m, a = perturbed(model), inputs()
    cond = a["cond"] if layout in ("local_edit", "global_edit", "inpaint", "outpaint") else None
    if layout in ("inpaint", "outpaint"):   # masked image (hole = 0) + binary mask channel, as data.py makes them
        mask = (torch.rand(B, 1, RES, RES) > 0.5).float()
        cond = torch.cat([a["cond"][:, :3] * (1 - mask), mask], 1)
    ref = a["ref"] if layout == "customize" else None
    v = m(a["x"], a["t"], a["task"], a["tokens"], cond=cond, ref=ref)
    assert v.shape == (B, 3, RES, RES) and torch.isfinite(v).all() and v.abs().sum() > 0


def test_ref_tokens_and_text_change_the_output(model):
    m, a = perturbed(model), inputs()
    v = m(a["x"], a["t"], a["task"], a["tokens"])
    assert not torch.allclose(v, m(a["x"], a["t"], a["task"], a["tokens"], ref=a["ref"]))
    assert not torch.allclose(v, m(a["x"], a["t"], a["task"], torch.zeros_like(a["tokens"])))
    assert not torch.allclose(v, m(a["x"], a["t"], (a["task"] + 1) % 6, a["tokens"]))


def test_one_edit_token_reads_local_and_global_edits_with_one_embedding():
    """World option one_edit_token: local and global edits get the same task token, so only the words can tell
    their scope; every other task keeps its own."""
    a = inputs()
    one = perturbed(DiT(preset("tiny", one_edit_token=True)))
    per_task = DiT(preset("tiny"))
    per_task.load_state_dict(one.state_dict())  # the same weights, read with a token per task
    local, glob = (torch.full((B,), data.TASKS.index(k)) for k in ("local_edit", "global_edit"))
    for m, same in ((one, True), (per_task, False)):
        v_local, v_global = (m(a["x"], a["t"], task, a["tokens"], cond=a["cond"]) for task in (local, glob))
        assert torch.equal(v_local, v_global) == same
    t2i = torch.zeros(B, dtype=torch.long)
    assert not torch.equal(one(a["x"], a["t"], t2i, a["tokens"]), one(a["x"], a["t"], local, a["tokens"]))


def test_pooled_text_conditions_adaln_and_the_empty_caption_adds_nothing():
    torch.manual_seed(0)
    m, a = DiT(preset("tiny", pooled_text=True)), inputs()
    v = m(a["x"], a["t"], a["task"], a["tokens"])
    assert torch.equal(v, torch.zeros_like(v))                       # adaLN-Zero still holds
    m = perturbed(m)
    plain = copy.deepcopy(m)
    plain.text_pool = None                                           # the same weights without the pooled path
    empty = torch.zeros_like(a["tokens"])                            # the CFG-dropped caption: all pads
    assert torch.equal(m(a["x"], a["t"], a["task"], empty), plain(a["x"], a["t"], a["task"], empty))
    assert not torch.allclose(m(a["x"], a["t"], a["task"], a["tokens"]), plain(a["x"], a["t"], a["task"], a["tokens"]))


def test_too_long_caption_is_an_error(model):
    a = inputs(L=49)
    with pytest.raises(ValueError, match="at most 48"):
        model(a["x"], a["t"], a["task"], a["tokens"])


def test_a_shorter_text_length_drops_only_pad_columns():
    """A model of 24 caption tokens reads a batch padded to 48 as its first 24 columns; a word past them is an
    error, never silently cut."""
    torch.manual_seed(0)
    m, a = perturbed(DiT(preset("tiny", max_text_len=24, pooled_text=True))), inputs()
    a["tokens"][:, 20:] = 0                                            # captions of 20 words, padded to 48
    v = m(a["x"], a["t"], a["task"], a["tokens"])
    assert torch.equal(v, m(a["x"], a["t"], a["task"], a["tokens"][:, :24]))
    a["tokens"][0, 30] = 5
    with pytest.raises(ValueError, match="caption has 21 tokens, the model takes at most 24"):
        m(a["x"], a["t"], a["task"], a["tokens"])


def test_zero_init_cond_is_a_no_op_but_gets_gradient(model):
    m, a = perturbed(model), inputs()   # a "pretrained" model, fresh cond_embedder, as when fine-tuning an editor
    v_plain = m(a["x"], a["t"], a["task"], a["tokens"])
    v_cond = m(a["x"], a["t"], a["task"], a["tokens"], cond=a["cond"])
    assert v_plain.abs().sum() > 0 and torch.equal(v_plain, v_cond)
    (v_cond - a["x"]).pow(2).mean().backward()
    assert m.cond_embedder.weight.grad.abs().sum() > 0


def test_lora_merge_unmerge_round_trip(model):
    m, a = perturbed(model), inputs()
    ref_out = m(**a)
    add_lora(m, rank=4, scale=2.0, targets=("qkv", "proj", "fc1", "fc2", "adaLN_modulation"))
    n_lora = sum(isinstance(x, LoRALinear) for x in m.modules())
    assert n_lora == 5 * len(m.blocks)
    assert torch.equal(m(**a), ref_out)                   # B = 0: LoRA starts as the identity
    with torch.no_grad():
        for p in lora_parameters(m):
            p.normal_(std=0.1)
    unmerged = m(**a)
    assert not torch.allclose(unmerged, ref_out, atol=1e-4)
    weights = {n: p.clone() for n, p in m.named_parameters() if n.endswith("base.weight")}
    for x in m.modules():
        if isinstance(x, LoRALinear):
            x.merge()
    torch.testing.assert_close(m(**a), unmerged, atol=1e-5, rtol=1e-5)
    for x in m.modules():
        if isinstance(x, LoRALinear):
            x.unmerge()
    for n, p in m.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(m(**a), unmerged, atol=1e-5, rtol=1e-5)
    merged = merge_lora(m)
    assert not any(isinstance(x, LoRALinear) for x in merged.modules())
    plain = DiT(model.config)
    plain.load_state_dict(merged.state_dict())          # back to a standard DiT state dict
    torch.testing.assert_close(plain(**a), unmerged, atol=1e-5, rtol=1e-5)


def test_add_lora_trains_only_lora(model):
    m, a = perturbed(model), inputs()
    add_lora(m, rank=4, scale=1.0)
    lora = {id(p) for p in lora_parameters(m)}
    assert count_params(m, trainable_only=True) == sum(p.numel() for p in lora_parameters(m)) > 0
    base = {n: p.clone() for n, p in m.named_parameters() if id(p) not in lora}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):   # two steps: B is zero at the first, so A only moves from the second on
        opt.zero_grad()
        (m(**a) - a["x"]).pow(2).mean().backward()
        for n, p in m.named_parameters():
            assert (p.grad is not None) == (id(p) in lora), n
        opt.step()
    for n, p in m.named_parameters():
        if id(p) in lora:
            assert not torch.equal(p, torch.zeros_like(p))
        else:
            assert torch.equal(p, base[n]), n
    assert all(not torch.equal(x.lora_B, torch.zeros_like(x.lora_B)) for x in m.modules() if isinstance(x, LoRALinear))


def test_add_lora_keeps_named_modules_trainable(model):
    m = add_lora(copy.deepcopy(model), rank=2, trainable=("ref_embedder",))
    assert m.ref_embedder.weight.requires_grad and not m.x_embedder.weight.requires_grad


def test_regional_compilation_matches_eager_and_does_not_recompile_between_t2i_and_edit():
    """compile_blocks: the compiled blocks give the eager velocity and gradient, and a T2I call (cond None) then
    an edit call (cond given) reuse the blocks' graph: torch._dynamo refuses to recompile here, and does not."""
    torch.manual_seed(0)
    eager = DiT(preset("tiny", vocab_size=40, max_text_len=6))
    net = compile_blocks(copy.deepcopy(eager))
    x, t, tokens = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randint(1, 40, (2, 6))
    task = torch.zeros(2, dtype=torch.long)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for cond in (None, torch.randn(2, 4, 32, 32)):
            got, want = (m(x, t, task, tokens, cond=cond) for m in (net, eager))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            got.square().sum().backward(), want.square().sum().backward()
    g = lambda m: torch.cat([p.grad.flatten() for p in m.blocks.parameters()])
    torch.testing.assert_close(g(net), g(eager), rtol=1e-3, atol=1e-5)
