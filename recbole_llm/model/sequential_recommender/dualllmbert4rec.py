"""DualLLMBert4Rec: LLM-ESR's dual-view model over RecBole's BERT4Rec.

Reference: Qidong Liu et al. "LLM-ESR: Large Language Models Enhancement for Long-tailed Sequential
Recommendation." NeurIPS 2024. Official code: github.com/liuqidong07/LLM-ESR (models/DualLLMSRS.py).

Config keys (properties/model/DualLLM.yaml, on top of RecBole's BERT4Rec.yaml): ``llmesr_adapter_layers``,
``llmesr_cross_attention``, ``llmesr_cross_attention_heads``, ``llmesr_id_init``, ``llmesr_use_id_view``,
``llmesr_use_llm_view``, the switches beyond the paper (``llmesr_cross_residual``, ``llmesr_cross_norm``,
``llmesr_init``, ``llmesr_llm_score_weight``, ``llmesr_id_view_dropout``, ``llmesr_llm_whiten``,
``llmesr_adapter_activation``, ``llmesr_input_scale``) and
``llmesr_setting`` (``faithful`` sets them as the paper does), ``llmesr_activation_checkpointing`` (memory only),
``loss_type`` (CE, BPR or BCE), ``llm_logit_adjustment`` (CE only; 0, off), and the side-data keys ``llm_*``.

Both tables keep a row for the [MASK] token (id ``n_items``): the ID table's is learnt, the LLM table's is zeros,
as in the official code. ``llm_train_mode: all_positions`` (the default) trains as the official code: each user's
training window gives two rows, one with random masks (``mask_ratio``) and one with only its last item masked
(``layers.cloze_rows``), and the loss is taken at the masked positions; the user vector that self-distillation
aligns is the last-masked row's output. ``prefix`` trains on RecBole's masked prefixes (``transform:
mask_itemseq``). ``mask_ratio`` is BERT4Rec's 0.2, its paper's value for MovieLens (LLM-ESR's scripts use 0.6 on
their sparser datasets), and masking uses [MASK] only, as RecBole does.
"""
from recbole.model.sequential_recommender import BERT4Rec

from recbole_llm.model.llmesr import DualLLM, TransformerViews
from recbole_llm.model.layers import append_item, cloze_rows


class DualLLMBert4Rec(TransformerViews, DualLLM, BERT4Rec):
    """Dual-view (ID + LLM) BERT4Rec with an optional cross-view attention (see the module docstring)."""

    causal = False

    def _encode(self, view, item_seq):
        mask = self.get_attention_mask(item_seq, bidirectional=True)
        hidden = self.trm_encoder(view, mask, output_all_encoded_layers=True)[-1]
        return self.output_ln(self.output_gelu(self.output_ffn(hidden)))

    def forward(self, item_seq, item_seq_len):
        # BERT4Rec's test layout: [MASK] appended after the last item, the first item dropped; read at the [MASK].
        return super().forward(append_item(item_seq, item_seq_len, self.mask_token), item_seq_len)

    def item_bias(self, items):
        return self.output_bias[items]

    def _rec_outputs_and_targets(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        if self.train_mode == "all_positions":
            inputs, targets = cloze_rows(item_seq, item_seq_len, interaction[self.POS_ITEM_ID], self.mask_token,
                                         self.mask_ratio)
            features = self.sequence_features(inputs)
            # The last-masked rows are forward()'s input for the user: their output at the [MASK] is the user vector.
            users = self.gather_indexes(features[len(item_seq):], item_seq_len - 1)
            masked = targets > 0
            return features[masked], targets[masked], users
        masked_index = interaction[self.MASK_INDEX]  # [B, M]: positions of the masked items, 0 = unused slot
        features = self.sequence_features(interaction[self.MASK_ITEM_SEQ])
        outputs = features.gather(1, masked_index.unsqueeze(-1).expand(-1, -1, features.size(-1)))
        targets = interaction[self.POS_ITEMS]
        valid = targets > 0
        return outputs[valid], targets[valid], self.forward(item_seq, item_seq_len)
