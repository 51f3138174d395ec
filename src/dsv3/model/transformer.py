"""Block and Transformer: single-device plain PyTorch. Parallelism, FP8 and compilation are
applied from outside (see dsv3.parallel, dsv3.fp8)."""
import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.kernels import cpu as cpu_kernels
from dsv3.model.linear import Linear
from dsv3.model.mla import MLA
from dsv3.model.moe import MLP, Gate, MoE
from dsv3.model.mtp import MTP
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import Rotary


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, positions, mask, cache=None):
        # the few rows of a CPU decode step: each half of the block in one kernel call (None: not such a step)
        h = self.attn.decode_block(x, self.attn_norm, cos, sin, positions, mask, cache)
        if h is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, positions, mask, cache)
        else:
            x, h = h, cpu_kernels.ffn_block(h, self.ffn_norm, self.ffn)
        return x + self.ffn(self.ffn_norm(x)) if h is None else h


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # the projections' Linear: its inference calls take the CPU kernels (dsv3.model.linear)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        # MTP module k (1-based) sits at checkpoint layer index num_hidden_layers + k - 1.
        self.mtp = nn.ModuleList(MTP(cfg.num_hidden_layers + k, cfg) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = Rotary(cfg)

    # ---- the pieces, for the trainer / engine ----
    def _prepare(self, tokens, positions, cache):
        # a cached step's MTP forward (mtp_hidden) comes with the positions tensor its main forward had: the
        # tables and mask made for it are reused (kept with the tensor itself, so never for another one)
        if positions is None or cache is None:
            return self._tables(tokens, positions, cache)
        # (inference tensors have no version counter)
        key = (None if positions.is_inference() else positions._version, tokens.shape, tokens.device)
        memo = self.__dict__.get("_prepared")
        if memo is not None and memo[0] is positions and memo[1] == key:
            return memo[2]
        out = self._tables(tokens, positions, cache)
        self.__dict__["_prepared"] = (positions, key, out)
        return out

    def _tables(self, tokens, positions, cache):
        B, S = tokens.shape
        mask = None
        if positions is None:
            if cache is not None:
                raise ValueError("a cached forward needs explicit positions")
            positions = torch.arange(S, device=tokens.device).expand(B, S)  # plain causal: mask None
        elif cache is None:
            # keys are these same tokens: visible iff their position is <= the query's
            mask = positions[:, None, :] <= positions[:, :, None]
        else:
            # cache slot t holds position t; a query at position p sees slots 0..p
            L = int(positions.max()) + 1
            mask = torch.arange(L, device=tokens.device)[None, None, :] <= positions[:, :, None]
        cos, sin = self.rotary.tables(positions)
        return positions, mask, cos, sin

    def hidden(self, tokens, positions=None, cache=None):
        """tokens (B, S) -> final hidden states after the last norm (B, S, D): the head's input
        and the main-model representation h^0 that the first MTP module takes (as in the
        inference engines that serve the released MTP weights)."""
        positions, mask, cos, sin = self._prepare(tokens, positions, cache)
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, mask, cache)
        return self.norm(h)

    def logits(self, h):
        # a 2-D matmul: a 3-D input under inference_mode made torch copy the whole head weight per call
        return self.head(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)

    def forward(self, tokens, positions=None, cache=None):
        """tokens (B, S) -> logits (B, S, vocab) for every position."""
        return self.logits(self.hidden(tokens, positions, cache))

    def mtp_hidden(self, h, tokens, positions=None, cache=None, depths=None):
        """Multi-token prediction (V3 §2.2). h (B, S, D): main hidden states for inputs tokens[:, :S];
        tokens (B, S + D): the inputs followed by D more tokens. Depth k combines h^{k-1}_i with
        Emb(t_{i+k}) and its head predicts t_{i+k+1}. Returns the list of normalised hidden
        states per depth, each (B, S, D); `logits()` turns them into predictions."""
        S = h.shape[1]
        depths = len(self.mtp) if depths is None else depths
        if tokens.shape[1] < S + depths:
            raise ValueError(f"MTP depth {depths} needs {S + depths} tokens, got {tokens.shape[1]}")
        positions, mask, cos, sin = self._prepare(tokens[:, :S], positions, cache)
        outs = []
        for k in range(1, depths + 1):
            h, out = self.mtp[k - 1](h, self.embed(tokens[:, k:S + k]), cos, sin, positions, mask, cache)
            outs.append(out)
        return outs

    # ---- initialisation of a fresh model ----
    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        """Normal(0, std) for every matrix (the paper initialises all with std 0.006), ones for
        norms, zeros for the router bias."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm weights
            else:
                nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, Gate) and m.bias is not None:
                m.bias.zero_()
        self.rotary.reset()
        return self
