r"""RecLoRA: a CTR model that asks an LLM "will the user like this movie?" and reads P(yes), adapted by a
personalised LoRA that a frozen conventional recommender (CRM) mixes per sample.

Reference:
    Jiachen Zhu et al. "Lifelong Personalized Low-Rank Adaptation of Large Language Models for Recommendation",
    arXiv 2408.03533, 2024 (official code: Gebro13/RecLoRA).
    Jianghao Lin et al. "ReLLa: Retrieval-enhanced Large Language Models for Lifelong Sequential Behavior
    Comprehension in Recommendation", WWW 2024 (the data pipeline, prompt and plain-LoRA baseline).

How a sample is scored:
    1. ``CTRPrompts`` renders ReLLa's prompt (profile, K rated history items, the target) and the chat wrapper
       ``reclora_chat_template`` puts it in the conversation.
    2. A causal LM reads it with the answer appended (``"Yes."``/``"No."``, the label's in training, ``"Yes."`` in
       evaluation); at the position that predicts the answer's first token, P(yes) = softmax over the logits of
       the first token of "Yes." and of "No.". The two token ids come from the tokenizer (the first token where
       the tokenisations of the prompt + "Yes." and + "No." differ), never from a fixed vocabulary.
    3. An encoder-only model (the offline CPU default, all-MiniLM-L6-v2, which has no LM head) reads the prompt
       followed by its mask token; the hidden state there is scored against the TIED word embeddings of the two
       answer tokens (h . E[yes], h . E[no]), an MLM-style head without the transform layer. The LoRA learns
       to move that state; the logits over the whole vocabulary are h . E^T.
    Loss (``reclora_loss``): ``lm``, the LM cross-entropy of the answer tokens over the vocabulary (the official
    ``--head lm``; for an encoder, of the answer's first token at the mask), or ``bce``, BCE on P(yes).

Personalised LoRA (``reclora_mode: reclora``): on every Linear whose name ends with one of
``reclora_target_modules``, a bank of ``reclora_n_meta`` meta-LoRAs of rank ``reclora_rank`` with one gate per
module, fed the frozen CRM's last MLP output for the sample (``recbole_llm.model.layers.MetaLoRA``); the A and B
matrices are mixed in weight space per sample. ``reclora_mode: origin`` is one shared LoRA on the same modules,
the TALLRec/ReLLa baseline. Only the banks and gates train; the LLM and the CRM are frozen.

Why not peft: peft's LoRA layers hold one (A, B) per adapter and its mixed-batch inference routes each sample to
ONE named adapter; a per-sample convex combination of A's and B's fed by an outside model has no extension
point there. A forward hook on the frozen projection, as the official code does, adds the delta and leaves the
base model and its weights untouched.

The CRM (RecBole's DIN trained on the full CTR training split, see ``recbole_llm.trainer.reclora``) is attached by
``RecLoRATrainer``. Checkpoints hold only the banks and gates (``state_dict``); load them into a model built on the
same LLM.

Config keys (properties/model/RecLoRA.yaml): reclora_llm, reclora_chat_template, reclora_max_tokens,
reclora_history, reclora_llm_hist_len, reclora_pca_dim, reclora_mode, reclora_loss, reclora_target_modules,
reclora_rank, reclora_alpha, reclora_lora_dropout, reclora_n_meta, reclora_gate_hidden, reclora_gate_dropout,
reclora_temperature, reclora_crm_dim, reclora_crm_checkpoint, reclora_train_samples, reclora_subset_seed; the
training control of ``recbole_llm.trainer.llm_trainer`` (llm_dtype, llm_grad_accum_steps, llm_max_grad_norm,
llm_lr_scheduler, llm_warmup_steps, llm_warmup_ratio, llm_gradient_checkpointing); and the CTR data keys of properties/overall.yaml (reclora_min_history, reclora_label_threshold, reclora_crm_hist_len,
reclora_valid_samples, reclora_test_samples).

Deviations: the retriever embeds items with ``llm_encoder`` over the side-data item text (title, year, genres)
instead of Vicuna over ReLLa's movie sentence; the global batch of 256 is 8 accumulated batches of 32, not 256
accumulated samples (the same update up to the order of the sums); the model is selected on valid (the official code selects on test).
"""
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import InputType, ModelType
from torch import nn

from recbole_llm.data.ctr import ANSWERS, CTRPrompts
from recbole_llm.model.layers import MetaLoRA, MetaLoRAGate
from recbole_llm.trainer.llm_trainer import compute_dtype
from recbole_llm.utils import RecBoleLLMError, config_choice

MODES = ("reclora", "origin")
LOSSES = ("lm", "bce")
PROMPT = "{prompt}"


def load_frozen_scorer(config):
    """``(model, tokenizer, causal)``: the frozen LLM of ``reclora_llm``; ``causal`` for decoder-only models."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from recbole_llm.text.encoders import is_decoder_only, encoder_path

    path = encoder_path(config, "reclora_llm")
    causal = is_decoder_only(AutoConfig.from_pretrained(path, local_files_only=True))
    # Frozen weights have no master copy to keep in fp32, so they load in the compute dtype; the banks stay fp32.
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path, local_files_only=True,
                                                                            dtype=compute_dtype(config))
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.truncation_side = "left"  # a long prompt loses its oldest tokens, never the answer position
    if not causal and tokenizer.mask_token is None:
        raise RecBoleLLMError(f"reclora_llm '{path}' is an encoder without a mask token, which RecLoRA scores at; "
                              f"use a BERT-style encoder or a causal LM.")
    return model, tokenizer, causal


def chat_template(config):
    template = config["reclora_chat_template"]
    if not isinstance(template, str) or template.count(PROMPT) != 1:
        raise RecBoleLLMError(f"reclora_chat_template must hold '{PROMPT}' exactly once, got {template!r}.")
    return lambda prompt: template.replace(PROMPT, prompt)


class AnswerTokens:
    """The token ids of the answers under ``tokenizer``: ``suffix[label]`` (the answer's tokens after the prompt)
    and ``yes_id`` / ``no_id`` (their first tokens, where the two tokenisations part)."""

    def __init__(self, tokenizer, wrap):
        self.tokenizer = tokenizer
        probe = wrap("?")
        yes, no = self.ids(probe + ANSWERS[1]), self.ids(probe + ANSWERS[0])
        common = next(i for i, (a, b) in enumerate(zip(yes + [None], no + [None])) if a != b)
        if common == 0 or common >= min(len(yes), len(no)):
            raise RecBoleLLMError(f"the tokenizer does not separate the answers {ANSWERS[1]!r} and {ANSWERS[0]!r} "
                                  f"after the prompt; use another reclora_llm or reclora_chat_template.")
        self.suffix = {1: yes[common:], 0: no[common:]}
        self.yes_id, self.no_id = yes[common], no[common]

    def ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def p_yes(vocab_logits, answers):
    """``[B]`` P(yes): the softmax over the logits of the two answer tokens, taken at the answer position."""
    return F.softmax(vocab_logits[:, [answers.no_id, answers.yes_id]], dim=-1)[:, 1]


def crm_hidden(crm, interaction):
    """``[B, d]``: the CRM's last MLP output (DIN's ``dnn_mlp_layers``, before its output layer) for the batch."""
    captured = []
    handle = crm.dnn_mlp_layers.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.no_grad():
            crm.predict(interaction)
    finally:
        handle.remove()
    return captured[0]


class RecLoRA(AbstractRecommender):
    """ReLLa's yes/no CTR prompt on a frozen LLM with RecLoRA's CRM-gated meta-LoRA bank (see the module docstring)."""

    type = ModelType.CONTEXT
    input_type = InputType.POINTWISE
    skip_flops = True  # RecBole's FLOP count deep-copies the model

    def __init__(self, config, dataset):
        super().__init__()
        self.LABEL = config["LABEL_FIELD"]
        self.mode = config_choice(config, "reclora_mode", MODES)
        self.loss_type = config_choice(config, "reclora_loss", LOSSES)
        self.dataset = dataset  # RecLoRATrainer builds the CRM on it
        self.prompts = CTRPrompts(dataset, config)
        self.wrap = chat_template(config)
        self.llm, self.tokenizer, self.causal = load_frozen_scorer(config)
        self.answers = AnswerTokens(self.tokenizer, self.wrap)
        self.max_tokens = min(config["reclora_max_tokens"], self._position_limit())
        self.lora = self._lora_banks(config)
        self.crm = None

    def llm_modules(self):
        """The LLM, for ``llm_gradient_checkpointing`` and ``llm_sharding``."""
        return [self.llm]

    def _position_limit(self):
        limit = getattr(self.llm.config, "max_position_embeddings", None)
        return limit if limit else self.tokenizer.model_max_length

    def _lora_banks(self, config):
        targets = tuple(config["reclora_target_modules"])
        linears = {name: module for name, module in self.llm.named_modules()
                   if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets}
        if not linears:
            raise RecBoleLLMError(f"no Linear layer of reclora_llm is named {', '.join(targets)}; set "
                                  f"reclora_target_modules to names of its projections (Llama: q_proj, v_proj; BERT: "
                                  f"query, value).")
        banks = nn.ModuleDict()
        for name, linear in linears.items():
            bank = MetaLoRA(linear.in_features, linear.out_features, config["reclora_rank"], config["reclora_alpha"],
                            n_meta=1 if self.mode == "origin" else config["reclora_n_meta"],
                            dropout=config["reclora_lora_dropout"], gate=self._gate(config))
            bank.add_to(linear)
            banks[name.replace(".", "_")] = bank
        return banks

    def _gate(self, config):
        if self.mode == "origin":
            return None
        return MetaLoRAGate(config["reclora_crm_dim"], config["reclora_n_meta"], config["reclora_gate_hidden"],
                            config["reclora_gate_dropout"], config["reclora_temperature"])

    # ------------------------------------------------------------------ the CRM
    def attach_crm(self, crm):
        """Use ``crm`` (frozen, kept out of this module's parameters and state) to feed the gates."""
        if not hasattr(crm, "dnn_mlp_layers"):
            raise RecBoleLLMError(f"the CRM must be RecBole's DIN (its dnn_mlp_layers feed the gates), got "
                                  f"{type(crm).__name__}.")
        crm.requires_grad_(False)
        object.__setattr__(self, "crm", crm.eval())

    def _set_gate_context(self, interaction):
        if self.mode == "origin":
            return
        if self.crm is None:
            raise RecBoleLLMError("RecLoRA's gates need the frozen CRM: train and evaluate through RecLoRATrainer, "
                                  "which loads reclora_crm_checkpoint, or call model.attach_crm(din) first.")
        context = crm_hidden(self.crm, interaction).detach()
        for bank in self.lora.values():
            bank.context = context

    # ------------------------------------------------------------------ inputs
    def _causal_batch(self, texts, labels):
        """Left-padded prompt + answer ids and each answer's length; prompts lose their oldest tokens when the
        whole would exceed ``reclora_max_tokens``."""
        yes = self.answers.suffix[1]
        bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        rows = []
        with_yes = self.tokenizer([text + ANSWERS[1] for text in texts], add_special_tokens=False)["input_ids"]
        for ids, label in zip(with_yes, labels):
            if ids[-len(yes):] != yes:
                raise RecBoleLLMError("the tokenizer merges the answer with the prompt's end; end "
                                      "reclora_chat_template with a space or a separator.")
            suffix = self.answers.suffix[label]
            rows.append(bos + ids[:-len(yes)][-(self.max_tokens - len(bos) - len(suffix)):] + suffix)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=self.device)
        suffix_lengths = torch.tensor([len(self.answers.suffix[label]) for label in labels], device=self.device)
        return input_ids, mask, suffix_lengths

    @property
    def device(self):
        return next(self.llm.parameters()).device

    # ------------------------------------------------------------------ scoring
    def _answer_logits(self, interaction, labels):
        """``(vocab_logits [B, V] at the answer position, LM loss of the labels' answers)``."""
        texts = [self.wrap(prompt) for prompt in self.prompts.render(interaction)]
        self._set_gate_context(interaction)
        if self.causal:
            return self._causal_logits(texts, labels)
        return self._encoder_logits(texts, labels)

    def _causal_logits(self, texts, labels):
        input_ids, mask, suffix_lengths = self._causal_batch(texts, labels)
        window = int(suffix_lengths.max()) + 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = self.llm(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          logits_to_keep=window).logits  # [B, window, V]: the last positions
        rows = torch.arange(len(texts), device=self.device)
        vocab_logits = logits[rows, window - 1 - suffix_lengths]
        targets = input_ids[:, -window + 1:]
        on_answer = torch.arange(window - 1, device=self.device) >= (window - 1 - suffix_lengths)[:, None]
        lm_loss = F.cross_entropy(logits[:, :-1][on_answer], targets[on_answer])
        return vocab_logits, lm_loss

    def _encoder_logits(self, texts, labels):
        batch = self.tokenizer([text + self.tokenizer.mask_token for text in texts], padding=True, truncation=True,
                               max_length=self.max_tokens, return_tensors="pt").to(self.device)
        at_mask = batch["input_ids"] == self.tokenizer.mask_token_id
        if not bool((at_mask.sum(1) == 1).all()):
            raise RecBoleLLMError("a RecLoRA prompt must hold the encoder's mask token exactly once; check "
                                  "reclora_chat_template.")
        hidden = self.llm(**batch).last_hidden_state[at_mask]  # [B, d]
        vocab_logits = hidden @ self.llm.get_input_embeddings().weight.T
        first = [self.answers.suffix[label][0] for label in labels]
        lm_loss = F.cross_entropy(vocab_logits, torch.tensor(first, device=self.device))
        return vocab_logits, lm_loss

    def calculate_loss(self, interaction):
        label = interaction[self.LABEL]
        vocab_logits, lm_loss = self._answer_logits(interaction, label.long().tolist())
        if self.loss_type == "lm":
            return lm_loss
        two = vocab_logits[:, [self.answers.no_id, self.answers.yes_id]]
        return F.binary_cross_entropy_with_logits(two[:, 1] - two[:, 0], label.float())

    def predict(self, interaction):
        vocab_logits, _ = self._answer_logits(interaction, [1] * len(interaction))
        return p_yes(vocab_logits, self.answers)

    # ------------------------------------------------------------------ checkpoints: the banks and gates only
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return OrderedDict((key, value) for key, value in full.items() if key.startswith(prefix + "lora."))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
            raise RecBoleLLMError(f"this RecLoRA state dict does not fit the model (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}); load a checkpoint saved with the same reclora_llm, "
                                  f"reclora_mode, reclora_target_modules and reclora_n_meta.")
        return super().load_state_dict(state_dict, strict=False, assign=assign)
