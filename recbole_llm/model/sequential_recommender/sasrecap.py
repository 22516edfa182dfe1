"""SASRecAP: RecBole's SASRec with the loss at all positions, the baseline of ``llm_train_mode: all_positions``."""
import torch
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_llm.data.dataset import target_list_field
from recbole_llm.model.layers import sample_negatives
from recbole_llm.utils import RecBoleLLMError


class SASRecAP(SASRec):
    r"""RecBole's SASRec network, unchanged, with the loss at every position of one sequence per user.

    The official SASRec code (and LLM-ESR's, HLLM's) trains this way; RecBole trains one sample per prefix
    (DESIGN.md §6). Parameters, initialisation, the causal attention mask and the output at the last item are
    RecBole's SASRec's, so a SASRec state dict loads as it is, and ``predict``/``full_sort_predict`` give SASRec's
    scores. Only ``calculate_loss`` changes, and only with ``llm_train_mode: all_positions``:

    - the encoder runs once over the user's sequence, and position p is scored against the next item
      (``item_id_target_list``); padding positions (target 0) are left out;
    - ``loss_type: CE``: cross-entropy over all items, the mean over the batch's non-padding positions;
    - ``loss_type: BPR``: one negative per position, drawn here with torch's RNG uniformly from the items other
      than padding and that position's target (RecBole's sampler also skips the target). The loader draws one
      item per row only, for the last position, so its negatives (``train_neg_sample_args``) are not used; with a
      ``sample_num`` above 1 it repeats each row, which then counts as that many negatives per position.

    With ``llm_train_mode: prefix`` it trains exactly as SASRec.

    Config keys (RecBole's SASRec.yaml, then properties/model/SASRecAP.yaml): SASRec's ``n_layers``, ``n_heads``, ``hidden_size``,
    ``inner_size``, ``hidden_dropout_prob``, ``attn_dropout_prob``, ``hidden_act``, ``layer_norm_eps``,
    ``initializer_range``, ``loss_type``, and ``llm_train_mode`` (``all_positions`` by default here).
    """

    llm_train_modes = ("prefix", "all_positions")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.all_positions = config["llm_train_mode"] == "all_positions"
        self.ITEM_TARGET_SEQ = target_list_field(config)
        if self.all_positions and self.ITEM_TARGET_SEQ not in dataset.field2type:
            raise RecBoleLLMError(
                f"SASRecAP with llm_train_mode 'all_positions' needs the field '{self.ITEM_TARGET_SEQ}'; "
                f"build the dataset with recbole_llm.utils.create_dataset."
            )

    def encode(self, item_seq):
        """The last transformer layer's output at every position, [B L H]: SASRec's forward before its gather."""
        position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
        position_embedding = self.position_embedding(position_ids.unsqueeze(0).expand_as(item_seq))
        input_emb = self.dropout(self.LayerNorm(self.item_embedding(item_seq) + position_embedding))
        attention_mask = self.get_attention_mask(item_seq)  # causal, and padded keys masked
        return self.trm_encoder(input_emb, attention_mask, output_all_encoded_layers=True)[-1]

    def forward(self, item_seq, item_seq_len):
        """SASRec's forward: the output at each sequence's last item, [B H]."""
        return self.gather_indexes(self.encode(item_seq), item_seq_len - 1)

    def calculate_loss(self, interaction):
        if not self.all_positions:
            return super().calculate_loss(interaction)
        targets = interaction[self.ITEM_TARGET_SEQ]
        supervised = targets > 0  # padding positions have no target
        states = self.encode(interaction[self.ITEM_SEQ])[supervised]  # [N H], N = non-padding positions
        positives = targets[supervised]
        if self.loss_type == "BPR":
            negatives = sample_negatives(positives, self.n_items)
            pos_score = (states * self.item_embedding(positives)).sum(-1)
            neg_score = (states * self.item_embedding(negatives)).sum(-1)
            return self.loss_fct(pos_score, neg_score)
        logits = states @ self.item_embedding.weight.T
        return self.loss_fct(logits, positives)
