"""Evaluation additions to RecBole: long-tail group metrics and the untruncated MRR (``FullMRR``)."""
from recbole_llm.evaluator.full_mrr import FullMRR
from recbole_llm.evaluator.group_metrics import (GROUPS, GroupCollector, GroupEvaluator, LongTailGroups,
                                                 attach_group_metrics, dataset_interactions, group_key,
                                                 head_threshold, training_counts)

__all__ = ["FullMRR", "GROUPS", "GroupCollector", "GroupEvaluator", "LongTailGroups", "attach_group_metrics",
           "dataset_interactions", "group_key", "head_threshold", "training_counts"]
