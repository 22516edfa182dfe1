"""LLMESR_SASRec: LLM-ESR over RecBole's SASRec, the dual-view DualLLMSASRec plus retrieval-augmented
self-distillation.

Reference: Qidong Liu et al. "LLM-ESR: Large Language Models Enhancement for Long-tailed Sequential
Recommendation." NeurIPS 2024. Official code: github.com/liuqidong07/LLM-ESR (models/LLMESR.py).

Config keys: those of DualLLMSASRec, plus (properties/model/LLMESR.yaml) llmesr_distill, llmesr_sim_user_num,
llmesr_user_sim_func (kd or cl), llmesr_alpha, llmesr_teacher (batch, epoch or running), llmesr_item_reg,
llmesr_beta and llmesr_sim_user_source. The similar users come from the side-data cache (llm_similar_users kept
per user, by cosine of the users' history-text vectors, as in the paper), or with llmesr_sim_user_source: items
from the cosine of the mean LLM vector of each user's training items (a deviation, off in the faithful setting).
"""
from recbole_llm.model.llmesr import LLMESR
from recbole_llm.model.sequential_recommender.dualllmsasrec import DualLLMSASRec


class LLMESR_SASRec(LLMESR, DualLLMSASRec):
    """LLM-ESR with the SASRec backbone (see the module docstring)."""
