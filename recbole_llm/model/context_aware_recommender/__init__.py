"""Context-aware (CTR) recommenders."""
from recbole_llm.model.context_aware_recommender.reclora import RecLoRA

__all__ = ["RecLoRA"]
