"""RecLoRATrainer: RecBole's Trainer with RecLoRA's frozen CRM and Few2Many training (Zhu et al., arXiv 2408.03533).

- The CRM is pretrained first as an ordinary RecBole run of DIN on the same CTR samples and the FULL training split
  (``--model=DIN --config_files=benchmarks/protocols/ctr_rella.yaml``). This trainer loads its checkpoint
  (``reclora_crm_checkpoint``), checks that it was trained on the same data (dataset, ``llm_dataset``, the CTR keys
  and the split), freezes it and attaches it to the model, whose gates read its representation of each sample.
  RecBole's DIN is used as it is: its history holds item ids (with their item features) without the rating
  embedding of the official CRM.
- Few2Many: the LLM trains on ``reclora_train_samples`` training samples drawn with ``reclora_subset_seed``
  (``random.Random(seed).sample``, as ReLLa draws them), kept in time order and shuffled per epoch by the loader.
- Only the trainable parameters (the LoRA banks and gates) reach the optimizer and the checkpoints.
- The schedule, clipping, dtype and gradient accumulation are the shared ``LLMTrainer``'s; RecLoRA.yaml sets the
  official linear decay to 0 without warm-up over the run's steps (the official run stops after the first of its
  5 epochs, so its rate only falls to 80%).
"""
import random

import torch
from recbole.data.dataloader import TrainDataLoader

from recbole_llm.trainer.llm_trainer import LLMTrainer
from recbole_llm.utils import RecBoleLLMError, get_model, read_checkpoint

# Config values a CRM checkpoint must share with the RecLoRA run: the samples, their labels and the split.
CRM_KEYS = ("dataset", "llm_dataset", "reclora_crm_hist_len", "reclora_min_history", "reclora_label_threshold")


def _split(config):
    return config["eval_args"]["split"], config["eval_args"]["order"]


def _crm_checkpoint(config):
    path = config["reclora_crm_checkpoint"]
    hint = ("train the CRM first: python run_recbole_llm.py --model=DIN --dataset=<dataset> "
            "--config_files=benchmarks/protocols/ctr_rella.yaml, and pass the .pth it saves")
    if not path:
        raise RecBoleLLMError(f"reclora_mode 'reclora' needs reclora_crm_checkpoint; {hint}.")
    return path, read_checkpoint(path, "reclora_crm_checkpoint", hint)


def _check_crm_config(path, crm_config, config):
    if crm_config["model"] != "DIN":
        raise RecBoleLLMError(f"reclora_crm_checkpoint '{path}' is a {crm_config['model']} checkpoint; RecLoRA's CRM "
                              f"is DIN. Train DIN on the CTR samples and pass its checkpoint.")
    differing = [f"{key} {crm_config[key]!r} (here {config[key]!r})" for key in CRM_KEYS if crm_config[key] != config[key]]
    if _split(crm_config) != _split(config):
        differing.append(f"eval_args split/order {_split(crm_config)} (here {_split(config)})")
    if differing:
        raise RecBoleLLMError(f"reclora_crm_checkpoint '{path}' was trained on other data: {'; '.join(differing)}. "
                              f"Train the CRM with the same dataset and CTR keys.")
    hidden = crm_config["mlp_hidden_size"][-1]
    if hidden != config["reclora_crm_dim"]:
        raise RecBoleLLMError(f"reclora_crm_checkpoint '{path}' gives {hidden}-d representations (the last of its "
                              f"mlp_hidden_size) but reclora_crm_dim is {config['reclora_crm_dim']}; set "
                              f"reclora_crm_dim: {hidden}.")


def load_crm(config, dataset):
    """The frozen DIN of ``reclora_crm_checkpoint``, built on ``dataset``, on ``config['device']``."""
    path, checkpoint = _crm_checkpoint(config)
    crm_config = checkpoint["config"]
    _check_crm_config(path, crm_config, config)
    crm_config["device"] = config["device"]
    try:
        crm = get_model("DIN")(crm_config, dataset)
        crm.load_state_dict(checkpoint["state_dict"])
    except Exception as error:  # shapes and names fail in many ways; name the checkpoint for all
        first_line = (str(error).splitlines() or [""])[0]
        raise RecBoleLLMError(f"reclora_crm_checkpoint '{path}' does not load as DIN on this dataset "
                              f"({type(error).__name__}: {first_line}); retrain the CRM on it.") from error
    crm.load_other_parameter(checkpoint.get("other_parameter"))
    return crm.to(config["device"])


def few_to_many(train_data, config):
    """``train_data``, or a loader over ``reclora_train_samples`` of its samples drawn with ``reclora_subset_seed``."""
    dataset, count = train_data._dataset, config["reclora_train_samples"]
    if count is None or count >= len(dataset):
        return train_data
    rows = sorted(random.Random(config["reclora_subset_seed"]).sample(range(len(dataset)), count))
    subset = dataset.copy(dataset.inter_feat[torch.tensor(rows)])
    return TrainDataLoader(config, subset, None, shuffle=config["shuffle"])


class RecLoRATrainer(LLMTrainer):
    """The shared LLMTrainer with the frozen CRM attached, Few2Many subsetting, and only trainable parameters optimised."""

    def __init__(self, config, model):
        super().__init__(config, model)
        if model.mode == "reclora":
            model.attach_crm(load_crm(config, model.dataset))

    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", [p for p in self.model.parameters() if p.requires_grad])
        return super()._build_optimizer(**kwargs)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        train_data = few_to_many(train_data, self.config)
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
