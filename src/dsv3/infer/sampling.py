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
