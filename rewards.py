"""ByteEdit's reward models (Su et al. 2024, section 3.2), trained on the world, frozen when used.

Each returns a scalar R per image, used as the loss -log sigmoid(R). Trained by Bradley-Terry,
p(a preferred over b) = sigmoid(R_a - R_b), then offset so that R = 0 lies halfway between preferred and rejected:
- `Alignment` R_b(image, caption): a tiny CLIPModel (Radford et al. 2021) from a config, built offline; the
  matching caption against captions one attribute away (`one_change`) and the batch's other captions;
- `Aesthetic` R_a(image): a small CNN, on pairs ranked by the world's hidden `quality` (blur, noise, blocky tiles);
- `Discriminator`: the per-pixel real/fake net of the pixel-coherence reward R_g, trained online by feedback.py;
- `perceptual`: an LPIPS-like distance from the frozen aesthetic CNN's features (feedback.py's perceptual loss).
Training and caching live in judges.py (`python judges.py --what=alignment|aesthetic`); images are (B, 3, H, W) in
[-1, 1] and every reward is differentiable in the pixels.
"""
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

import data
import world
from model import frozen


REWARD_PRESETS = {"tiny": dict(hidden=32, layers=1, heads=2), "small": dict(hidden=64, layers=2, heads=4)}
EOS = len(world.VOCAB)  # appended after the words of a caption; the alignment text encoder with pool="token" embeds it


def bt_loss(r_better, r_worse):
    """Bradley-Terry: -log p(better preferred) = -log sigmoid(R(better) - R(worse))."""
    return -F.logsigmoid(r_better - r_worse).mean()


class Alignment(nn.Module):
    """R_b(image, caption) = scale * cos(image embedding, caption embedding) + offset, from a tiny CLIPModel.

    pool="mean" embeds the mean of each tower's token features (the caption's words and EOS; the image's patches),
    "token" the CLIP way: the EOS token's features and the class token's. One token must gather a whole scene
    through a few attention heads; a mean keeps every token's features, each bound to its neighbours and position.
    With "mean", the recipe reaches 0.975-0.990 retrieval among 8 one-attribute-apart captions (docs/judges.md)."""

    def __init__(self, preset="small", res=32, pool="mean"):
        super().__init__()
        if pool not in ("mean", "token"):
            raise ValueError(f"unknown pooling {pool!r} (mean, token)")
        p, self.res, self.pool = REWARD_PRESETS[preset], res, pool
        sizes = dict(hidden_size=p["hidden"], intermediate_size=4 * p["hidden"], num_hidden_layers=p["layers"],
                     num_attention_heads=p["heads"])
        self.clip = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=EOS + 1, max_position_embeddings=world.MAX_TOKENS + 1, pad_token_id=0,
                             bos_token_id=None, eos_token_id=EOS, **sizes),
            vision_config=dict(image_size=res, patch_size=4, **sizes), projection_dim=p["hidden"]))
        self.register_buffer("offset", torch.zeros(()))

    def embed_text(self, captions, unit=True, groups=4):
        """(N, P) caption embeddings (unit: normalised). The captions run in `groups` batches of similar length,
        each cut to its longest caption: pads are masked out, so this changes nothing but the time."""
        tokens = F.pad(world.tokenize(captions), (0, 1))  # (N, 49) word ids; unknown words are a clear error
        n = (tokens != 0).sum(1)
        tokens[torch.arange(len(n)), n] = EOS
        order = n.argsort()
        h = torch.cat([self.text_features(tokens[i], n[i]) for i in order.tensor_split(groups) if len(i)])
        e = self.clip.text_projection(h[order.argsort()])
        return F.normalize(e, dim=-1) if unit else e

    def text_features(self, tokens, n):
        """The pooled text-tower features of (N, L) tokens, n words each before the EOS."""
        tokens, dev = tokens[:, :int(n.max()) + 1], self.offset.device
        mask = (torch.arange(tokens.shape[1]) <= n[:, None]).to(dev)
        out = self.clip.text_model(input_ids=tokens.to(dev), attention_mask=mask.long())
        return out.pooler_output if self.pool == "token" else \
            (out.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # after the final LayerNorm

    def pixels(self, images):
        """(B, 3, H, W) in [-1, 1] -> the vision tower's input, resized differentiably when H != res."""
        world.check_images(images)
        return images.float() if images.shape[-1] == self.res else \
            F.interpolate(images.float(), size=(self.res, self.res), mode="bilinear", antialias=True)

    def embed_images(self, images, unit=True):
        return self.project_image(self.clip.vision_model(pixel_values=self.pixels(images)).last_hidden_state, unit)

    def project_image(self, hidden, unit=True):
        """The image embedding from the vision tower's last hidden states (B, 1 + patches, h): the class token's
        or the patches' mean, then the final LayerNorm and the projection (unit: normalised)."""
        h = hidden[:, 0] if self.pool == "token" else hidden[:, 1:].mean(1)
        e = self.clip.visual_projection(self.clip.vision_model.post_layernorm(h))
        return F.normalize(e, dim=-1) if unit else e

    def scores(self, images, captions):
        """R of every (image, caption) pair: (B, N)."""
        return self.clip.logit_scale.exp() * self.embed_images(images) @ self.embed_text(captions).T + self.offset

    def forward(self, images, captions):
        """R_b of each image with its own caption: (B,)."""
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        return self.scores(images, captions).diagonal()


CHANGES = ("shape", "color", "size", "line", "cell", "background")


def one_change(scene, rng, what=None):
    """The scene with one captioned attribute changed: a shape, colour, size, outline or cell, or the background
    (`what`, one of CHANGES; None = at random). A cell change with no free cell changes the background."""
    pick = lambda options: options[rng.integers(len(options))]
    i, what = int(rng.integers(len(scene.objects))), what or pick(CHANGES)
    o, objs = scene.objects[i], list(scene.objects)
    cells = [c for c in world.free_cells(objs, exclude=o) if c != o.cell]
    if what in ("shape", "color", "size", "line"):
        options = {"shape": world.SHAPES, "color": list(world.COLORS), "size": list(world.SIZES),
                   "line": world.LINES}[what]
        objs[i] = replace(o, **{what: pick([v for v in options if v != getattr(o, what)])})
    elif what == "cell" and cells:
        objs[i] = replace(o, cell=pick(cells))
    else:
        klass = world.LIGHT if scene.sky in world.LIGHT else tuple(b for b in world.BACKGROUNDS if b not in world.LIGHT)
        if scene.horizon == "none":
            new = pick([b for b in klass if b != scene.sky])
            return replace(scene, sky=new, ground=new)
        part = pick(("sky", "ground", "horizon"))
        if part == "horizon":
            return replace(scene, horizon=pick([h for h in ("high", "middle", "low") if h != scene.horizon]))
        return replace(scene, **{part: pick([b for b in klass if b not in (scene.sky, scene.ground)])})
    return replace(scene, objects=objs)


def alignment_batch(n, k, res, seed, split="train", device="cpu"):
    """n t2i images, each with k captions: the matching one first, then k - 1 distinct one-attribute mismatches,
    phrased alike (the same caption rng), so that only the attribute differs."""
    b, rng = data.make_batch("t2i", n, res, device, seed=seed, split=split), np.random.default_rng(seed)
    captions = []
    for spec in b.specs:
        phrasing = int(rng.integers(2**31))
        texts = [world.caption(spec, np.random.default_rng(phrasing))]
        while len(texts) < k:
            t = world.caption(one_change(spec, rng), np.random.default_rng(phrasing))
            texts += [t] if t not in texts else []
        captions += texts
    return b.target, captions


def alignment_loss(reward, images, captions, k):
    """Bradley-Terry among many (Luce's choice axiom): each image picks its caption out of its k - 1 mismatches and
    all other images' captions, p = exp R+ / sum exp R; with one rival this is exactly sigmoid(R+ - R-)."""
    R = reward.scores(images, captions)  # (B, B k)
    return F.cross_entropy(R, torch.arange(len(images), device=R.device) * k)


DEGRADE = dict(blur=1.5, noise=0.15, blocks=0.5)  # worst level of each: blur sigma (px at 32), noise std, tile share


def quality(d):
    """The world's hidden quality function of degradation levels d (N, 3): 0 = clean, -1 = all three at worst."""
    return -(d / torch.tensor(list(DEGRADE.values()))).mean(1)


def degrade(images, d, gen):
    """Blur (Gaussian, per-image sigma), blocky patches (a share of the 8x8 tiles replaced by their mean, as
    over-compressed images look) and Gaussian noise, in that order. images (B, 3, H, W); d (B, 3) on the CPU."""
    B, _, H, W = images.shape
    r, sigma = int(3 * DEGRADE["blur"] * H / 32) + 1, (d[:, 0] * H / 32).clamp(min=1e-3)[:, None]
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0).to(images.device)  # (3B, 2r + 1)
    x = F.pad(images.reshape(1, 3 * B, H, W), (r, r, r, r), mode="replicate")
    x = F.conv2d(F.conv2d(x, k[:, None, None, :], groups=3 * B), k[:, None, :, None], groups=3 * B).view(B, 3, H, W)
    tiles = (torch.rand(B, 1, 8, 8, generator=gen) < d[:, 2, None, None, None]).float().to(images.device)
    blocks = F.interpolate(F.adaptive_avg_pool2d(x, 8), size=(H, W), mode="nearest")
    x = torch.lerp(x, blocks, F.interpolate(tiles, size=(H, W), mode="nearest"))
    noise = torch.randn(x.shape, generator=gen).to(images.device) * 2 * d[:, 1, None, None, None].to(images.device)
    return (x + noise).clamp(-1, 1)


def aesthetic_batch(n, res, seed, split="train", device="cpu", margin=0.1):
    """(better, worse) pairs ranked by `quality`, at least `margin` apart; each degradation is absent half the time,
    else uniform up to its worst. Half the pairs degrade one render twice, half two renders (content cannot decide)."""
    gen, worst = torch.Generator().manual_seed(seed), torch.tensor(list(DEGRADE.values()))
    levels = lambda: torch.where(torch.rand(n, 3, generator=gen) < 0.5, 0., torch.rand(n, 3, generator=gen) * worst)
    b = data.make_batch("t2i", 2 * n, res, device, seed=seed, split=split)
    same = (torch.rand(n, generator=gen) < 0.5).to(device)[:, None, None, None]
    da, dc = levels(), levels()
    keep = (quality(da) - quality(dc)).abs() >= margin
    a, c = degrade(b.target[:n], da, gen)[keep], degrade(torch.where(same, b.target[:n], b.target[n:]), dc, gen)[keep]
    first = (quality(da) > quality(dc))[keep].to(device)[:, None, None, None]
    return torch.where(first, a, c), torch.where(first, c, a)


class Aesthetic(nn.Module):
    """R_a(image): a small CNN, any resolution, mean- and std-pooled (blur and noise are texture statistics)."""

    def __init__(self, preset="small", res=32):
        super().__init__()
        w = REWARD_PRESETS[preset]["hidden"] // 2
        self.net = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1), nn.GELU(), nn.Conv2d(w, w, 3, 1, 1), nn.GELU(),
                                 nn.Conv2d(w, 2 * w, 4, 2, 1), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 4, 2, 1), nn.GELU())
        self.head = nn.Linear(4 * w, 1)
        self.register_buffer("offset", torch.zeros(()))

    def forward(self, images):
        world.check_images(images)
        h = self.net(images.float())  # (B, 2w, H/4, W/4)
        return self.head(torch.cat([h.mean((2, 3)), h.std((2, 3))], 1))[:, 0] + self.offset


def perceptual(net, a, b):
    """A perceptual distance in the manner of LPIPS (Zhang et al. 2018) from a small frozen network instead of VGG:
    the squared distance of channel-normalised features after each activation of `net` (an `Aesthetic`), averaged
    over positions and summed over layers; (B, 3, H, W) images in [-1, 1] -> a scalar, differentiable in a."""
    d, x, y = 0.0, a.float(), b.float()
    for layer in net.net:
        x, y = layer(x), layer(y)
        if isinstance(layer, nn.GELU):
            d = d + (F.normalize(x, dim=1) - F.normalize(y, dim=1)).square().sum(1).mean()
    return d


class Discriminator(nn.Module):
    """Per-pixel real/fake logits (B, 1, H, W): ByteEdit's pixel-coherence reward R_g, trained online by feedback.py.
    Fully convolutional; dilations 1, 2, 4, 8 see 31 px around each pixel. feedback.py gives it the image alone
    (in_channels 3); in_channels 4 would add the mask, which would tell it where the hole is."""

    def __init__(self, in_channels=3, width=32):
        super().__init__()
        layers = []  # no normalisation layer: it would mix statistics of the whole image into every pixel
        for i, dilation in enumerate((1, 2, 4, 8)):
            layers += [nn.Conv2d(in_channels if i == 0 else width, width, 3, 1, dilation, dilation=dilation), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(width, 1, 1))

    def forward(self, x):
        return self.net(x)


def preference_pairs(reward, kind, n, res, seed, split):
    """R of preferred and rejected examples: matching vs one-attribute-mismatched caption, or better vs worse image."""
    dev = reward.offset.device
    if kind == "alignment":
        images, captions = alignment_batch(n, 2, res, seed, split, dev)
        return reward(images, captions[0::2]), reward(images, captions[1::2])
    return tuple(map(reward, aesthetic_batch(n, res, seed, split, dev)))


def load_reward(path, device="cpu"):
    """A saved alignment or aesthetic reward, frozen. Anything else at `path` is a one-line SystemExit."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        ck = type(e).__name__
    if not isinstance(ck, dict) or ck.get("kind") not in ("alignment", "aesthetic") or "state" not in ck:
        raise SystemExit(f"{path} is not a reward model of this project ({ck if isinstance(ck, str) else 'no kind'})"
                         ": delete it, or pass --retrain")
    kw = dict(pool=ck.get("pool", "token")) if ck["kind"] == "alignment" else {}  # saved before pooling was an option
    reward = (Alignment if ck["kind"] == "alignment" else Aesthetic)(ck["preset"], ck["res"], **kw)
    reward.load_state_dict(ck["state"])
    return frozen(reward.to(device))


@torch.no_grad()
def retrieval_accuracy(reward, n, res, k=8, seed=10_000, split="test"):
    """Image -> caption retrieval among k candidates that differ from the matching one in one attribute each."""
    images, captions = alignment_batch(n, k, res, seed, split, reward.offset.device)
    R = torch.stack([reward.scores(images[i:i + 1], captions[i * k:(i + 1) * k])[0] for i in range(n)])
    return float((R.argmax(1) == 0).float().mean())


@torch.no_grad()
def pairwise_by_change(reward, n, res, seed=10_000, split="test"):
    """{change: how often the matching caption outscores the one with that one change}, over n held-out images."""
    images, _ = alignment_batch(n, 1, res, seed, split, reward.offset.device)
    specs, rng, out = data.make_batch("t2i", n, res, seed=seed, split=split).specs, np.random.default_rng(seed), {}
    for what in CHANGES:
        phrasings = rng.integers(2**31, size=n)
        texts = [[world.caption(s, np.random.default_rng(p)), world.caption(one_change(s, rng, what),
                                                                         np.random.default_rng(p))]
                 for s, p in zip(specs, phrasings)]
        keep = [i for i, t in enumerate(texts) if t[0] != t[1]]
        R = torch.stack([reward.scores(images[i:i + 1], texts[i])[0] for i in keep])
        out[what] = float((R[:, 0] > R[:, 1]).float().mean())
    return out


@torch.no_grad()
def pairwise_accuracy(reward, n, res, seed=10_000, split="test"):
    better, worse = preference_pairs(reward, "aesthetic", n, res, seed, split)
    return float((better > worse).float().mean())
