"""Evaluation additions to RecBole: long-tail group metrics, history exclusion for sequential models and the
untruncated MRR (``FullMRR``)."""
from recbole_llm.evaluator.full_mrr import FullMRR
from recbole_llm.evaluator.group_metrics import (GROUPS, GroupCollector, GroupEvaluator, LongTailGroups,
                                                 attach_group_metrics, dataset_interactions, group_key,
                                                 head_threshold, training_counts)
from recbole_llm.evaluator.history import PhaseHistories, attach_history_exclusion

__all__ = ["FullMRR", "GROUPS", "GroupCollector", "GroupEvaluator", "LongTailGroups", "PhaseHistories",
           "attach_group_metrics", "attach_history_exclusion", "dataset_interactions", "group_key", "head_threshold",
           "training_counts"]
