"""Blocks shared by the recbole_llm models: the LLM adapter, dual-view cross-attention, negative sampling and the
soft contrastive loss."""
import math

import torch
import torch.nn.functional as F
from torch import nn


def llm_adapter(llm_dim, hidden_size, n_layers=2):
    """LLM-ESR's adapter from the LLM space to ``hidden_size``: d -> d/2 -> hidden, linear layers without an
    activation (as in the official code); ``n_layers=1`` is the paper's one-layer ablation."""
    if n_layers == 1:
        return nn.Linear(llm_dim, hidden_size)
    if n_layers != 2:
        raise ValueError(f"llmesr_adapter_layers must be 1 or 2, got {n_layers}")
    return nn.Sequential(nn.Linear(llm_dim, llm_dim // 2), nn.Linear(llm_dim // 2, hidden_size))


class CrossViewAttention(nn.Module):
    """Multi-head attention with queries from one view and keys/values from the other (LLM-ESR).

    Bias-free q/k/v projections and an output projection with bias; padded keys are masked (and later ones too when
    ``causal``); no residual, no LayerNorm and no dropout: the output replaces the view's input sequence.
    """

    def __init__(self, hidden_size, n_heads=2):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by {n_heads} cross-attention heads")
        self.n_heads, self.head_size = n_heads, hidden_size // n_heads
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.key = nn.Linear(hidden_size, hidden_size, bias=False)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False)
        self.output = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x):
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_size).transpose(1, 2)  # [B, heads, L, d]

    def forward(self, query_view, key_view, item_seq, causal=False):
        """``causal`` hides later positions: under a causal encoder trained at every position, position t would
        otherwise read the item at t + 1, its own target."""
        q, k, v = self._heads(self.query(query_view)), self._heads(self.key(key_view)), self._heads(self.value(key_view))
        scores = q @ k.transpose(-1, -2)
        hidden = (item_seq == 0)[:, None, None, :]
        if causal:
            length = item_seq.size(1)
            hidden = hidden | torch.ones(length, length, dtype=torch.bool, device=item_seq.device).triu(1)
        scores = scores.masked_fill(hidden, -1e9)
        attended = torch.softmax(scores / math.sqrt(self.head_size), dim=-1) @ v
        batch, _, length, _ = attended.shape
        return self.output(attended.transpose(1, 2).reshape(batch, length, -1))


def sample_negatives(positives, n_items):
    """One item per positive, uniform over the items 1..n_items-1 other than that positive ([PAD] = 0 never)."""
    draws = torch.randint(1, n_items - 1, positives.shape, device=positives.device)
    return draws + (draws >= positives).long()  # shifting past the positive skips it and stays uniform


def soft_contrastive_loss(x, y, tau=1.0):
    """LLM-ESR's contrastive loss with soft targets (``cl``): logits ``x y^T / tau``, targets
    ``softmax((x x^T + y y^T) / 2 * tau)``, cross-entropy in both directions, averaged over the batch."""
    logits = x @ y.T / tau
    targets = F.softmax((x @ x.T + y @ y.T) / 2 * tau, dim=-1)
    x_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(1)
    y_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
    return ((x_loss + y_loss) / 2).mean()
