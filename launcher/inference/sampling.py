"""Decoding: greedy (temperature 0: the tokens `transformers`' generate(do_sample=False)
gives on the same weights) or sampling from softmax(logits / T) within top-p, with a KV cache.
"""

from __future__ import annotations

import torch

from launcher.inference.loading import Loaded
from launcher.model.attention import Attention, KVCache


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from a (vocab,) row of logits: the argmax at temperature 0; else a sample
    from softmax(logits / temperature) over the smallest set of most likely tokens whose
    probability reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    # keep token k when the tokens before it hold less than top_p: the first one always
    keep = (ordered.cumsum(0) - ordered) < top_p
    kept = ordered * keep
    pick = torch.multinomial((kept / kept.sum()).float().cpu(), 1, generator=generator)
    return int(order[pick.to(order.device)])


@torch.no_grad()
def generate(loaded: Loaded, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
             seed: int, device: torch.device) -> list[int]:

    model = loaded.model
    capacity = len(prompt_ids) + max_new_tokens
    like = next(model.parameters())
    caches = [KVCache.empty(1, m.kv_heads, capacity, m.head_dim, like) for m in model.items
              if isinstance(m, Attention)]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = model.decode(ids, caches)[0, -1, :loaded.vocab].float()
        token = next_token(logits, temperature, top_p, generator)
        out.append(token)
        if token in loaded.eos:
            break
        ids = torch.tensor([[token]], device=device)
    return out
