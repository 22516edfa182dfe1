"""DualLLMSASRec: LLM-ESR's dual-view model over RecBole's SASRec.

Reference: Qidong Liu et al. "LLM-ESR: Large Language Models Enhancement for Long-tailed Sequential
Recommendation." NeurIPS 2024. Official code: github.com/liuqidong07/LLM-ESR (models/DualLLMSRS.py).

Config keys (properties/model/DualLLM.yaml, on top of RecBole's SASRec.yaml): ``llmesr_adapter_layers``,
``llmesr_cross_attention``, ``llmesr_cross_attention_heads``, ``llmesr_id_init``, ``llmesr_use_id_view``,
``llmesr_use_llm_view``, the switches beyond the paper (``llmesr_cross_residual``, ``llmesr_cross_norm``,
``llmesr_init``, ``llmesr_llm_score_weight``, ``llmesr_id_view_dropout``, ``llmesr_llm_whiten``,
``llmesr_adapter_activation``, ``llmesr_input_scale``) and
``llmesr_setting`` (``faithful`` sets them as the paper does), ``llmesr_activation_checkpointing`` (memory only),
``loss_type`` (CE, BPR or BCE), ``llm_logit_adjustment`` (CE only; 0, off), ``llm_train_mode``, and the side-data
keys ``llm_*``.

Deviations from the official code, kept so that the stock SASRec and this model differ only by LLM-ESR:
- the backbone is RecBole's SASRec: causal attention with a padding mask and post-LayerNorm blocks, where the
  official backbone attends both ways (the author's choice) with pre-LayerNorm blocks;
- each view is scaled by sqrt(hidden_size) and gets the shared position embedding as in the official code, then
  RecBole's input LayerNorm and dropout;
- the LLM vectors are 384-d all-MiniLM-L6-v2 sentence vectors by default, not 1536-d ada-002 ones.
"""
from recbole.model.sequential_recommender import SASRec

from recbole_llm.model.llmesr import DualLLM, TransformerViews


class DualLLMSASRec(TransformerViews, DualLLM, SASRec):
    """Dual-view (ID + LLM) SASRec with an optional cross-view attention (see the module docstring)."""

    def _encode(self, view, item_seq):
        return self.trm_encoder(view, self.get_attention_mask(item_seq), output_all_encoded_layers=True)[-1]
