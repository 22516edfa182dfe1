"""LLMESR_Bert4Rec: LLM-ESR over RecBole's BERT4Rec, the dual-view DualLLMBert4Rec plus retrieval-augmented
self-distillation.

Reference: Qidong Liu et al. "LLM-ESR: Large Language Models Enhancement for Long-tailed Sequential
Recommendation." NeurIPS 2024. Official code: github.com/liuqidong07/LLM-ESR (models/LLMESR.py).

Config keys: those of DualLLMBert4Rec, plus (properties/model/LLMESR.yaml) llmesr_distill, llmesr_sim_user_num,
llmesr_user_sim_func (kd or cl), llmesr_alpha, llmesr_teacher (batch, epoch or running), llmesr_item_reg
and llmesr_beta. The similar users come from the side-data cache (llm_similar_users kept per user).
"""
from recbole_llm.model.llmesr import LLMESR
from recbole_llm.model.sequential_recommender.dualllmbert4rec import DualLLMBert4Rec


class LLMESR_Bert4Rec(LLMESR, DualLLMBert4Rec):
    """LLM-ESR with the BERT4Rec backbone (see the module docstring)."""
