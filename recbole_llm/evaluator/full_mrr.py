"""FullMRR: the mean reciprocal rank over the whole candidate list, registered with RecBole's evaluator.

RecBole's ``MRR@K`` is truncated: a target ranked below K counts 0. SLMRec's protocol (Xu et al., ICLR 2025) reports
the untruncated MRR over its 1,000 candidates (``uni999``). ``metrics: [..., FullMRR]`` adds the key ``fullmrr``:
the mean over the evaluated rows of ``1 / rank`` of the target among the row's candidates (all items in full
ranking, the target and its sampled negatives in ``uni*`` modes). The rank is RecBole's descending rank with ties
averaged (``rec.meanrank``, as GAUC uses). A row must hold exactly one target, as in leave-one-out splits.
"""
import numpy as np
from recbole.evaluator import register
from recbole.evaluator.base_metric import AbstractMetric
from recbole.utils import EvaluatorType

from recbole_llm.utils import RecBoleLLMError


class FullMRR(AbstractMetric):
    """Untruncated mean reciprocal rank of the single target of each evaluated row."""

    metric_type = EvaluatorType.RANKING
    metric_need = ["rec.meanrank"]

    def calculate_metric(self, dataobject):
        target_rank, _, n_targets = np.split(dataobject.get("rec.meanrank").numpy(), 3, axis=1)
        if (n_targets != 1).any():
            raise RecBoleLLMError(
                f"metric FullMRR needs one target per evaluated row; {int((n_targets != 1).sum())} rows have "
                f"another number. Use a leave-one-out split (eval_args split LS: valid_and_test) or drop FullMRR "
                f"from metrics.")
        return {"fullmrr": round(float(np.mean(1.0 / target_rank)), self.decimal_place)}


def register_metric(metric_class):
    """Make ``metric_class`` a RecBole metric, found by its class name in ``metrics``.

    RecBole looks metrics up in the tables of ``recbole.evaluator.register`` (the Config for the evaluation type, the
    collector for what to collect, the evaluator for the class), which it fills from its own metrics module only.
    """
    name = metric_class.__name__.lower()
    register.metrics_dict[name] = metric_class
    register.metric_information[name] = metric_class.metric_need
    register.metric_types[name] = metric_class.metric_type
    if metric_class.smaller and name not in register.smaller_metrics:
        register.smaller_metrics.append(name)


register_metric(FullMRR)
