"""GRU4RecAP: RecBole's GRU4Rec with the loss at all positions, the GRU baseline of ``llm_train_mode: all_positions``."""
from recbole.model.sequential_recommender.gru4rec import GRU4Rec

from recbole_llm.model.all_positions import AllPositions


class GRU4RecAP(AllPositions, GRU4Rec):
    r"""RecBole's GRU4Rec network, unchanged, with the loss at every position of one sequence per user.

    Reference: Yong Kiam Tan et al. "Improved Recurrent Neural Networks for Session-based Recommendations." DLRS 2016
    (RecBole's GRU4Rec). A GRU reads only earlier items, so the output at position p may predict item p + 1 without
    a mask. Parameters, initialisation and scores are RecBole's GRU4Rec's (a GRU4Rec state dict loads as it is);
    the loss over positions is ``AllPositions``'s. It is the backbone row next to ``LLMESR_GRU4Rec`` in the
    all-positions protocol; with ``llm_train_mode: prefix`` it trains exactly as GRU4Rec.

    Config keys (RecBole's GRU4Rec.yaml, then properties/model/GRU4RecAP.yaml): GRU4Rec's ``embedding_size``,
    ``hidden_size``, ``num_layers``, ``dropout_prob``, ``loss_type``, ``llm_train_mode`` (``all_positions`` by
    default) and ``llm_logit_adjustment`` (0, off: the stock CE).
    """

    def encode(self, item_seq):
        """The projected GRU output at every position, [B L E]: GRU4Rec's forward before its gather."""
        return self.dense(self.gru_layers(self.emb_dropout(self.item_embedding(item_seq)))[0])
