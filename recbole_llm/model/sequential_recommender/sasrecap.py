"""SASRecAP: RecBole's SASRec with the loss at all positions, the baseline of ``llm_train_mode: all_positions``."""
import torch
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_llm.model.all_positions import AllPositions


class SASRecAP(AllPositions, SASRec):
    r"""RecBole's SASRec network, unchanged, with the loss at every position of one sequence per user.

    The official SASRec code (and LLM-ESR's, HLLM's) trains this way; RecBole trains one sample per prefix
    (DESIGN.md §6). Parameters, initialisation, the causal attention mask and the output at the last item are
    RecBole's SASRec's, so a SASRec state dict loads as it is, and ``predict``/``full_sort_predict`` give SASRec's
    scores. The loss over positions is ``AllPositions``'s; with ``llm_train_mode: prefix`` it trains exactly as
    SASRec.

    Config keys (RecBole's SASRec.yaml, then properties/model/SASRecAP.yaml): SASRec's ``n_layers``, ``n_heads``,
    ``hidden_size``, ``inner_size``, ``hidden_dropout_prob``, ``attn_dropout_prob``, ``hidden_act``,
    ``layer_norm_eps``, ``initializer_range``, ``loss_type``, ``llm_train_mode`` (``all_positions`` by default) and
    ``llm_logit_adjustment`` (0, off: the stock CE).
    """

    def encode(self, item_seq):
        """The last transformer layer's output at every position, [B L H]: SASRec's forward before its gather."""
        position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
        position_embedding = self.position_embedding(position_ids.unsqueeze(0).expand_as(item_seq))
        input_emb = self.dropout(self.LayerNorm(self.item_embedding(item_seq) + position_embedding))
        attention_mask = self.get_attention_mask(item_seq)  # causal, and padded keys masked
        return self.trm_encoder(input_emb, attention_mask, output_all_encoded_layers=True)[-1]
