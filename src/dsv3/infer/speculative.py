"""MTP speculative decoding (DeepSeek-V3 §2.2 and §5.4.3: the MTP module, kept at inference,
drafts the token after next; 85-90% acceptance of that second token, ~1.8x tokens/s).

One decoding step of a request whose committed tokens end in t_n (sampled, not yet fed):
  1. draft: the MTP module combined h_{n-1} (main hidden state at position n-1) with Emb(t_n) and
     predicted d ~ q (done at the end of the previous step);
  2. verify: ONE main-model forward over [t_n, d] at positions [n, n+1] gives p_n (the target
     distribution of t_{n+1}) and p_{n+1} (of t_{n+2} if d is right);
  3. accept d with probability min(1, p_n(d) / q(d)); if rejected, t_{n+1} ~ norm(max(p_n - q, 0));
     if accepted, the bonus token t_{n+2} ~ p_{n+1} comes for free (standard speculative sampling,
     Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318): every emitted
     token is distributed exactly as plain sampling from the target. Greedy: accept iff d is the
     target's argmax, so greedy output is identical to plain greedy decoding;
  4. the MTP module runs over the positions just verified (it needs h_i and the token at i+1) to
     fill its own latent cache layer (num_hidden_layers + k - 1) and draft the next proposal.
A rejected draft leaves stale latents in slot n+1 of every layer: the next forward writes
position n+1 again before anything reads it (see the cache protocol in dsv3.model.mla).
"""
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class SpecStats:
    steps: int = 0          # verify forwards (per request)
    drafted: int = 0        # draft tokens proposed
    accepted: int = 0       # draft tokens accepted
    emitted: int = 0        # tokens kept from verify steps (past a stop or max_new_tokens are dropped)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify forward, 1 + accepted drafts (EAGLE's tau): the bound on the speed-up."""
        return (self.steps + self.accepted) / self.steps if self.steps else 0.0


def verify_greedy(target, drafts) -> list[list[int]]:
    """target (B, k+1): argmax of the target at each verified position; drafts (B, k); tensors or nested
    lists of ints. Emits the accepted drafts and then the target's token at the first mismatch (or the bonus).
    Plain Python: B and k are a decode batch and a few drafts (tensor ops cost more than they save here)."""
    tgt = target.tolist() if isinstance(target, torch.Tensor) else target
    out = []
    for t, d in zip(tgt, drafts.tolist() if isinstance(drafts, torch.Tensor) else drafts):
        n = 0
        while n < len(d) and t[n] == d[n]:
            n += 1
        out.append(t[:n + 1])
    return out


def rejection_sample(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor) -> list[list[int]]:
    """Speculative sampling for B rows with k drafts each.
    p (B, k+1, V): target distributions at the k draft positions and the bonus position;
    q (B, k, V): the draft distributions the drafts were sampled from; drafts (B, k);
    u (B, k+1): uniforms in [0, 1) from each request's own generator (u[:, i] decides draft i,
    u[:, k] draws the correction or the bonus token).
    Returns the emitted tokens of each row (1 to k+1 of them)."""
    from dsv3.infer.sampling import sample_inverse_cdf

    B, k = drafts.shape
    p, q = p.float(), q.float()
    pd = p[:, :k].gather(2, drafts[..., None]).squeeze(-1)  # (B, k) p_i(d_i)
    qd = q.gather(2, drafts[..., None]).squeeze(-1)
    # accept iff u < p/q, i.e. with probability min(1, p/q); written as a product to avoid 0/0
    ok = (u[:, :k].to(p.device) * qd < pd).int()
    n_acc = ok.cumprod(dim=1).sum(dim=1)  # drafts accepted before the first rejection
    rows = torch.arange(B, device=p.device)
    # the distribution of the extra token: residual at the first rejection, else the bonus p_k
    pk = p[rows, n_acc]  # (B, V)
    rejected = n_acc < k
    if bool(rejected.any()):
        qk = q[rows, n_acc.clamp(max=k - 1)]
        resid = (pk - qk).clamp(min=0)
        mass = resid.sum(dim=-1, keepdim=True)
        # p == q up to rounding leaves no residual mass; then p itself is the right distribution
        resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), pk)
        pk = torch.where(rejected[:, None], resid, pk)
    extra = sample_inverse_cdf(pk, u[:, k]).tolist()
    d, n = drafts.tolist(), n_acc.tolist()
    return [d[b][:n[b]] + [extra[b]] for b in range(B)]


def frequent_tokens(token_ids: Iterable[Iterable[int]], k: int) -> list[int]:
    """The k most frequent token ids of a tokenized corpus: a draft vocabulary (FR-Spec, Zhao et al.
    2025, arXiv:2502.14856). The draft head then costs k/V of the full one, which matters when the
    output projection is a large part of a forward (small models with a 129k vocabulary)."""
    c = Counter()
    for ids in token_ids:
        c.update(int(t) for t in ids)
    return [t for t, _ in c.most_common(k)]
