"""HLLM: a hierarchical item LLM + user LLM recommender with a generative InfoNCE objective.

Chen et al., 2024, "HLLM: Enhancing Sequential Recommendations via Hierarchical Large Language Models for Item and
User Modeling" (arXiv 2409.12740); official code bytedance/HLLM.
"""
import math

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_llm.data.dataset import target_list_field
from recbole_llm.model.hllm_layers import (HEADS, ItemAdapter, ItemLLM, LateFusionHead, choice, clamp_logit_scale,
                                           cosines, frozen_item_table, gather_negatives, item_adapter_size,
                                           item_micro_batch, item_text_choice, item_whiten, loss_choice, nce_loss,
                                           softmax_loss, uniform_items, user_dropout, user_llm)
from recbole_llm.model.layers import per_row_user_vectors, sample_negatives, whitened
from recbole_llm.text import item_vectors as side_data_item_vectors
from recbole_llm.trainer.llm_trainer import autocast, compute_dtype
from recbole_llm.utils import RecBoleLLMError


class HLLM(SequentialRecommender):
    r"""HLLM over RecBole's sequential data.

    - **Item LLM** (``hllm_layers.ItemLLM``): an item's text is ``hllm_item_prompt`` then ``<field>: <value>`` for
      each non-empty field of ``hllm_text_fields`` (no separator, as the official code), tokenised and cut to
      ``hllm_max_text_length`` tokens; a learnable [ITEM] vector follows, and the item vector is the last layer's
      state there (or the mean over the tokens). Positions are right-aligned (every [ITEM] sits at position
      ``hllm_max_text_length``) through left padding to one width; items are encoded independently in padded,
      masked batches instead of the official packed flash-attention stream (the same outputs, up to padding). In
      training the step's distinct items go through it ``hllm_item_micro_batch`` at a time (the same vectors and
      gradients as one pass; it bounds one forward's working memory, not the activations kept for backward).
    - **User LLM**: a causal transformer fed the item vectors as ``inputs_embeds`` with a padding mask; its output
      at each position predicts the next item. Deviation: when its width differs from the item LLM's, a linear map
      takes item vectors in and another takes outputs back (the official code requires equal widths).
    - **Loss**: InfoNCE on cosines with a learnable logit scale (init ln(1/0.07), clamped to at most ln 100), the
      negatives ``hllm_num_negatives`` uniform item ids per step shared by every position of the batch and
      gathered across DDP ranks, negatives with cosine > ``hllm_nce_thres`` to the positive masked; the mean over
      all valid positions (``hllm_loss: nce``, official; ``auto``'s choice end to end). Deviation,
      ``hllm_loss: softmax`` (``auto``'s choice over a frozen table, the default): cross-entropy over the cosines
      with ALL items times the same logit scale, [PAD] masked to -inf (the full softmax of SASRecAP's CE baseline,
      on cosines); frozen mode only, as end to end it would run every item through the item LLM at every step (an
      error says so). With ``llm_train_mode: all_positions`` (the default) a training sample is a user's
      last MAX_ITEM_LIST_LENGTH + 1 training items with a target at every position; the official code also trains
      the earlier non-overlapping windows of long histories (its ``data_split``), which this mode drops.
    - **Modes**: end to end (both LLMs train), or ``hllm_freeze_item_llm``: every item vector is computed once at
      build time and kept as a buffer; the item LLM is then dropped and only the user LLM (and the item adapter
      below) trains (the paper's item caching). End to end, all items are embedded once per evaluation, in batches
      under ``no_grad``, and kept until any item-LLM weight changes; ``full_sort_predict`` is one product of
      cosines.
    - **Frozen item vectors** (``hllm_item_text``). ``prompt`` (faithful; the only choice end to end): the item LLM
      over the official text above, cached under a fingerprint of its weights and token table. Deviation,
      ``side_data`` (``auto``'s choice when the frozen item LLM is the side-data encoder ``llm_encoder``, e.g. the
      bundled MiniLM): the side-data cache's vectors that LLM-ESR uses, i.e. the dataset template's plain text
      (``llm_text_template``) encoded the standard way (left-aligned, ``llm_pooling``), remapped to internal ids.
      Why: a frozen sentence encoder was never trained on the prompt and 'field: value' labels, which make every
      item alike (mean pairwise cosine 0.83 over 300 ml-100k items, 0.31 for plain titles), and right-aligned
      positions move MiniLM's output (cosine 0.93 to its standard encoding); the prompt path's keys
      (``hllm_item_prompt``, ``hllm_text_fields``, ``hllm_max_text_length``, ``hllm_item_pooling``) do not apply.
    - ``hllm_item_trainable_layers`` N (a deviation, end to end only; ~, the default, trains every layer as the
      official code): the item LLM's layers below the top N run once over every item at build time and their
      states are kept (``hllm_layers.ItemLLM``), so a step runs and trains only N layers: end to end at the cost
      of N layers per item, where the lower ones stay pretrained (and, below the top, the text does not attend
      to [ITEM]). Effect on ml-100k (seed 42, 12 epochs): the top 2 of MiniLM's 6 layers reach Recall@10 0.1103
      against 0.1209 for 2 layers trained whole, at about the same step cost; so it stays off.
    - ``hllm_head: late_fusion`` (paper-derived, NOT in the official code, whose authors did not release it): a
      learnable [USER] vector follows each sequence's last item; the user LLM's output there and an item vector go
      through an MLP to one logit. Loss: BCE on the next item (label 1) and one uniform negative per user (label
      0), plus ``hllm_gen_weight`` times the generative loss above; scores are the MLP's logits. Early fusion (one
      user-LLM pass per candidate) is not implemented.
    - ``hllm_item_adapter`` (a deviation, frozen mode only; ``auto``, the default, is width 1536 when frozen and
      none end to end; 0, none, is the paper's item caching): a trainable residual MLP over each frozen item
      vector (``hllm_layers.ItemAdapter``, its output layer zero at the start), whose output is the item vector
      everywhere: the user LLM's input, the targets, the negatives and the ranking. It lets a frozen table move
      the way end-to-end training moves the item LLM's top, at the cost of an MLP over the step's distinct items.
      Effect, with ``hllm_num_negatives: 2048`` (also the default; the CPU default used to draw 512): Recall@10
      on ml-1m-half 0.2247 +- 0.0026 against 0.1738 +- 0.0052 without it (+29%, seeds 42-44, higher at each).
    - ``hllm_item_whiten`` (a deviation, frozen mode only; ``auto``, the default, is on when frozen and off end to
      end): the frozen table is PCA-whitened (``layers.whitened``: centred, unit variance along every principal
      axis) before the adapter and the cosines. Sentence vectors share a few dominant directions, so their cosines
      are high for any two items; whitening spreads them before training starts. Effect on ml-1m-half (over the
      adapter, seeds 42-44): Recall@10 0.2637 +- 0.0051 against 0.2247 +- 0.0026 (+17%, higher at each seed).
    - ``hllm_user_dropout`` (a deviation; ``auto``, the default, is 0.2 over a frozen table and 0 end to end, as
      the official model has none): dropout on the item vectors entering the user LLM and on its attention
      weights, as SASRec drops its input and attention. Without it the small user LLM overfits a frozen table and
      early stopping ends the run while the cosine schedule's learning rate is still high. Effect on ml-1m-half
      (the full softmax, whitened items, the 30-epoch cap, seeds 42-44): Recall@10 0.2951 +- 0.0012, above
      SASRecAP's 0.2842 +- 0.0036 at every seed; the softmax without dropout 0.2854 (seed 42), with InfoNCE and no
      dropout 0.2637 +- 0.0051 (cap 100).

    Config keys (properties/model/HLLM.yaml): ``hllm_item_llm``, ``hllm_item_llm_pretrained``,
    ``hllm_item_num_layers``, ``hllm_item_prompt``, ``hllm_text_fields``, ``hllm_max_text_length``,
    ``hllm_item_pooling``, ``hllm_freeze_item_llm``, ``hllm_item_text``, ``hllm_item_batch_size``,
    ``hllm_item_micro_batch``, ``hllm_item_trainable_layers``, ``hllm_item_adapter``, ``hllm_item_whiten``, ``hllm_user_llm``,
    ``hllm_user_llm_pretrained``, ``hllm_user_num_layers``, ``hllm_user_hidden_size``, ``hllm_user_num_heads``,
    ``hllm_user_inner_size``, ``hllm_user_dropout``, ``hllm_loss``, ``hllm_num_negatives``, ``hllm_nce_thres``, ``hllm_head``,
    ``hllm_gen_weight``, ``hllm_head_hidden_size``; and ``llm_train_mode``.
    """

    llm_train_modes = ("prefix", "all_positions")
    input_type = InputType.POINTWISE  # the loss draws its own negatives
    skip_flops = True  # RecBole's FLOPs probe would deep-copy both LLMs

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.all_positions = config["llm_train_mode"] == "all_positions"
        self.target_list = target_list_field(config)
        if self.all_positions and self.target_list not in dataset.field2type:
            raise RecBoleLLMError(f"HLLM with llm_train_mode 'all_positions' needs the field '{self.target_list}'; "
                                  f"build the dataset with recbole_llm.utils.create_dataset.")
        self.frozen = config["hllm_freeze_item_llm"]
        self.item_text = item_text_choice(config)
        self.softmax = loss_choice(config) == "softmax"
        self.item_micro_batch = item_micro_batch(config)
        self.dtype = compute_dtype(config)
        self.nce_thres = config["hllm_nce_thres"]
        self.num_negatives = config["hllm_num_negatives"] or (self.max_seq_length + 1) * config["train_batch_size"]
        adapter_size = item_adapter_size(config)
        self.whiten = item_whiten(config)
        if self.frozen:
            self.register_buffer("item_table", self._frozen_table(config, dataset))
            item_dim = self.item_table.size(1)
        else:
            self.item_llm = ItemLLM(config, dataset)
            item_dim = self.item_llm.dim
        self.item_adapter = ItemAdapter(item_dim, adapter_size) if adapter_size else None  # 0 end to end
        self.user_llm = user_llm(config, item_dim)
        user_dim = self.user_llm.config.hidden_size
        self.item_to_user = nn.Linear(item_dim, user_dim) if user_dim != item_dim else nn.Identity()
        self.user_input_dropout = nn.Dropout(user_dropout(config))
        self.user_to_item = nn.Linear(user_dim, item_dim) if user_dim != item_dim else nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.late_fusion = choice(config, "hllm_head", HEADS) == "late_fusion"
        if self.late_fusion:
            self.user_token = nn.Parameter(torch.randn(user_dim) * 0.02)
            self.fusion = LateFusionHead(user_dim, item_dim, config["hllm_head_hidden_size"])
            self.gen_weight = config["hllm_gen_weight"]
        self._eval_items, self._eval_items_key = None, None

    # --- item vectors -------------------------------------------------------------------------------------------
    def llm_modules(self):
        """Both LLMs (the user LLM only when the item table is frozen), for ``llm_gradient_checkpointing`` and ``llm_sharding``."""
        return [self.user_llm] + ([] if self.frozen else [self.item_llm.llm])

    def _frozen_table(self, config, dataset):
        """``[n_items, D]`` by internal id: the side-data cache's vectors (``side_data``), or the item LLM's over the
        prompt texts, cached under its fingerprint (``prompt``); PCA-whitened with ``hllm_item_whiten``."""
        table = (side_data_item_vectors(dataset, config) if self.item_text == "side_data"
                 else frozen_item_table(ItemLLM(config, dataset).to(config["device"]), config))
        return whitened(table) if self.whiten else table

    def item_vectors(self, items):
        """``[*items.shape, D]``: the vectors of ``items``, through the item LLM once per distinct id,
        ``hllm_item_micro_batch`` items per pass."""
        if self.frozen and self.item_adapter is None:
            return self.item_table[items]
        distinct, inverse = torch.unique(items, return_inverse=True)
        if self.frozen:
            return self.item_adapter(self.item_table[distinct])[inverse]
        return self.item_llm.encode(distinct, self.item_micro_batch)[inverse]

    def all_item_vectors(self):
        """``[n_items, D]``: every item's vector. The frozen table as it is; through the item adapter with
        gradients in training; otherwise computed under ``no_grad`` (the item LLM's, or the adapter's outside
        training) and kept until one of that encoder's weights changes, so that an evaluation batch, which reads
        the table for its histories and again for its scores, runs the encoder once per weight state."""
        if self.frozen and self.item_adapter is None:
            return self.item_table
        if self.frozen and self.training:
            return self.item_adapter(self.item_table)
        encoder = self.item_adapter if self.frozen else self.item_llm
        # every weight's storage and in-place version counter, which an optimizer step or a load_state_dict bumps
        state = tuple((p.data_ptr(), p._version) for p in encoder.parameters())
        if self._eval_items is None or self._eval_items_key != state:
            with torch.no_grad():
                vectors = self.item_adapter(self.item_table) if self.frozen else self.item_llm.encode_all()
            self._eval_items, self._eval_items_key = vectors, state
        return self._eval_items

    # --- user side ----------------------------------------------------------------------------------------------
    def user_states(self, item_seq, item_vectors):
        """``[B, L, user width]``: the user LLM's last-layer states over the left-aligned ``item_seq`` given its
        item vectors ``[B, L, D]``; with the late-fusion head ``[B, L + 1, .]``, the learnable [USER] vector put
        right after each sequence's last item (causal attention keeps the item positions' states unchanged)."""
        inputs, mask = self.user_input_dropout(self.item_to_user(item_vectors)), item_seq > 0
        if self.late_fusion:
            slot = F.one_hot(mask.sum(1), item_seq.size(1) + 1).bool()  # the first position after the items
            inputs = torch.where(slot[..., None], self.user_token, F.pad(inputs, (0, 0, 0, 1)))
            mask = F.pad(mask, (0, 1)) | slot
        with autocast(self.dtype, item_seq.device):
            hidden = self.user_llm(inputs_embeds=inputs, attention_mask=mask.long()).last_hidden_state
        return hidden.float()

    def forward(self, item_seq, item_seq_len):
        """``[B, .]``: the user vector: the output at the [USER] vector (late fusion), else the generative output
        at each sequence's last item."""
        states = self.user_states(item_seq, self.all_item_vectors()[item_seq])
        if self.late_fusion:
            return states[torch.arange(len(states), device=states.device), item_seq_len]
        return self.gather_indexes(self.user_to_item(states), item_seq_len - 1)

    # --- training -----------------------------------------------------------------------------------------------
    def calculate_loss(self, interaction):
        item_seq, lengths, last_target = (interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN],
                                          interaction[self.POS_ITEM_ID])
        count = 0 if self.softmax else self._local_negatives()  # the softmax scores every item instead
        negatives = uniform_items(count, self.n_items, item_seq.device)
        valid = interaction[self.target_list] > 0 if self.all_positions else None
        positives = interaction[self.target_list][valid] if self.all_positions else last_target
        fusion_negatives = sample_negatives(last_target, self.n_items) if self.late_fusion else last_target[:0]
        groups = [item_seq.flatten(), positives, negatives, last_target, fusion_negatives]
        items = torch.cat(groups)
        table = self.all_item_vectors() if self.softmax else None  # the softmax scores every item: one pass for all
        vectors = (self.item_vectors(items) if table is None else table[items]).split([len(g) for g in groups])
        states = self.user_states(item_seq, vectors[0].view(*item_seq.shape, -1))
        outputs = self.user_to_item(states[:, : item_seq.size(1)])
        outputs = outputs[valid] if self.all_positions else self.gather_indexes(outputs, lengths - 1)
        loss = self.generative_loss(outputs, positives, vectors[1], vectors[2], table)
        if not self.late_fusion:
            return loss
        users = states[torch.arange(len(states), device=states.device), lengths]
        return self.fusion_loss(users, vectors[3], vectors[4]) + self.gen_weight * loss

    def generative_loss(self, outputs, positives, positive_vectors, negative_vectors, table):
        """``hllm_loss`` at the output rows: the softmax over every item of ``table`` (``[n_items, D]``, the
        softmax's only input besides the targets), or InfoNCE against the negatives of all ranks."""
        clamp_logit_scale(self.logit_scale)
        if self.softmax:
            return softmax_loss(outputs, positives, table, self.logit_scale)
        return nce_loss(outputs, positive_vectors, gather_negatives(negative_vectors), self.logit_scale,
                        self.nce_thres)

    def fusion_loss(self, users, positives, negatives):
        """The late-fusion head's BCE: each user's next item has label 1, its sampled negative label 0."""
        logits = torch.cat([self.fusion(users, positives), self.fusion(users, negatives)])
        labels = torch.cat([torch.ones(len(users)), torch.zeros(len(users))]).to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, labels)

    def _local_negatives(self):
        """This rank's share of ``hllm_num_negatives``: the gathered total is about that many."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return math.ceil(self.num_negatives / world)

    # --- scoring ------------------------------------------------------------------------------------------------
    def predict(self, interaction):
        users = per_row_user_vectors(self.forward, interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        items = self.all_item_vectors()[interaction[self.ITEM_ID]]
        return self.fusion(users, items) if self.late_fusion else F.cosine_similarity(users, items, dim=-1)

    def full_sort_predict(self, interaction):
        users = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        if self.late_fusion:
            return self.fusion.score_all(users, self.all_item_vectors())
        return cosines(users, self.all_item_vectors())
