"""One DiT for every task: text-to-image, editing, inpainting/outpainting and customisation.

A pixel-space Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers")
with adaLN-Zero blocks, run over one joint sequence

    [task token | text tokens | reference-image tokens (customize only) | noisy target tokens]

- The timestep and the task set the adaLN conditioning vector c (DiT section 3.2, adaLN-Zero: every
  residual branch and the final layer start at zero, so the untrained model outputs exactly 0).
- Pixel-aligned conditions (edit source, masked image, mask; 4 channels) are patchified by a second,
  zero-initialised embedding and ADDED to the target tokens: the same as widening the input convolution
  from 3 to 7 channels as InstructPix2Pix does (Brooks et al. 2023, section 3.4). Measured here: 86% edit
  success against 1.6% when the source came in as extra tokens (DESIGN.md, second round).
- What is not pixel-aligned (the customisation reference) enters as clean extra tokens with a learned type
  embedding, as in Diffusion Self-Distillation's two-panel design (Cai et al. 2025).
- Text: learned word embeddings + a small pre-norm transformer trained with the model. Pads are a learned
  token, so no attention mask is ever needed and SDPA can take its flash kernel on CUDA. Option `pooled_text`:
  the mean of the caption's word features also joins c, as SD3 adds a pooled caption (docs/base.md).
- LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3: h = W0 x + B A x)
  as a small wrapper on nn.Linear, used by the method scripts for students and per-task adapters.

The model predicts the velocity v = eps - x0 of x_t = (1 - t) x0 + t eps (t=0 data, t=1 noise; METHODS.md).
No training code lives here. Quick check: python -m pytest -q tests/test_model.py
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from data import TASKS


@dataclass
class DiTConfig:
    image_size: int = 32          # side of the square image in pixels (forward also takes H x W canvases, e.g. the
                                  # two-panel H x 2H of subject pairs: any multiple of patch_size)
    patch_size: int = 4           # side of one patch; image tokens = (image_size / patch_size) ** 2
    in_channels: int = 3          # channels of the noisy target (RGB in [-1, 1])
    cond_channels: int = 4        # pixel-aligned condition: image (3) + mask (1), added to the target tokens
    hidden_size: int = 64         # transformer width D
    depth: int = 2                # number of DiT blocks
    num_heads: int = 2            # attention heads (DiT and text encoder)
    mlp_ratio: float = 4.0        # MLP hidden width = mlp_ratio * D
    vocab_size: int = 256         # word vocabulary incl. <pad> = 0; the caller sets it from world.VOCAB
    max_text_len: int = 48        # caption length in tokens (padded); longer batches lose their pad columns (forward)
    text_depth: int = 1           # pre-norm transformer blocks of the text encoder
    num_tasks: int = 6            # task ids, one per entry of data.TASKS
    conv_head: bool = True        # zero-init residual 3x3 conv stack over the unpatchified output (DESIGN.md, round 3)
    head_channels: int = 8        # extra output channels the final layer hands to the conv head
    qk_norm: bool = True          # RMSNorm on queries and keys per head (stabilises attention logits)
    pooled_text: bool = False     # also add the caption's mean word feature to the adaLN vector c (as SD3 does)
    one_edit_token: bool = False  # local and global edits share one task token: the scope of an edit (keep the
                                  # other pixels, or change them all) is read from the words (docs/danceopd.md)


EDIT_TASK_IDS = (TASKS.index("local_edit"), TASKS.index("global_edit"))  # the ids one_edit_token makes one

PRESETS = {
    "tiny": dict(image_size=32, patch_size=4, hidden_size=64, depth=2, num_heads=2, text_depth=1),    # tests
    "small": dict(image_size=32, patch_size=4, hidden_size=128, depth=4, num_heads=4, text_depth=2),  # CPU demo
    "base": dict(image_size=64, patch_size=4, hidden_size=768, depth=12, num_heads=12, text_depth=4),  # ~DiT-B
}


def preset(name: str, **overrides) -> DiTConfig:
    """The config of a preset with any field overridden, e.g. preset("small", vocab_size=len(VOCAB))."""
    return DiTConfig(**{**PRESETS[name], **overrides})


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def patchify(x, p):
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)


def unpatchify(x, p, h):
    return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=p, p2=p)


def sincos_pos_embed_2d(dim, grid, width=None):
    """Fixed 2D sine-cosine position embedding (as in DiT/MAE): half the channels per axis. -> (grid*width, dim)
    for a grid x width patch canvas (width = grid: square). A wider canvas keeps the square's columns on its left."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(width or grid, dtype=torch.float64),
                            indexing="ij")
    out = [torch.cat([(pos.flatten()[:, None] * omega).sin(), (pos.flatten()[:, None] * omega).cos()], 1)
           for pos in (ys, xs)]
    return torch.cat(out, 1).float()


class TimestepEmbedder(nn.Module):
    """Embeds t in [0, 1] as sinusoidal frequencies of 1000 t followed by a 2-layer MLP (DiT)."""

    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]                               # (B, F/2)
        return self.mlp(torch.cat([args.cos(), args.sin()], -1))                     # (B, D)


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection, optional QK RMSNorm, F.scaled_dot_product_attention."""

    def __init__(self, dim, num_heads, qk_norm):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (s h d) -> s b h n d", s=3, h=self.num_heads)  # each (B, H, T, d)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)               # (B, H, T, d)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))                             # (B, T, D)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU, as in DiT."""

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TextBlock(nn.Module):
    """Plain pre-norm transformer block of the text encoder (no conditioning, no mask)."""

    def __init__(self, dim, num_heads, mlp_ratio, qk_norm):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Word embedding + learned positions + `text_depth` pre-norm blocks, projected to the DiT width.

    Pads (id 0) are ordinary learned tokens: the empty caption of classifier-free guidance is all pads."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.word_embedder = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_text_len, cfg.hidden_size))
        self.blocks = nn.ModuleList([TextBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm)
                                     for _ in range(cfg.text_depth)])
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, tokens):
        x = self.word_embedder(tokens) + self.pos_embed[:, :tokens.shape[1]]      # (B, L, D)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))                                             # (B, L, D)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero: shift, scale and gate of both branches regressed from c, once per sample."""

    def __init__(self, dim, num_heads, mlp_ratio, qk_norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)                    # each (B, 1, D)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + Linear from each target token to its patch of output channels (zero-init)."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)           # each (B, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))              # (B, N, p*p*C)


class ConvHead(nn.Module):
    """Residual 3x3 conv stack over [unpatchified output | x_t]: lets edges cross patch borders.

    A 4x4 patch renders its pixels from one token, so small shapes came out as round blobs with patch
    artefacts (DESIGN.md, rounds 1-3); a few pixel-space convolutions see neighbouring patches."""

    def __init__(self, in_channels, out_channels, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, x):  # channels_last: mkldnn's fast layout (fwd + bwd 47 -> 30 ms at batch 64 on 2 CPU cores)
        return self.net(x.contiguous(memory_format=torch.channels_last))


class DiT(nn.Module):
    """The joint-sequence DiT: forward(x_t, t, task, tokens, cond, ref) -> velocity v = eps - x0."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        assert cfg.image_size % p == 0 and D % cfg.num_heads == 0 and D % 4 == 0
        self.grid = cfg.image_size // p
        self.out_channels = cfg.in_channels + (cfg.head_channels if cfg.conv_head else 0)
        self.x_embedder = nn.Linear(p * p * cfg.in_channels, D)
        self.cond_embedder = nn.Linear(p * p * cfg.cond_channels, D)   # zero-init: widening x_embedder's input
        self.ref_embedder = nn.Linear(p * p * cfg.in_channels, D)
        self.ref_type = nn.Parameter(torch.zeros(1, 1, D))            # marks reference tokens apart from targets
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, self.grid)[None], persistent=False)
        self._pos = {}                                                # other canvases' embeddings (pos_embed_for)
        self.t_embedder = TimestepEmbedder(D)
        self.task_embedder = nn.Embedding(cfg.num_tasks, D)
        self.text_encoder = TextEncoder(cfg)
        self.text_pool = nn.Linear(D, D) if cfg.pooled_text else None
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, p, self.out_channels)
        self.conv_head = ConvHead(self.out_channels + cfg.in_channels, cfg.in_channels) if cfg.conv_head else None
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        for w in (self.task_embedder.weight, self.text_encoder.word_embedder.weight, self.text_encoder.pos_embed,
                  self.ref_type, self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight):
            nn.init.normal_(w, std=0.02)
        # Zero-init: the pixel-aligned condition starts as a no-op (InstructPix2Pix), every residual branch and the
        # output start at zero (adaLN-Zero), and the conv head starts as an exact identity on the velocity.
        zero = [self.cond_embedder, self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        zero += [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [self.conv_head.net[-1]] if self.conv_head is not None else []
        for module in zero:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def trim(self, tokens):
        """tokens padded longer than this model's captions (world.MAX_TOKENS) cut to its length: pads, never words."""
        L = self.config.max_text_len
        if tokens.shape[1] > L:
            if tokens[:, L:].any():
                raise ValueError(f"caption has {int((tokens != 0).sum(1).max())} tokens, the model takes at most {L}")
            tokens = tokens[:, :L]
        return tokens

    def pos_embed_for(self, rows, cols):
        """(1, rows * cols, D) position embedding of a rows x cols patch canvas: the buffer for the square image."""
        if rows == cols == self.grid:
            return self.pos_embed
        key = (rows, cols, self.pos_embed.device, self.pos_embed.dtype)  # made once per shape, not once per call
        if key not in self._pos:
            self._pos[key] = sincos_pos_embed_2d(self.config.hidden_size, rows, cols)[None].to(self.pos_embed)
        return self._pos[key]

    def encode_text(self, tokens):
        """The caption's features (B, L, D): they depend on neither x nor t, so a sampler computes them once per
        prompt and passes them back as forward(..., text=)."""
        return self.text_encoder(self.trim(tokens))

    def forward(self, x, t, task, tokens, cond=None, ref=None, text=None):
        """x (B, 3, H, W) noisy target x_t in [-1, 1] space; t (B,) in [0, 1], 1 = noise; task (B,) long;
        tokens (B, L) long, pads = 0; cond (B, 4, H, W) pixel-aligned [image | mask] or None;
        ref (B, 3, H, W) reference image or None; text (B, L, D) encode_text(tokens), or None to compute it.
        Returns v (B, 3, H, W)."""
        p = self.config.patch_size
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        tokens = self.trim(tokens)
        pos = self.pos_embed_for(x.shape[-2] // p, x.shape[-1] // p)               # (1, N, D)
        h = self.x_embedder(patchify(x, p)) + pos                                  # (B, N, D)
        if cond is not None:
            h = h + self.cond_embedder(patchify(cond, p))                          # (B, N, D)
        if self.config.one_edit_token:                                             # global edit -> edit token
            task = torch.where(task == EDIT_TASK_IDS[1], EDIT_TASK_IDS[0], task)
        task_emb = self.task_embedder(task)                                        # (B, D)
        text = self.text_encoder(tokens) if text is None else text                 # (B, L, D)
        seq = [task_emb[:, None], text]
        if ref is not None:
            ref_pos = self.pos_embed_for(ref.shape[-2] // p, ref.shape[-1] // p)
            seq.append(self.ref_embedder(patchify(ref, p)) + ref_pos + self.ref_type)  # (B, N_ref, D)
        seq.append(h)
        h = torch.cat(seq, dim=1)                                                  # (B, T, D)
        c = self.t_embedder(t) + task_emb                                          # (B, D)
        if self.text_pool is not None:  # mean over the caption's words; the empty caption adds nothing
            words = (tokens != 0)[..., None].to(text.dtype)                        # (B, L, 1)
            c = c + self.text_pool((text * words).sum(1) / words.sum(1).clamp(min=1)) * words.amax(1)
        for block in self.blocks:
            h = block(h, c)                                                        # (B, T, D)
        out = self.final_layer(h[:, -pos.shape[1]:], c)                            # (B, N, p*p*C)
        out = unpatchify(out, p, x.shape[-2] // p)                                 # (B, C, H, W)
        v = out[:, :self.config.in_channels]                                       # (B, 3, H, W)
        if self.conv_head is not None:
            v = v + self.conv_head(torch.cat([out, x.to(out.dtype)], dim=1))       # (B, 3, H, W)
        return v


def compile_blocks(model: DiT) -> DiT:
    """Regional compilation: torch.compile each transformer block in place (text blocks included) and leave the
    embedders and the head eager. The repeated blocks share one graph, so compiling takes seconds, not a minute, and
    T2I and edit inputs (cond None or not) reach the blocks with the same shapes: no recompile between them, where
    compiling the whole model recompiles on `cond is None` (TORCH_LOGS=recompiles). Returns the model."""
    for block in list(model.blocks) + list(model.text_encoder.blocks):
        block.compile()
    return model


# ------------------------------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank update: y = W x + b + scale * B A x (Hu et al. 2021, eq. 3).

    `scale` multiplies B A directly (the paper's alpha / r). A starts random (kaiming, as in the official code
    and peft) and B at zero, so the wrapped layer is initially the base layer exactly."""

    def __init__(self, base: nn.Linear, rank: int, scale: float = 1.0):
        super().__init__()
        self.base, self.rank, self.scale, self.merged = base, rank, scale, False
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self):
        return self.scale * self.lora_B @ self.lora_A                              # (out, in)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self):
        """Fold B A into the base weight (one matmul per call at inference). Exact up to float rounding."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")   # add "adaLN_modulation" to adapt the modulation too


def add_lora(model: DiT, rank: int, scale: float = 1.0, targets=LORA_TARGETS, trainable=(), parts=("blocks",)):
    """Wrap the Linear layers named in `targets` inside the submodules `parts` with LoRA and freeze everything else.

    parts: ("blocks",), the DiT blocks, by default; ("text_encoder",) adapts only how captions are read.
    `trainable`: names of submodules kept fully trainable, e.g. ("ref_embedder",) for Self-Distillation's
    new condition projection. Returns the model (changed in place)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers")
    model.requires_grad_(False)
    for block in (b for part in parts for b in model.get_submodule(part).children()):
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear) and set(name.split(".")) & set(targets):
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, LoRALinear(module, rank, scale))
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)
    return model


def lora_parameters(model: nn.Module):
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def merge_lora(model: nn.Module):
    """Fold every LoRA into its base weight and put the plain nn.Linear back: a standard DiT state dict again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base)
    return model


def frozen(module: nn.Module):
    """A network that is only read (teacher, judge, reward): eval mode, and no parameter takes a gradient."""
    return module.eval().requires_grad_(False)


def merged_copy(model: nn.Module):
    """A plain DiT equal to `model` with every LoRA folded in (the model itself is left as it is), in eval mode: a
    standard state dict, for checkpoints that any script can load, and one matmul per layer at inference."""
    return merge_lora(copy.deepcopy(model)).eval()


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
