"""LLMESR_SASRec: LLM-ESR over RecBole's SASRec, the dual-view DualLLMSASRec plus retrieval-augmented
self-distillation.

Reference: Qidong Liu et al. "LLM-ESR: Large Language Models Enhancement for Long-tailed Sequential
Recommendation." NeurIPS 2024. Official code: github.com/liuqidong07/LLM-ESR (models/LLMESR.py).

Config keys: those of DualLLMSASRec, plus (properties/model/LLMESR.yaml) llmesr_distill, llmesr_sim_user_num,
llmesr_user_sim_func (kd or cl), llmesr_alpha, llmesr_teacher (batch, epoch or running), llmesr_item_reg,
llmesr_beta and llmesr_sim_user_source. The similar users come from the side-data cache (llm_similar_users kept
per user, by cosine of the users' history-text vectors, as in the paper), or with llmesr_sim_user_source: items
from the cosine of the mean LLM vector of each user's training items (a deviation, off in the faithful setting).

Defaults of its own (properties/model/LLMESR_SASRec.yaml), both restored by ``llmesr_setting: faithful``:
``llmesr_input_scale: False`` (RecBole's SASRec input, not the official x sqrt(hidden_size)) and
``llmesr_llm_score_weight: 2.0`` (official: 1). Trained to convergence on ml-1m-half (all-positions protocol, cap
300 epochs), they took test NDCG@10 from 0.1250 +- 0.0026 (seeds 42, 43) to 0.1297 +- 0.0011 (seeds 42-44), and
tail items from 0.0606 to 0.0646 (the README).
"""
from recbole_llm.model.llmesr import LLMESR
from recbole_llm.model.sequential_recommender.dualllmsasrec import DualLLMSASRec


class LLMESR_SASRec(LLMESR, DualLLMSASRec):
    """LLM-ESR with the SASRec backbone (see the module docstring)."""
