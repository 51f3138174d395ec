import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, temperature, top_p, top_k)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The distribution actually sampled from: softmax(logits / T) restricted to top-k and the
    smallest nucleus of mass >= top_p, renormalised. Computed in fp32."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (p.cumsum(dim=-1) - p) >= top_p
        p = p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


# ---- per-row helpers for the engine (each row of a batch has its own parameters) ----

def apply_frequency_presence(logits: torch.Tensor, token_ids: torch.Tensor, counts: torch.Tensor,
                             frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's penalties on one row, in place: logit[j] -= frequency * count[j] + presence * (count[j] > 0),
    over the tokens generated so far (token_ids unique, counts their multiplicities)."""
    logits[token_ids] -= frequency * counts.to(logits.dtype) + presence
    return logits


def apply_repetition(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (arXiv:1909.05858) as transformers applies it, on one row in place:
    a seen token's logit is divided by the penalty when positive and multiplied when negative."""
    x = logits[token_ids]
    logits[token_ids] = torch.where(x > 0, x / penalty, x * penalty)
    return logits


def batched_filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                           top_k: torch.Tensor, nucleus_candidates: int = 256) -> torch.Tensor:
    """Row b of the result equals filtered_probs(logits[b], temperature[b], top_p[b], top_k[b]).
    logits (B, V); temperature (B,) > 0; top_p (B,); top_k (B,) ints (0 = off). fp32.
    The nucleus is searched among the `nucleus_candidates` most likely tokens first (a top-k instead
    of a sort of the whole vocabulary); it is exact because when those hold >= top_p of the mass,
    every later token is dropped anyway; rows where they do not fall back to a full sort."""
    x = logits.float() / temperature.float()[:, None]
    B, V = x.shape
    k = torch.where((top_k > 0) & (top_k < V), top_k, torch.zeros_like(top_k))
    if bool((k > 0).any()):
        kmax = int(k.max())
        vals = x.topk(kmax, dim=-1).values  # (B, kmax), sorted
        kth = vals.gather(1, (k.clamp(min=1) - 1)[:, None])
        kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(dim=-1)
    rows = (top_p < 1.0).nonzero().flatten().tolist()
    if rows:
        sub, tp = probs[rows], top_p[rows].to(probs.dtype)[:, None]
        n = min(V, nucleus_candidates)
        p, idx = sub.topk(n, dim=-1)  # sorted, descending
        full = (p.sum(dim=-1) < tp.squeeze(1)).nonzero().flatten().tolist()
        kept = torch.zeros_like(sub)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        kept.scatter_(-1, idx, p.masked_fill((p.cumsum(dim=-1) - p) >= tp, 0.0))
        for i in full:  # the candidates hold too little mass: sort the whole row
            ps, ids = sub[i].sort(descending=True)
            kept[i] = torch.zeros_like(ps).scatter_(-1, ids, ps.masked_fill((ps.cumsum(-1) - ps) >= tp[i], 0.0))
        probs[rows] = kept / kept.sum(dim=-1, keepdim=True)
    return probs


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row by inverting the CDF: probs (B, V), u (B,) uniform in [0, 1) from each
    request's own generator, so a request's draw never depends on the other rows of the batch."""
    cdf = probs.float().cumsum(dim=-1)
    target = (u.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None]
    # first index whose CDF exceeds u*total: always a token of non-zero probability
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, n: int):
    """logprobs (B, V) fp32 log-softmax; chosen (B,). Returns (logprob of chosen (B,), its rank (B,),
    1 = best, top-n ids (B, n), top-n logprobs (B, n))."""
    lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    rank = (logprobs > lp[:, None]).sum(dim=-1) + 1
    top = logprobs.topk(n, dim=-1) if n > 0 else None
    ids = top.indices if top is not None else chosen.new_zeros(chosen.shape[0], 0)
    vals = top.values if top is not None else logprobs.new_zeros(chosen.shape[0], 0)
    return lp, rank, ids, vals
