"""Blocks shared by the recbole_llm models: the LLM adapter, dual-view cross-attention, negative sampling, the
logit adjustment of the CE loss, the cloze rows of one-sequence-per-user BERT4Rec training, the soft contrastive
loss, and RecLoRA's gated meta-LoRA bank."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llm.utils import RecBoleLLMError


def llm_adapter(llm_dim, hidden_size, n_layers=2, activation="none"):
    """LLM-ESR's adapter from the LLM space to ``hidden_size``: d -> d/2 -> hidden, linear layers without an
    activation (as in the official code), or with ``activation="gelu"`` between them, which lets the semantic view
    place items beyond a linear projection of their text vectors; ``n_layers=1`` is the paper's one-layer ablation."""
    if n_layers == 1:
        if activation != "none":
            raise RecBoleLLMError(f"llmesr_adapter_activation {activation!r} needs llmesr_adapter_layers: 2; a "
                                  f"one-layer adapter has no hidden layer to apply it to.")
        return nn.Linear(llm_dim, hidden_size)
    if n_layers != 2:
        raise ValueError(f"llmesr_adapter_layers must be 1 or 2, got {n_layers}")
    layers = [nn.Linear(llm_dim, llm_dim // 2), nn.Linear(llm_dim // 2, hidden_size)]
    if activation == "gelu":
        layers.insert(1, nn.GELU())  # only then: the linear adapter keeps its state-dict keys
    return nn.Sequential(*layers)


def whitened(vectors, eps=1e-6):
    """``vectors [n, d]`` PCA-whitened over their non-zero rows: centred on those rows' mean and scaled to unit
    variance along every principal axis (axes whose variance is below ``eps`` times the largest are dropped to 0).
    All-zero rows (padding, items without text) stay zero, i.e. they read as the mean item."""
    present = vectors.abs().sum(1) > 0
    rows = vectors[present].double()
    centred = rows - rows.mean(0)
    _, singular, axes = torch.linalg.svd(centred, full_matrices=False)
    std = singular / math.sqrt(max(len(rows) - 1, 1))
    scale = torch.where(std > eps * std.max(), 1.0 / std, torch.zeros_like(std))
    out = torch.zeros_like(vectors)
    out[present] = ((centred @ axes.T) * scale).to(vectors.dtype)
    return out


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


def per_row_user_vectors(encode, item_seq, item_seq_len):
    """``encode(item_seq, item_seq_len) -> [U, D]`` run once per distinct history, returned per row ``[N, D]``.

    RecBole's sampled evaluation (``uniN``) hands a sequential model one row per candidate, the user's history
    repeated in each, so encoding every row would encode each history N + 1 times. Rows are grouped by their exact
    (sequence, length), so a user with several evaluation rows of different histories is encoded once per history.
    """
    keys = torch.cat([item_seq, item_seq_len.unsqueeze(1)], dim=1)
    distinct, rows = torch.unique(keys, dim=0, return_inverse=True)
    return encode(distinct[:, :-1], distinct[:, -1])[rows]


def sample_negatives(positives, n_items):
    """One item per positive, uniform over the items 1..n_items-1 other than that positive ([PAD] = 0 never)."""
    draws = torch.randint(1, n_items - 1, positives.shape, device=positives.device)
    return draws + (draws >= positives).long()  # shifting past the positive skips it and stays uniform


def logit_prior(config, dataset, loss_type, target_field):
    """``[n_items]``: tau * log(share of each item among the training targets), the logit adjustment of Menon et
    al. (ICLR 2021, "Long-tail learning via logit adjustment") with ``tau = llm_logit_adjustment``; None when tau is 0.

    The shares count the ``target_field`` ids of the training split ``dataset`` (internal ids, so they follow
    RecBole's remapping), add-one smoothed so that an item that is never a target keeps a finite logit. The CE loss
    adds the result to its training logits only: a popular item must then beat the others by a larger margin, and
    the scores the model ranks with stay its own.
    """
    tau = config["llm_logit_adjustment"]
    if not tau:
        return None
    if tau < 0:
        raise RecBoleLLMError(f"config key 'llm_logit_adjustment' must be 0 (off) or positive, got {tau}.")
    if loss_type != "CE":
        raise RecBoleLLMError(f"llm_logit_adjustment adjusts the softmax of loss_type 'CE', not '{loss_type}'; set "
                              f"loss_type: CE or llm_logit_adjustment: 0.")
    return tau * log_target_shares(dataset, target_field)


def log_target_shares(dataset, target_field):
    """``[n_items]``: log of each item's share among the ``target_field`` ids (0 = padding, not counted) of the
    training split ``dataset``, add-one smoothed so that an item that is never a target keeps a finite value."""
    targets = dataset.inter_feat[target_field].flatten()
    counts = torch.bincount(targets[targets > 0], minlength=dataset.item_num).double() + 1
    return torch.log(counts / counts.sum()).float()


def with_prior(logits, prior):
    """``logits [N, n_items]`` plus the logit adjustment ``prior`` (``logit_prior``), or as they are without one."""
    return logits if prior is None else logits + prior


def append_item(item_seq, item_seq_len, items):
    """``[B, L]``: each right-padded sequence with ``items`` written after its last item and its first item dropped,
    the layout of BERT4Rec's ``reconstruct_test_data`` (which appends [MASK]); the appended item sits at
    ``item_seq_len - 1``."""
    extended = F.pad(item_seq, (0, 1))
    extended[torch.arange(len(item_seq), device=item_seq.device), item_seq_len] = items
    return extended[:, 1:]


def cloze_rows(item_seq, item_seq_len, last_items, mask_token, mask_ratio):
    """The masked-item rows of one training sequence per user, as LLM-ESR's official BERT4Rec dataset builds them.

    The window is the user's training items up to ``last_items`` (laid out by ``append_item``, as at test time).
    It is returned twice: first with each item replaced by ``mask_token`` with probability ``mask_ratio``, then
    with only the last item masked (the official dataset's second half, which matches the test-time input).
    Returns ``(inputs [2B, L], targets [2B, L])``; ``targets`` holds the masked items, 0 elsewhere.
    """
    window = append_item(item_seq, item_seq_len, last_items)
    random_mask = (torch.rand(window.shape, device=window.device) < mask_ratio) & (window > 0)
    last_mask = torch.zeros_like(random_mask)
    last_mask[torch.arange(len(window), device=window.device), item_seq_len - 1] = True
    windows, masks = window.repeat(2, 1), torch.cat([random_mask, last_mask])
    return windows.masked_fill(masks, mask_token), windows * masks


def soft_contrastive_loss(x, y, tau=1.0):
    """LLM-ESR's contrastive loss with soft targets (``cl``): logits ``x y^T / tau``, targets
    ``softmax((x x^T + y y^T) / 2 * tau)``, cross-entropy in both directions, averaged over the batch."""
    logits = x @ y.T / tau
    targets = F.softmax((x @ x.T + y @ y.T) / 2 * tau, dim=-1)
    x_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(1)
    y_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
    return ((x_loss + y_loss) / 2).mean()


class MetaLoRAGate(nn.Module):
    """RecLoRA's gate of one target module: LayerNorm -> Linear -> ReLU -> Dropout -> Linear, then softmax(./tau),
    mapping a CRM representation ``[B, d]`` to mixing weights ``[B, n_meta]`` over the meta-LoRAs."""

    def __init__(self, in_dim, n_meta, hidden=60, dropout=0.1, temperature=5.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_meta))
        for linear in (self.mlp[1], self.mlp[4]):
            nn.init.zeros_(linear.bias)  # weights keep nn.Linear's kaiming_uniform(a=sqrt(5)), as the official code
        self.temperature = temperature

    def forward(self, context):
        return F.softmax(self.mlp(context) / self.temperature, dim=-1)


class MetaLoRA(nn.Module):
    """A bank of ``n_meta`` LoRAs (A_k: d_in x r, B_k: r x d_out) of one frozen linear layer, mixed per sample in
    weight space (RecLoRA): ``delta(x) = dropout(x) @ (sum_k w_k A_k) @ (sum_k w_k B_k) * alpha / r``, the same
    mixed pair for every token of a sample. A_k starts as nn.Linear's kaiming_uniform(a=sqrt(5)) over d_in, B_k at
    zero, so the layer starts as the base layer.

    The weights ``w`` come from ``gate`` applied to ``context`` (``[B, d]``, set before each forward), or are 1 when
    there is no gate: with ``n_meta = 1`` that is one plain LoRA shared by all samples (RecLoRA's ``origin`` mode).
    """

    def __init__(self, in_features, out_features, rank, alpha, n_meta=1, dropout=0.0, gate=None):
        super().__init__()
        if gate is None and n_meta != 1:
            raise ValueError("a MetaLoRA bank of several LoRAs needs a gate")
        a_init = [nn.init.kaiming_uniform_(torch.empty(rank, in_features), a=math.sqrt(5)).T for _ in range(n_meta)]
        self.lora_A = nn.Parameter(torch.stack(a_init))                          # [n_meta, d_in, r]
        self.lora_B = nn.Parameter(torch.zeros(n_meta, rank, out_features))      # [n_meta, r, d_out]
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank
        self.gate = gate
        self.context = None

    def mixing_weights(self, batch_size):
        """``[B, n_meta]``: the gate's softmax of the context, or ones without a gate."""
        if self.gate is None:
            return self.lora_A.new_ones(batch_size, 1)
        if self.context is None or len(self.context) != batch_size:
            raise RuntimeError("MetaLoRA needs its context ([batch, d]) set before the forward pass")
        return self.gate(self.context)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])  # [B, tokens, d_in]
        weights = self.mixing_weights(shape[0]).to(x.dtype)
        a = torch.einsum("bn,nir->bir", weights, self.lora_A.to(x.dtype))
        b = torch.einsum("bn,nro->bro", weights, self.lora_B.to(x.dtype))
        return (torch.bmm(torch.bmm(self.dropout(x), a), b) * self.scaling).reshape(*shape[:-1], -1)

    def add_to(self, linear):
        """Add this delta to ``linear``'s output with a forward hook; returns the hook's handle."""
        return linear.register_forward_hook(lambda module, inputs, output: output + self(inputs[0]))
