"""DualLLMGRU4Rec: LLM-ESR's dual-view model over RecBole's GRU4Rec.

Reference: Qidong Liu et al. "LLM-ESR: Large Language Models Enhancement for Long-tailed Sequential
Recommendation." NeurIPS 2024. Official code: github.com/liuqidong07/LLM-ESR (models/DualLLMSRS.py).

Config keys (properties/model/DualLLM.yaml, on top of RecBole's GRU4Rec.yaml): ``llmesr_adapter_layers``,
``llmesr_cross_attention``, ``llmesr_cross_attention_heads``, ``llmesr_id_init``, ``llmesr_use_id_view``,
``llmesr_use_llm_view``, the switches beyond the paper (``llmesr_cross_residual``, ``llmesr_cross_norm``,
``llmesr_init``, ``llmesr_llm_score_weight``, ``llmesr_id_view_dropout``, ``llmesr_llm_whiten``,
``llmesr_adapter_activation``) and ``llmesr_setting`` (``faithful`` sets
them as the paper does), ``llmesr_activation_checkpointing`` (memory only), ``loss_type`` (CE, BPR or BCE),
``llm_logit_adjustment`` (CE only; 0, off), ``llm_train_mode``, and the side-data keys ``llm_*``.

As in the official code the views get no position embedding and no scaling; RecBole's GRU4Rec keeps its embedding
dropout and its output projection (``dense``), and the view width is its ``embedding_size``. The official GRU4Rec
trains on the last position only; ``llm_train_mode: all_positions`` puts the loss at every position (a GRU is causal).
"""
from recbole.model.sequential_recommender import GRU4Rec

from recbole_llm.model.llmesr import DualLLM


class DualLLMGRU4Rec(DualLLM, GRU4Rec):
    """Dual-view (ID + LLM) GRU4Rec with an optional cross-view attention (see the module docstring)."""

    def _view_input(self, item_emb, item_seq):
        return self.emb_dropout(item_emb)

    def _encode(self, view, item_seq):
        return self.dense(self.gru_layers(view)[0])
