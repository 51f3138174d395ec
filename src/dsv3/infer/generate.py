import torch

from dsv3.infer.cache import LatentCache
from dsv3.infer.sampling import sample
from dsv3.infer.screen import greedy_tokens


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: int | None = None, seed: int | None = None) -> list[list[int]]:
    """Batched generation over the absorbed latent cache. Prompts may have different lengths
    (right-padded; each sequence keeps its own positions). Returns the new token ids of each
    prompt; a sequence stops after emitting eos_id (which is included)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    cfg = model.config
    vocab = cfg.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    S = int(lens.max())
    out = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    cache = LatentCache(cfg, B, S + max_new_tokens, dtype=dtype, device=device, n_layers=cfg.num_hidden_layers)
    tokens = torch.zeros(B, S, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    positions = torch.arange(S, device=device).expand(B, S)
    def next_tokens(x):  # x (B, D) final hidden states
        if temperature == 0:
            # the argmax through the int8 screen of the head where it applies: the same tokens as
            # the fp32 logits' argmax without reading the fp32 head in full (dsv3.infer.screen)
            return greedy_tokens(model, x)
        return sample(model.logits(x).float(), temperature, top_p, generator=gen)

    h = model.hidden(tokens, positions, cache)
    x = h[torch.arange(B, device=device), lens - 1]  # (B, D): last real token of each
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pos = lens.clone()  # position of the token about to be fed
    for step in range(max_new_tokens):
        nxt = next_tokens(x)
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
        if eos_id is not None:
            done |= nxt == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        x = model.hidden(nxt[:, None], pos[:, None], cache)[:, -1]
        pos = pos + 1
    return out
