"""The stack of transformer layers inside a Hugging Face model: find it, tell its family, keep some of its layers.

SLMRec cuts its backbone to a few layers; HLLM's ``hllm_item_trainable_layers`` keeps only the item LLM's top ones.
"""
import functools

from torch import nn

from recbole_llm.utils import RecBoleLLMError

# Where each architecture keeps its stack of layers (PeftModel adds its own prefix in front).
LAYER_PATHS = ("layers", "model.layers", "encoder.layer", "h", "transformer.h", "decoder.layers")


def layer_list(model, key):
    """The ``nn.ModuleList`` of transformer layers of a Hugging Face (or peft-wrapped) model set by config ``key``."""
    for root in (model, getattr(getattr(model, "base_model", None), "model", None)):
        for dotted in LAYER_PATHS:
            module = functools.reduce(lambda m, name: getattr(m, name, None), dotted.split("."), root)
            if isinstance(module, nn.ModuleList):
                return module
    raise RecBoleLLMError(f"{key}: no layer stack found in {type(model).__name__} (looked for "
                          f"{', '.join(LAYER_PATHS)}); use a Llama-style decoder or a BERT-style encoder.")


def keep_layers(model, kept, key):
    """Keep the layers of ``model`` at the indices ``kept`` (ascending), in place, and tell its config."""
    layers = layer_list(model, key)
    for index in reversed(range(len(layers))):
        if index not in kept:
            del layers[index]  # ModuleList renumbers the rest
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]


def architecture(model):
    """'llama-style' (``layers`` of decoder blocks with gate/up/down projections), 'bert-style' or 'other'."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if {"gate_proj", "up_proj", "down_proj"} <= names:
        return "llama-style"
    if {"intermediate", "output"} <= names:
        return "bert-style"
    return "other"
