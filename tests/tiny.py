"""What several test files build the same way: the tiny one-object DiT config, and tiny DiTs whose field is not zero
(an adaLN-Zero DiT at init outputs exactly 0, which would make many comparisons pass for nothing)."""
import torch

import world
from model import DiT, preset

MCFG = preset("tiny", vocab_size=len(world.VOCAB), max_text_len=world.ONE_OBJECT_TOKENS, pooled_text=True)


def jittered(seed=0, std=0.05, mcfg=MCFG):
    """A tiny DiT with noise added to every weight, the zero-initialised ones included."""
    torch.manual_seed(seed)
    model = DiT(mcfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model
