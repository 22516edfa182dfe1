"""``AllPositions``: a stock RecBole sequential model trained with the loss at every position of one sequence per
user (``llm_train_mode: all_positions``), the backbone rows SASRecAP, GRU4RecAP and BERT4RecAP."""
from recbole_llm.data.dataset import target_list_field
from recbole_llm.model.layers import logit_prior, per_row_user_vectors, sample_negatives, with_prior
from recbole_llm.utils import RecBoleLLMError


class AllPositions:
    """A stock RecBole sequential model with the loss at every position of one sequence per user.

    The backbone's parameters, initialisation and scores are untouched: ``forward`` is the backbone's, the
    per-position ``encode(item_seq) -> [B, L, H]`` hook read at the last item, so a stock state dict loads as it is.
    Only ``calculate_loss`` changes, and only with ``llm_train_mode: all_positions``:

    - the encoder runs once over the user's sequence, and position p is scored against the next item
      (``item_id_target_list``); padding positions (target 0) are left out. A backbone that is not causal replaces
      ``supervised_states`` (BERT4RecAP: the masked positions of the user's cloze rows) and adds ``item_bias``;
    - ``loss_type: CE``: cross-entropy over all items, the mean over the batch's non-padding positions; with
      ``llm_logit_adjustment`` tau > 0 its training logits get tau * log(the item's share of the training targets)
      (``layers.logit_prior``; a deviation from the stock models, off by default);
    - ``loss_type: BPR``: one negative per position, drawn here with torch's RNG uniformly from the items other
      than padding and that position's target (RecBole's sampler also skips the target). The loader draws one
      item per row only, for the last position, so its negatives (``train_neg_sample_args``) are not used; with a
      ``sample_num`` above 1 it repeats each row, which then counts as that many negatives per position.

    With ``llm_train_mode: prefix`` it trains exactly as the backbone.
    """

    llm_train_modes = ("prefix", "all_positions")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.all_positions = config["llm_train_mode"] == "all_positions"
        self.ITEM_TARGET_SEQ = target_list_field(config)
        if self.all_positions and self.ITEM_TARGET_SEQ not in dataset.field2type:
            raise RecBoleLLMError(
                f"{type(self).__name__} with llm_train_mode 'all_positions' needs the field "
                f"'{self.ITEM_TARGET_SEQ}'; build the dataset with recbole_llm.utils.create_dataset."
            )
        if config["llm_logit_adjustment"] and not self.all_positions:
            raise RecBoleLLMError(f"llm_logit_adjustment needs llm_train_mode 'all_positions': in 'prefix' mode "
                                  f"{type(self).__name__} trains exactly as the stock model.")
        prior = logit_prior(config, dataset, self.loss_type, self.ITEM_TARGET_SEQ) if self.all_positions else None
        self.register_buffer("logit_prior", prior, persistent=False)  # rebuilt from the data: state dicts unchanged

    def forward(self, item_seq, item_seq_len):
        """The backbone's forward: the output at each sequence's last item, [B H]."""
        return self.gather_indexes(self.encode(item_seq), item_seq_len - 1)

    def user_vectors(self, item_seq, item_seq_len):
        """``[B, H]``: the state the backbone scores candidates with (BERT4RecAP: at the appended [MASK])."""
        return self.forward(item_seq, item_seq_len)

    def predict(self, interaction):
        """The backbone's candidate scores, each distinct history encoded once (``per_row_user_vectors``)."""
        users = per_row_user_vectors(self.user_vectors, interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        items = interaction[self.ITEM_ID]
        return (users * self.item_embedding(items)).sum(-1) + self.item_bias(items)

    def supervised_states(self, interaction):
        """``(states [N, H], targets [N])``: the output at each non-padding position and the next item there."""
        targets = interaction[self.ITEM_TARGET_SEQ]
        supervised = targets > 0  # padding positions have no target
        return self.encode(interaction[self.ITEM_SEQ])[supervised], targets[supervised]

    def item_bias(self, items):
        """A per-item score offset (BERT4Rec's output bias); none for the other backbones."""
        return 0.0

    def calculate_loss(self, interaction):
        if not self.all_positions:
            return super().calculate_loss(interaction)
        states, positives = self.supervised_states(interaction)
        items = self.item_embedding.weight[: self.n_items]  # BERT4Rec's table also holds the [MASK] row
        if self.loss_type == "BPR":
            negatives = sample_negatives(positives, self.n_items)
            pos_score = (states * items[positives]).sum(-1) + self.item_bias(positives)
            neg_score = (states * items[negatives]).sum(-1) + self.item_bias(negatives)
            return self.loss_fct(pos_score, neg_score)
        return self.loss_fct(with_prior(states @ items.T + self.item_bias(slice(None)), self.logit_prior), positives)
