"""BERT4RecAP: RecBole's BERT4Rec trained on one sequence per user, the BERT4Rec baseline of
``llm_train_mode: all_positions``."""
from recbole.model.loss import BPRLoss
from recbole.model.sequential_recommender.bert4rec import BERT4Rec
from torch import nn

from recbole_llm.model.all_positions import AllPositions
from recbole_llm.model.layers import append_item, cloze_rows


class BERT4RecAP(AllPositions, BERT4Rec):
    r"""RecBole's BERT4Rec network, unchanged, with the masked-item loss on one training sequence per user.

    Reference: Fei Sun et al. "BERT4Rec: Sequential Recommendation with Bidirectional Encoder Representations from
    Transformer." CIKM 2019 (RecBole's BERT4Rec). The BERT4Rec and LLM-ESR official codes train on each user's
    sequence with random masks; RecBole masks every prefix of it (DESIGN.md §6), about 160 samples per user on
    ml-1m. With ``llm_train_mode: all_positions`` each user gives two rows per epoch (``layers.cloze_rows``, as
    LLM-ESR's official BERT4Rec dataset): its window with each item masked with probability ``mask_ratio``, and
    the same window with only its last item masked, the layout BERT4Rec predicts from at test time. A bidirectional
    encoder sees its neighbours, so the loss is taken at the masked positions only.

    Parameters, initialisation and scores are RecBole's BERT4Rec's (a BERT4Rec state dict loads as it is); the CE
    and BPR losses are ``AllPositions``'s over the masked positions, with BERT4Rec's output bias. It is the backbone
    row next to ``LLMESR_Bert4Rec`` in the all-positions protocol; with ``llm_train_mode: prefix`` it trains
    exactly as BERT4Rec. Masking uses [MASK] only, as RecBole and the BERT4Rec code do; LLM-ESR's code also swaps
    10% of the picks for a random item and keeps 10%.

    Config keys (RecBole's BERT4Rec.yaml, then properties/model/BERT4RecAP.yaml): BERT4Rec's ``n_layers``,
    ``n_heads``, ``hidden_size``, ``inner_size``, ``hidden_dropout_prob``, ``attn_dropout_prob``, ``hidden_act``,
    ``layer_norm_eps``, ``initializer_range``, ``mask_ratio`` (0.2, BERT4Rec's value for MovieLens), ``loss_type``,
    ``llm_train_mode`` (``all_positions`` by default) and ``llm_logit_adjustment`` (0, off: the stock CE; its prior
    counts the windows' next-item targets, the items its cloze rows mask but for each window's first).
    """

    forward = BERT4Rec.forward  # the per-position output [B L H]; BERT4Rec's scoring reads it at the [MASK]

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()  # BERT4Rec inlines its own

    def user_vectors(self, item_seq, item_seq_len):
        """The output at the [MASK] appended after the last item: BERT4Rec's ``predict`` input, [B H]."""
        return self.gather_indexes(self.forward(append_item(item_seq, item_seq_len, self.mask_token)), item_seq_len - 1)

    def supervised_states(self, interaction):
        """``(states [N, H], targets [N])``: the output at each masked position of the user's cloze rows."""
        inputs, targets = cloze_rows(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN],
                                     interaction[self.POS_ITEM_ID], self.mask_token, self.mask_ratio)
        masked = targets > 0
        return self.forward(inputs)[masked], targets[masked]

    def item_bias(self, items):
        return self.output_bias[items]
