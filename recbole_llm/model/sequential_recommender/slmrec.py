"""SLMRec: an E4SRec-style sequence model over a (truncated) Hugging Face transformer, teacher and student alike.

References: SLMRec, Xu et al., "SLMRec: Distilling Large Language Models into Small for Sequential Recommendation",
ICLR 2025 (arXiv 2405.17890); E4SRec, Li et al., "E4SRec: An Elegant Effective Efficient Extensible Solution of
Large Language Models for Sequential Recommendation", 2023 (arXiv 2312.02443).
"""
import contextlib
import functools
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_llm.model.layer_stack import architecture, keep_layers, layer_list
from recbole_llm.model.layers import per_row_user_vectors
from recbole_llm.text.encoders import encoder_path
from recbole_llm.utils import RecBoleLLMError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# LoRA targets by default: the feed-forward projections, as the official code (gate/up/down of Llama-style blocks).
# For BERT-style blocks, a regex keeps the attention's own ``output.dense`` out.
FFN_TARGETS = {"llama-style": ["gate_proj", "up_proj", "down_proj"],
               "bert-style": r".*layer\.\d+\.(intermediate|output)\.dense"}


class SLMRec(SequentialRecommender):
    r"""E4SRec-style LLM recommender; with few layers and a teacher (``SLMRecTrainer``) it is SLMRec's student.

    - Items: the frozen item table of a trained RecBole SASRec-like checkpoint (``slmrec_item_emb_checkpoint``, any
      model with an ``item_embedding``), read through ``load_data_and_model`` and matched to this dataset by raw item
      token. An item of this dataset the checkpoint lacks is an error.
    - Prompt: ``[instruction tokens ; input_proj(item_table[seq]) ; response tokens]``, tokenized without special
      tokens; the sequence is left-padded (the last item next to the response marker) and padded items are masked.
    - Backbone: any Hugging Face model (``slmrec_backbone``), decoder (``model.layers``) or encoder
      (``encoder.layer``), cut to its first ``slmrec_n_layers`` layers, optionally after the official "interval"
      drop; LoRA (peft) on it, everything else of it frozen.
    - Output: the last token's final state ``h``; user vector ``score(h)`` with ``score`` = Linear(d_llm, d_item,
      no bias); logits = user vector · item_tableᵀ over all items; cross-entropy.
    - Multi-supervision heads (``slmrec_distill`` with ``slmrec_ms_weight`` > 0): one Linear(d_llm, d_item) per
      intermediate block, used by ``SLMRecTrainer`` only.
    - Checkpoints hold the trainable parameters and the item table only (``state_dict``); the frozen backbone comes
      from ``slmrec_backbone`` again on reload.

    Training samples: with ``llm_train_mode: all_positions`` (default) the dataset holds one row per user, its last
    training target and the items before it (the official scheme: ``items[-3]`` from ``items[:-3]``); SLMRec trains
    on that last target only. ``prefix`` is RecBole's augmentation (every prefix a sample).

    Deviations from the official code: float32 (or ``slmrec_dtype`` bf16/fp16) weights instead of 8-bit LLaMA-2-7B
    with fp16; the CPU default backbone is all-MiniLM-L6-v2 (6 encoder layers, bidirectional over the prompt)
    instead of LLaMA-2-7B (32 decoder layers); the instruction is our own wording in the Alpaca layout; bf16
    autocast on CUDA (``llm_dtype: auto``) instead of fp16; pads sit before the items and are masked, while the official code
    maps padding onto item 0, a real item; items follow RecBole's time order.

    Config keys (properties/model/SLMRec.yaml): ``slmrec_item_emb_checkpoint``, ``slmrec_backbone``,
    ``slmrec_n_layers``, ``slmrec_interval``, ``slmrec_dtype``, ``slmrec_lora_r``, ``slmrec_lora_alpha``,
    ``slmrec_lora_dropout``, ``slmrec_lora_target_modules``, ``slmrec_instruction``, ``slmrec_response``,
    ``slmrec_distill``, ``slmrec_distill_blocks``, ``slmrec_ms_weight`` (the trainer reads
    ``slmrec_teacher_checkpoint``, ``slmrec_cos_weight`` and ``slmrec_l2_weight``), ``llm_train_mode``; and the
    training control of ``recbole_llm.trainer.llm_trainer`` (official: cosine, 100 warm-up steps, clipping at 1.0).
    """

    input_type = InputType.POINTWISE
    llm_train_modes = ("all_positions", "prefix")
    skip_flops = True  # RecBole's FLOPs probe would deep-copy the LLM

    def __init__(self, config, dataset, item_table=None):
        super().__init__(config, dataset)
        self.dataset = dataset  # SLMRecTrainer builds the teacher on the same dataset
        table = sasrec_item_table(config, dataset) if item_table is None else item_table
        self.item_table = nn.Embedding.from_pretrained(table, freeze=True)
        self.backbone, self.architecture = build_backbone(config)
        self.n_layers = len(layer_list(self.backbone, "slmrec_backbone"))
        self.llm_dtype = DTYPES[config["slmrec_dtype"]]
        self.hidden_size = self.backbone.config.hidden_size
        self.input_proj = nn.Linear(table.shape[1], self.hidden_size)
        self.score = nn.Linear(self.hidden_size, table.shape[1], bias=False)
        self._init_prompt(config)
        self.blocks = block_layers(self.n_layers, config["slmrec_distill_blocks"]) if config["slmrec_distill"] else []
        n_heads = len(self.blocks[:-1]) if config["slmrec_ms_weight"] > 0 else 0
        self.ms_heads = nn.ModuleList(nn.Linear(self.hidden_size, table.shape[1], bias=False) for _ in range(n_heads))

    def llm_modules(self):
        """The LoRA-wrapped backbone, for ``llm_gradient_checkpointing`` and ``llm_sharding``."""
        return [self.backbone]

    def _init_prompt(self, config):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(backbone_path(config), local_files_only=True)
        for name, key in (("instruction_ids", "slmrec_instruction"), ("response_ids", "slmrec_response")):
            ids = tokenizer(config[key], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if len(ids) == 0:
                raise RecBoleLLMError(f"config key '{key}' gives no tokens; set a non-empty prompt text.")
            self.register_buffer(name, ids, persistent=False)

    # --- representations ----------------------------------------------------------------------------------------
    def prompt_inputs(self, item_seq, item_seq_len):
        """``(inputs_embeds [B, T, d_llm], attention_mask [B, T])`` of the instruction prompt around the items."""
        items = left_pad(item_seq, item_seq_len)
        embed = self.backbone.get_input_embeddings()
        batch = len(items)
        instruction = embed(self.instruction_ids).expand(batch, -1, -1)
        response = embed(self.response_ids).expand(batch, -1, -1)
        item_embeds = self.input_proj(self.item_table(items)).to(self.llm_dtype)
        inputs = torch.cat([instruction, item_embeds, response], dim=1)
        mask = torch.cat([torch.ones(batch, len(self.instruction_ids), dtype=torch.long, device=items.device),
                          (items > 0).long(),
                          torch.ones(batch, len(self.response_ids), dtype=torch.long, device=items.device)], dim=1)
        return inputs, mask

    def layer_states(self, item_seq, item_seq_len):
        """The last token's state after each layer, float32 ``[B, d_llm]``: index 0 is the embeddings, index k the
        output of layer k, the last entry the backbone's final output (after a final norm where it has one)."""
        inputs, mask = self.prompt_inputs(item_seq, item_seq_len)
        outputs = self.backbone(inputs_embeds=inputs, attention_mask=mask, output_hidden_states=True)
        return [state[:, -1].float() for state in outputs.hidden_states]

    def last_state(self, item_seq, item_seq_len):
        inputs, mask = self.prompt_inputs(item_seq, item_seq_len)
        return self.backbone(inputs_embeds=inputs, attention_mask=mask).last_hidden_state[:, -1].float()

    def forward(self, item_seq, item_seq_len):
        """User vectors ``[B, d_item]``: the projected last-token state."""
        return self.score(self.last_state(item_seq, item_seq_len))

    def item_logits(self, user_vectors):
        return user_vectors @ self.item_table.weight.T

    # --- losses -------------------------------------------------------------------------------------------------
    def rec_loss(self, final_state, targets):
        """Cross-entropy over all items of the final last-token state."""
        return F.cross_entropy(self.item_logits(self.score(final_state)), targets)

    def multi_supervision_loss(self, states, targets):
        """Sum over the intermediate blocks of the CE of their own head (SLMRec's L_ms); ``states`` as
        ``layer_states`` returns them."""
        return sum(F.cross_entropy(self.item_logits(head(states[layer])), targets)
                   for head, layer in zip(self.ms_heads, self.blocks[:-1]))

    def calculate_loss(self, interaction):
        final_state = self.last_state(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.rec_loss(final_state, interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        """Scores of ``interaction``'s (sequence, item) rows; each distinct sequence gets one LLM pass (``uni*``
        evaluation repeats a user's history in the rows of its target and its negatives)."""
        vectors = per_row_user_vectors(self.forward, interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (vectors * self.item_table(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self.item_logits(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]))

    # --- checkpoints: trainable parameters and the item table ---------------------------------------------------
    def saved_names(self):
        """The state-dict keys a checkpoint holds: every trainable parameter, and the frozen item table."""
        return [name for name, p in self.named_parameters() if p.requires_grad] + ["item_table.weight"]

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        kept = {prefix + name for name in self.saved_names()}
        for key in [key for key in state if key.startswith(prefix) and key not in kept]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load a checkpoint's trainable parameters and item table; the frozen backbone stays as loaded from
        ``slmrec_backbone``. With ``strict``, a missing or unexpected key is an error."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        resized = sorted(key for key in set(own) & set(state_dict) if own[key].shape != state_dict[key].shape)
        if resized or (strict and (missing or unexpected)):
            raise RecBoleLLMError(
                f"SLMRec checkpoint does not match this model: missing {missing[:2]}, unexpected {unexpected[:2]}, "
                f"other shape {resized[:2]} ({len(missing)}, {len(unexpected)} and {len(resized)} keys). It was "
                f"saved with another backbone, depth, LoRA or distillation setting; rebuild the model with the "
                f"checkpoint's config.")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def left_pad(item_seq, item_seq_len):
    """RecBole's right-padded sequences ``[i1 .. in 0 .. 0]`` as ``[0 .. 0 i1 .. in]``."""
    width = item_seq.size(1)
    source = torch.arange(width, device=item_seq.device) - (width - item_seq_len).unsqueeze(1)
    return torch.gather(item_seq, 1, source.clamp(min=0)) * (source >= 0)


def block_layers(n_layers, blocks):
    """The layers that end SLMRec's ``blocks`` blocks of an ``n_layers`` model: ``(n_layers // blocks) * i``."""
    if blocks < 1 or n_layers % blocks:
        raise RecBoleLLMError(f"slmrec_distill_blocks ({blocks}) must divide the model's {n_layers} layers "
                              f"(slmrec_n_layers); choose a divisor, e.g. {n_layers}.")
    return [n_layers // blocks * i for i in range(1, blocks + 1)]


# --- the item table ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _kept_random_state():
    """Restore Python's, numpy's and torch's RNG after ``load_data_and_model``, which reseeds them."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@functools.lru_cache(maxsize=4)
def _checkpoint_item_vectors(path, _modified):
    """``{raw item token: vector}`` of a RecBole checkpoint's ``item_embedding`` (cached per file version)."""
    from recbole_llm.quick_start import load_data_and_model  # quick_start imports the model registry

    with _kept_random_state():
        try:
            config, model, dataset, *_ = load_data_and_model(path)
        except RecBoleLLMError as error:  # truncated, foreign or another dataset's: name the key as well
            raise RecBoleLLMError(f"slmrec_item_emb_checkpoint: {error}") from None
    embedding = getattr(model, "item_embedding", None)
    if not isinstance(embedding, nn.Embedding):
        raise RecBoleLLMError(f"slmrec_item_emb_checkpoint '{path}' holds a {config['model']} without an "
                              f"item_embedding table; train SASRec (or SASRecAP) and pass its checkpoint.")
    tokens = dataset.field2id_token[dataset.iid_field]
    weights = embedding.weight.detach().float().cpu()
    return {token: weights[i] for i, token in enumerate(tokens) if i > 0}


def sasrec_item_table(config, dataset):
    """``[n_items, d_item]``: the checkpoint's item vectors in this dataset's id order, row 0 (padding) zero."""
    path = config["slmrec_item_emb_checkpoint"]
    if not path:
        raise RecBoleLLMError("SLMRec needs slmrec_item_emb_checkpoint: the .pth file of a trained RecBole SASRec "
                              "run on the same items (e.g. python run_recbole_llm.py --model=SASRecAP --dataset=...).")
    if not os.path.isfile(path):
        raise RecBoleLLMError(f"slmrec_item_emb_checkpoint '{path}' does not exist; pass the .pth file a SASRec run "
                              f"saved in its checkpoint_dir.")
    vectors = _checkpoint_item_vectors(os.path.abspath(path), os.stat(path).st_mtime_ns)
    tokens = dataset.field2id_token[dataset.iid_field]
    missing = [token for token in tokens[1:] if token not in vectors]
    if missing:
        raise RecBoleLLMError(
            f"slmrec_item_emb_checkpoint '{path}' lacks {len(missing)} of the {len(tokens) - 1} items of dataset "
            f"'{config['dataset']}' (raw tokens {', '.join(map(str, missing[:5]))}, ...); train SASRec on this "
            f"dataset (same atomic files and filters) and pass that checkpoint.")
    table = torch.zeros(len(tokens), len(next(iter(vectors.values()))))
    table[1:] = torch.stack([vectors[token] for token in tokens[1:]])
    return table


# --- the backbone -----------------------------------------------------------------------------------------------
def backbone_path(config):
    """The Hugging Face folder of ``slmrec_backbone``; ~ = the bundled all-MiniLM-L6-v2."""
    return encoder_path(config, "slmrec_backbone")


def kept_layers(n_total, n_layers, interval):
    """Indices of the layers kept: without the official interval drop (``interval`` k > 0 removes every (k+1)-th
    layer), then the first ``n_layers`` (~ = all) of the rest."""
    if interval < 0:
        raise RecBoleLLMError(f"slmrec_interval must be >= 0, got {interval}.")
    kept = [i for i in range(n_total) if interval == 0 or (i + 1) % (interval + 1)]
    if n_layers is not None and not 1 <= n_layers <= len(kept):
        raise RecBoleLLMError(f"slmrec_n_layers must lie in 1..{len(kept)} (the backbone's layers after "
                              f"slmrec_interval {interval}), got {n_layers}.")
    return kept[:n_layers]


def truncate(model, n_layers, interval):
    """Keep the selected layers of ``model`` (see ``kept_layers``), in place."""
    kept = kept_layers(len(layer_list(model, "slmrec_backbone")), n_layers, interval)
    keep_layers(model, kept, "slmrec_backbone")
    return kept


def lora_targets(config, arch):
    targets = config["slmrec_lora_target_modules"]
    if targets is not None:
        return list(targets)
    if arch not in FFN_TARGETS:
        raise RecBoleLLMError("slmrec_backbone is neither Llama-style nor BERT-style, so there is no default LoRA "
                              "target; set slmrec_lora_target_modules to its feed-forward module names.")
    return FFN_TARGETS[arch]


def build_backbone(config):
    """``(peft model, architecture)``: the backbone cut to its layers, frozen, with LoRA adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    if config["slmrec_dtype"] not in DTYPES:
        raise RecBoleLLMError(f"slmrec_dtype must be one of {', '.join(DTYPES)}, got {config['slmrec_dtype']!r}.")
    model = AutoModel.from_pretrained(backbone_path(config), dtype=DTYPES[config["slmrec_dtype"]],
                                      local_files_only=True)
    truncate(model, config["slmrec_n_layers"], config["slmrec_interval"])
    model.config.use_cache = False
    arch = architecture(model)
    lora = LoraConfig(r=config["slmrec_lora_r"], lora_alpha=config["slmrec_lora_alpha"],
                      lora_dropout=config["slmrec_lora_dropout"], target_modules=lora_targets(config, arch),
                      bias="none")
    try:
        return get_peft_model(model, lora), arch
    except ValueError as error:  # peft: no module matched the targets
        raise RecBoleLLMError(f"slmrec_lora_target_modules: {error}") from error
