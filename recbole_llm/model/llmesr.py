"""Mechanisms shared by the LLM-ESR family (Liu et al., NeurIPS 2024), written once for the three backbones.

``DualLLM`` turns a RecBole sequential model (SASRec, GRU4Rec, BERT4Rec) into the dual-view model of LLM-ESR;
``LLMESR`` adds retrieval-augmented self-distillation and the optional item regulariser on top of it. A backbone
class supplies two hooks: ``_view_input`` (embeddings -> encoder input) and ``_encode`` (encoder input -> per-position
outputs); everything else lives here. Each mixin's defaults are in ``properties/model/<mixin>.yaml``, which the
Config layers along the model's class hierarchy.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from recbole.utils import InputType
from torch import nn
from torch.utils.checkpoint import checkpoint

from recbole_llm.data.dataset import target_list_field, training_target_field
from recbole_llm.model.layers import (CrossViewAttention, llm_adapter, logit_prior, per_row_user_vectors,
                                      sample_negatives, soft_contrastive_loss, whitened, with_prior)
from recbole_llm.text import item_vectors, pca_item_vectors, similar_users
from recbole_llm.text.side_data import top_similar
from recbole_llm.utils import RecBoleLLMError, config_choice

LOSS_TYPES = ("CE", "BPR", "BCE")


@contextlib.contextmanager
def _backbone_loss_type(config):
    """RecBole's backbones accept only CE or BPR when built; their own loss function is not used here."""
    loss_type = config["loss_type"]
    config["loss_type"] = "CE"
    try:
        yield
    finally:
        config["loss_type"] = loss_type


class DualLLM:
    """LLM-ESR's dual-view sequence model over a RecBole backbone.

    - Semantic view: a frozen table of LLM item vectors (the side-data cache) and a two-layer adapter to the
      backbone's width. Collaborative view: the backbone's own ID table, initialised from the PCA of the LLM vectors.
    - Both views go through the backbone's input pipeline and then, optionally, 2-head cross-attention whose outputs
      replace each view's input; one shared encoder encodes both. Over a causal backbone the cross-attention is
      causal too: the official code's keys-only mask would let position t read its own target, the item at t + 1.
    - A user is ``[id features; semantic features]`` at the last position, an item ``[id_emb; adapter(llm_emb)]``.
    - Losses: RecBole's CE, BPR, or the paper's BCE; BPR and BCE draw one uniform negative per target in the model.

    Switches beyond the paper, each off in ``llmesr_setting: faithful`` (``properties/setting/llmesr_faithful.yaml``):
    ``llmesr_cross_residual`` adds each view's input to its cross-attention output instead of replacing it;
    ``llmesr_cross_norm`` puts a LayerNorm after it; ``llmesr_llm_score_weight`` weights the semantic view's dot
    product in the score; ``llmesr_init: xavier`` is the official init of the adapter and cross-attention;
    ``llmesr_input_scale: False`` (transformer backbones) drops the official sqrt(width) scaling of the item
    embeddings, as RecBole's SASRec and BERT4Rec feed them. ``llm_logit_adjustment`` (tau, 0 = off, also on the
    ``…AP`` backbones) adds tau * log(the item's share of the training targets) to the CE loss's training logits.
    ``llmesr_id_view_dropout`` (p, 0 = off) zeroes the ID-view features of each training row of the recommendation
    loss with probability p, so that those rows are ranked by the semantic view alone (after DropoutNet, Volkovs et
    al., NeurIPS 2017): the semantic view must learn to rank on its own instead of correcting the ID view.
    ``llmesr_llm_whiten`` PCA-whitens the frozen LLM item vectors before the adapter: sentence vectors crowd into a
    narrow cone, which a linear adapter at a small init maps to nearly equal items; ``llmesr_adapter_activation:
    gelu`` makes the adapter non-linear (official: two linear layers).

    Systems: ``llmesr_activation_checkpointing`` recomputes each cross-attention and each view's encoder in the
    backward pass instead of keeping their activations (``torch.utils.checkpoint``, non-reentrant, dropout replayed
    from the saved RNG state): the same gradients, less memory, one more forward of those parts per step.
    """

    llm_train_modes = ("prefix", "all_positions")
    causal = True  # the backbone reads only earlier positions; the cross-attention must too (BERT4Rec: False)
    input_type = InputType.POINTWISE  # negatives, when a loss needs them, are sampled in the model
    skip_flops = True

    def __init__(self, config, dataset):
        self.rec_loss_type = config_choice(config, "loss_type", LOSS_TYPES)
        with _backbone_loss_type(config):
            super().__init__(config, dataset)
        self.n_users = dataset.num(self.USER_ID)
        self.train_mode = config["llm_train_mode"]
        self.target_list = target_list_field(config)
        self.use_id_view = config["llmesr_use_id_view"]
        self.use_llm_view = config["llmesr_use_llm_view"]
        if not (self.use_id_view or self.use_llm_view):
            raise RecBoleLLMError("llmesr_use_id_view and llmesr_use_llm_view are both False: keep at least one view.")
        self.llm_score_weight = config["llmesr_llm_score_weight"]
        self.id_view_dropout = self._id_view_dropout(config)
        self.activation_checkpointing = config["llmesr_activation_checkpointing"]
        self._init_llm_view(config, dataset)
        self._init_id_view(config, dataset)
        self._init_cross_attention(config)
        prior = logit_prior(config, dataset, self.rec_loss_type, training_target_field(config))
        self.register_buffer("logit_prior", prior, persistent=False)  # rebuilt from the data: state dicts unchanged
        self._eval_item_matrix = None

    @property
    def has_both_views(self):
        """Whether the model has the ID view and the semantic view (the dual-view model, not an ablation)."""
        return self.use_id_view and self.use_llm_view

    # --- construction -------------------------------------------------------------------------------------------
    def _id_view_dropout(self, config):
        rate = config["llmesr_id_view_dropout"]
        if not 0.0 <= rate <= 1.0:
            raise RecBoleLLMError(f"llmesr_id_view_dropout is {rate}: it is a probability, set it in [0, 1].")
        if rate > 0 and not self.has_both_views:
            raise RecBoleLLMError("llmesr_id_view_dropout needs both views; set it 0 when a view is dropped.")
        return rate

    @property
    def view_size(self):
        return self.item_embedding.embedding_dim

    def _init_llm_view(self, config, dataset):
        vectors = item_vectors(dataset, config)
        if config["llmesr_llm_whiten"]:
            vectors = whitened(vectors)
        rows = torch.zeros(self.item_embedding.num_embeddings, vectors.shape[1])  # BERT4Rec's mask row stays 0
        rows[: len(vectors)] = vectors
        # Created after the backbone's weight init, so that init never overwrites it (RecBole #1046).
        self.llm_item_embedding = nn.Embedding.from_pretrained(rows, freeze=True)
        activation = config_choice(config, "llmesr_adapter_activation", ("none", "gelu"))
        self.adapter = llm_adapter(vectors.shape[1], self.view_size, config["llmesr_adapter_layers"], activation)
        self._init_plugin_weights(config, self.adapter)

    def _init_id_view(self, config, dataset):
        init = config_choice(config, "llmesr_id_init", ("pca", "random"))
        if init == "pca":
            pca = pca_item_vectors(dataset, config, self.view_size)
            with torch.no_grad():
                self.item_embedding.weight[: len(pca)] = pca

    def _init_cross_attention(self, config):
        self.use_cross_attention = config["llmesr_cross_attention"]
        self.cross_residual = config["llmesr_cross_residual"]
        if self.use_cross_attention and not self.has_both_views:
            raise RecBoleLLMError("llmesr_cross_attention needs both views; set it False to drop a view.")
        if self.use_cross_attention:
            heads = config["llmesr_cross_attention_heads"]
            self.llm_to_id = CrossViewAttention(self.view_size, heads)
            self.id_to_llm = CrossViewAttention(self.view_size, heads)
            self._init_plugin_weights(config, self.llm_to_id, self.id_to_llm)
            self.cross_norm = nn.LayerNorm(self.view_size, eps=1e-12) if config["llmesr_cross_norm"] else nn.Identity()

    def _init_plugin_weights(self, config, *modules):
        """Initialise the layers LLM-ESR adds (adapter, cross-attention). ``llmesr_init: backbone``: the backbone's
        own ``_init_weights``. ``xavier``: the official code's xavier_normal_ on every weight matrix; the biases keep
        PyTorch's default init, as there (xavier raises on 1-d tensors and the official code skips them)."""
        init = config_choice(config, "llmesr_init", ("backbone", "xavier"))
        for module in modules:
            if init == "backbone":
                module.apply(self._init_weights)
            else:
                for weight in (p for p in module.parameters() if p.dim() >= 2):
                    nn.init.xavier_normal_(weight)

    # --- representations ----------------------------------------------------------------------------------------
    def _view_inputs(self, item_seq):
        id_view = self._view_input(self.item_embedding(item_seq), item_seq)
        llm_view = self._view_input(self.adapter(self.llm_item_embedding(item_seq)), item_seq)
        if self.use_cross_attention:
            id_view, llm_view = (self._recomputed(self._cross, self.llm_to_id, llm_view, id_view, item_seq),
                                 self._recomputed(self._cross, self.id_to_llm, id_view, llm_view, item_seq))
        return [view for view, used in ((id_view, self.use_id_view), (llm_view, self.use_llm_view)) if used]

    def _cross(self, attention, query_view, own_view, item_seq):
        """The view that replaces ``own_view``: the attention of ``query_view`` over it; plus ``own_view`` with
        ``llmesr_cross_residual``; then LayerNorm with ``llmesr_cross_norm``."""
        out = attention(query_view, own_view, item_seq, self.causal)
        if self.cross_residual:
            out = out + own_view
        return self.cross_norm(out)

    def sequence_features(self, item_seq):
        """``[B, L, views * view_size]``: the shared encoder's output for each view, concatenated."""
        return torch.cat([self._recomputed(self._encode, view, item_seq) for view in self._view_inputs(item_seq)],
                         dim=-1)

    def _recomputed(self, function, *args):
        """``function(*args)``; with ``llmesr_activation_checkpointing`` in a training pass, its activations are not
        kept but recomputed in backward."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def forward(self, item_seq, item_seq_len):
        """The user vector ``[B, views * view_size]``: the features at the last item."""
        return self.gather_indexes(self.sequence_features(item_seq), item_seq_len - 1)

    def item_matrix(self):
        """``[n_items, views * view_size]``: ``[id_emb; adapter(llm_emb)]`` of every item (the mask row excluded)."""
        parts = []
        if self.use_id_view:
            parts.append(self.item_embedding.weight[: self.n_items])
        if self.use_llm_view:
            parts.append(self.llm_score_weight * self.adapter(self.llm_item_embedding.weight[: self.n_items]))
        return torch.cat(parts, dim=-1)

    def item_bias(self, items):
        """A per-item score offset (BERT4Rec's output bias); none for the other backbones."""
        return 0.0

    def _scoring_items(self):
        # Evaluation scores every user against the same matrix: build it once per evaluation.
        if self.training:
            return self.item_matrix()
        if self._eval_item_matrix is None:
            self._eval_item_matrix = self.item_matrix()
        return self._eval_item_matrix

    def train(self, mode=True):
        self._eval_item_matrix = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        self._eval_item_matrix = None
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    # --- losses -------------------------------------------------------------------------------------------------
    def rec_loss(self, outputs, targets):
        """The recommendation loss of ``outputs [N, D]`` predicting ``targets [N]``."""
        items = self.item_matrix()
        if self.rec_loss_type == "CE":
            logits = outputs @ items.T + self.item_bias(slice(None))
            return F.cross_entropy(with_prior(logits, self.logit_prior), targets)
        negatives = sample_negatives(targets, self.n_items)
        pos = (outputs * items[targets]).sum(-1) + self.item_bias(targets)
        neg = (outputs * items[negatives]).sum(-1) + self.item_bias(negatives)
        if self.rec_loss_type == "BPR":
            return -F.logsigmoid(pos - neg).mean()
        return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))

    def _rec_outputs_and_targets(self, interaction):
        """The (outputs, targets) the loss is taken on, and the user vectors ``[B, D]``."""
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        if self.train_mode == "all_positions":
            features = self.sequence_features(item_seq)
            targets = interaction[self.target_list]
            valid = targets > 0
            return features[valid], targets[valid], self.gather_indexes(features, item_seq_len - 1)
        users = self.forward(item_seq, item_seq_len)
        return users, interaction[self.POS_ITEM_ID], users

    def _drop_id_view(self, outputs):
        """``outputs [N, D]`` with each row's ID-view features zeroed with probability ``llmesr_id_view_dropout``
        in training: the dropped rows' scores are then the semantic view's alone."""
        if not (self.training and self.id_view_dropout > 0):
            return outputs
        dropped = torch.rand(len(outputs), 1, device=outputs.device) < self.id_view_dropout
        id_columns = torch.arange(outputs.shape[-1], device=outputs.device) < self.view_size  # the ID view is first
        return outputs.masked_fill(dropped & id_columns, 0.0)

    def calculate_loss(self, interaction):
        outputs, targets, users = self._rec_outputs_and_targets(interaction)
        return (self.rec_loss(self._drop_id_view(outputs), targets), *self.extra_losses(interaction, users))

    def extra_losses(self, interaction, users):
        """Terms added to the recommendation loss; logged separately by RecBole's trainer."""
        return ()

    def predict(self, interaction):
        users = per_row_user_vectors(self.forward, interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        items = interaction[self.ITEM_ID]
        return (users * self._scoring_items()[items]).sum(-1) + self.item_bias(items)

    def full_sort_predict(self, interaction):
        users = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return users @ self._scoring_items().T + self.item_bias(slice(None))


class TransformerViews:
    """The input pipeline of LLM-ESR's transformer backbones: scale by sqrt(width) (``llmesr_input_scale``, as the
    official code; off, the item embedding enters unscaled as in RecBole's SASRec and BERT4Rec), add the shared
    position embedding, then the backbone's own LayerNorm and dropout."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.input_scale = math.sqrt(self.view_size) if config["llmesr_input_scale"] else 1.0

    def _view_input(self, item_emb, item_seq):
        positions = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0).expand_as(item_seq)
        x = item_emb * self.input_scale + self.position_embedding(positions)
        return self.dropout(self.LayerNorm(x))


class LLMESR:
    """Retrieval-augmented self-distillation and the item regulariser of LLM-ESR, over a ``DualLLM*`` model.

    - Teacher: the mean of the model's own features (detached) over the training sequences (minus their last item)
      of the user's ``llmesr_sim_user_num`` most similar users, retrieved by LLM user-text vectors.
    - ``llmesr_user_sim_func``: ``kd`` = MSE(user, teacher); ``cl`` = the soft-target contrastive loss.
    - ``llmesr_teacher``: ``batch`` encodes each distinct similar user of a batch once under ``no_grad``;
      ``epoch`` encodes every user once per epoch into a table (cheaper; the teacher lags by < 1 epoch);
      ``running`` keeps that table without the extra pass: a user's row is the (detached) feature the training
      step itself computed for the user's full training sequence, when that sequence was last in a batch, so
      the teacher also lags by < 1 epoch and is seen, like the official one, through training-mode dropout.
      The table is filled by one pass at the first step.
    - ``llmesr_item_reg``: ``beta * cl(adapter(llm_emb), id_emb)`` over the batch's distinct items.

    Deviation, off in ``llmesr_setting: faithful``: ``llmesr_alpha`` is 0.01, not the paper's 0.1, which on
    ml-1m-half lowered LLMESR_SASRec's test NDCG@10 from 0.0946 to 0.0911 (seed 42, 20 epochs; the README).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.distill = config["llmesr_distill"]
        self.alpha = config["llmesr_alpha"]
        self.user_sim_func = config_choice(config, "llmesr_user_sim_func", ("kd", "cl"))
        self.teacher_mode = config_choice(config, "llmesr_teacher", ("batch", "epoch", "running"))
        self.item_reg = config["llmesr_item_reg"]
        self.beta = config["llmesr_beta"]
        if self.item_reg and not self.has_both_views:
            raise RecBoleLLMError("llmesr_item_reg aligns the two views; it needs both.")
        if self.distill:
            seqs, lengths = self._user_training_sequences(dataset)
            self.register_buffer("user_seq", seqs, persistent=False)
            self.register_buffer("user_seq_len", lengths, persistent=False)
            self.register_buffer("similar_users", self._neighbours(config, dataset), persistent=False)
        self._teacher_table = None
        # teacher passes run train_batch_size users at a time, the batch a training step already holds with its
        # gradients: at length 200, 1,024 users per pass had made the first step's table peak at 5.8 GB of RSS
        self._teacher_chunk = config["train_batch_size"]

    def _neighbours(self, config, dataset):
        """``[n_users, k]`` internal ids of each user's similar users. ``llmesr_sim_user_source: text``: the cached
        cosine neighbours of the LLM vectors of the users' history texts (official). ``items``: the cosine
        neighbours of the mean LLM vector of the items of each user's teacher input (``user_seq``), which reads
        the whole (max_seq_length-capped) history where a text encoder truncates it."""
        k = config["llmesr_sim_user_num"]
        if config_choice(config, "llmesr_sim_user_source", ("text", "items")) == "text":
            return similar_users(dataset, config, k)
        if k > self.n_users - 2:
            raise RecBoleLLMError(f"llmesr_sim_user_num {k} needs at least {k + 1} users; the dataset has "
                                  f"{self.n_users - 1}.")
        items = self.llm_item_embedding(self.user_seq[1:])  # [PAD] user 0 is left out; padded rows are zeros
        profiles = items.sum(1) / (self.user_seq[1:] > 0).sum(1, keepdim=True).clamp(min=1)
        neighbours = torch.zeros(self.n_users, k, dtype=torch.long)
        neighbours[1:] = torch.from_numpy(top_similar(profiles.numpy(), k)).long() + 1
        return neighbours

    def _user_training_sequences(self, dataset):
        """``[n_users, L]`` and ``[n_users]``: each user's training sequence minus its last item, i.e. the input of
        the user's last training row (prefix mode) or its one row (all_positions mode)."""
        inter = dataset.inter_feat
        users = inter[self.USER_ID]
        last_row = torch.full((self.n_users,), -1, dtype=torch.long)
        last_row[users] = torch.arange(len(users))  # later rows overwrite: the last row per user remains
        seqs = torch.zeros(self.n_users, self.max_seq_length, dtype=torch.long)
        lengths = torch.ones(self.n_users, dtype=torch.long)  # a user without rows reads one [PAD]
        has_rows = last_row >= 0
        seqs[has_rows] = inter[self.ITEM_SEQ][last_row[has_rows]]
        lengths[has_rows] = inter[self.ITEM_SEQ_LEN][last_row[has_rows]].clamp(min=1)
        return seqs, lengths

    def train(self, mode=True):
        if self.teacher_mode == "epoch":
            self._teacher_table = None  # a new epoch starts with model.train(): the epoch table is rebuilt
        return super().train(mode)

    @torch.no_grad()
    def _encode_users(self, users):
        return torch.cat([self.forward(self.user_seq[part], self.user_seq_len[part])
                          for part in users.split(self._teacher_chunk)])

    def teacher(self, users):
        """``[B, D]``: the mean detached feature of each user's similar users."""
        similar = self.similar_users[users]  # [B, k]
        if self.teacher_mode == "batch":
            distinct, inverse = torch.unique(similar, return_inverse=True)
            return self._encode_users(distinct)[inverse].mean(1)
        if self._teacher_table is None:
            self._teacher_table = self._encode_users(torch.arange(self.n_users, device=users.device))
        return self._teacher_table[similar].mean(1)

    def _record_teacher_rows(self, interaction, features):
        """``running`` teacher: store the features of the batch rows whose input is the user's teacher input."""
        users = interaction[self.USER_ID]
        full = (interaction[self.ITEM_SEQ] == self.user_seq[users]).all(-1)
        self._teacher_table[users[full]] = features[full].detach()

    def extra_losses(self, interaction, users):
        losses = []
        if self.distill:
            target = self.teacher(interaction[self.USER_ID])
            align = F.mse_loss(users, target) if self.user_sim_func == "kd" else soft_contrastive_loss(users, target)
            losses.append(self.alpha * align)
            if self.teacher_mode == "running":
                self._record_teacher_rows(interaction, users)
        if self.item_reg:
            items = torch.unique(interaction[self.ITEM_SEQ])
            items = items[items > 0]
            losses.append(self.beta * soft_contrastive_loss(self.adapter(self.llm_item_embedding(items)),
                                                            self.item_embedding(items)))
        return tuple(losses)
