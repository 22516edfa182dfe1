"""LLMTrainer: the training control shared by the LLM models' trainers (SLMRec, HLLM, RecLoRA).

RecBole's Trainer steps the optimizer once per batch at a constant learning rate, in fp32 unless ``enable_amp``.
LLM training needs more, and each piece here comes from torch or transformers rather than being written by hand:

- ``llm_dtype``: ``fp32``; ``bf16`` or ``fp16`` autocast (``torch.autocast``) over fp32 master weights, with a
  ``torch.amp.GradScaler`` for fp16; ``auto`` = bf16 on CUDA, fp32 elsewhere.
- ``llm_grad_accum_steps`` k: the loss of each batch is divided by k and the optimizer steps every k batches (and
  once more at the end of an epoch for a remainder), so k batches of b make one update on k·b samples.
- ``llm_max_grad_norm``: ``torch.nn.utils.clip_grad_norm_`` before each optimizer step (1.0, as in the Hugging Face
  Trainer); ~ = no clipping. RecBole's own ``clip_grad_norm`` dict is refused beside it, so that one run never clips
  twice.
- ``llm_lr_scheduler`` (``constant``, ``linear``, ``cosine``) with ``llm_warmup_steps`` or ``llm_warmup_ratio`` of
  the run's optimizer steps, from ``transformers.get_scheduler``, stepped after every optimizer step.
- ``llm_gradient_checkpointing``: Hugging Face gradient checkpointing (non-reentrant) in every LLM the model lists
  in ``gradient_checkpointing_modules()``.

Defaults are in properties/overall.yaml; each model's YAML sets those of its official code.
"""
import contextlib
import math
import warnings

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_llm.utils import RecBoleLLMError, config_choice

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULERS = ("constant", "linear", "cosine")


def compute_dtype(config):
    """The autocast dtype of ``llm_dtype`` on ``config['device']`` (``auto``: bf16 on CUDA, fp32 elsewhere)."""
    name = config_choice(config, "llm_dtype", (*DTYPES, "auto"))
    if name == "auto":
        name = "bf16" if torch.device(config["device"]).type == "cuda" else "fp32"
    return DTYPES[name]


def autocast(dtype, device):
    """``torch.autocast`` to ``dtype`` on ``device``; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def warmup_steps(config, total_steps):
    """``llm_warmup_steps`` when set, else ``llm_warmup_ratio`` of ``total_steps`` rounded up."""
    steps, ratio = config["llm_warmup_steps"], config["llm_warmup_ratio"]
    if steps is not None and ratio:
        raise RecBoleLLMError("set llm_warmup_steps or llm_warmup_ratio, not both (the other to ~ or 0).")
    if steps is not None:
        return steps
    return math.ceil(ratio * total_steps)


def build_scheduler(config, optimizer, total_steps):
    """The ``llm_lr_scheduler`` of ``transformers.get_scheduler`` over ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    name = config_choice(config, "llm_lr_scheduler", SCHEDULERS)
    warmup = warmup_steps(config, total_steps)
    if name == "constant":
        name = "constant_with_warmup" if warmup else "constant"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def enable_gradient_checkpointing(model):
    """Turn on non-reentrant gradient checkpointing in each LLM of ``model.gradient_checkpointing_modules()``."""
    modules = getattr(model, "gradient_checkpointing_modules", lambda: [])()
    if not modules:
        raise RecBoleLLMError(f"llm_gradient_checkpointing is True but {type(model).__name__} has no LLM that "
                              f"supports it; set llm_gradient_checkpointing: False.")
    for module in modules:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class LLMTrainer(Trainer):
    """RecBole's Trainer with the training control of the module docstring; evaluation is RecBole's."""

    def __init__(self, config, model):
        super().__init__(config, model)
        if config["enable_amp"]:
            raise RecBoleLLMError("enable_amp is RecBole's autocast; the LLM models take llm_dtype (bf16 or fp16) "
                                  "instead. Set enable_amp: False.")
        if config["clip_grad_norm"] and config["llm_max_grad_norm"] is not None:
            raise RecBoleLLMError("clip_grad_norm (RecBole's) and llm_max_grad_norm are both set; keep "
                                  "llm_max_grad_norm and set clip_grad_norm: ~.")
        self.accum_steps = config["llm_grad_accum_steps"]
        if self.accum_steps < 1:
            raise RecBoleLLMError(f"llm_grad_accum_steps must be at least 1, got {self.accum_steps}.")
        self.max_grad_norm = config["llm_max_grad_norm"]
        self.dtype = compute_dtype(config)
        self.scaler = torch.amp.GradScaler(torch.device(self.device).type, enabled=self.dtype == torch.float16)
        self.scheduler = None
        if config["llm_gradient_checkpointing"]:
            enable_gradient_checkpointing(model)

    def optimizer_steps(self, train_data):
        """Optimizer steps in one epoch over ``train_data``."""
        return math.ceil(len(train_data) / self.accum_steps)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.start_schedule(train_data)
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def start_schedule(self, train_data):
        """The run's scheduler over ``epochs`` epochs of ``train_data``, advanced past the epochs a resumed run has
        done already (RecBole's checkpoints hold no scheduler)."""
        steps_per_epoch = self.optimizer_steps(train_data)
        self.scheduler = build_scheduler(self.config, self.optimizer, self.epochs * steps_per_epoch)
        with warnings.catch_warnings():  # stepping before any optimizer step is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.start_epoch * steps_per_epoch):
                self.scheduler.step()

    def _optimizer_step(self):
        """Unscale, clip, step, advance the schedule, and clear the gradients."""
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        """One epoch as RecBole's (the same loss sums, NaN check and DDP hooks), with accumulation, autocast, the
        scaler, clipping and the schedule."""
        if self.scheduler is None:  # called outside fit (RecBole's own tests and tools do)
            self.start_schedule(train_data)
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        total_loss, pending = None, 0
        self.optimizer.zero_grad()
        batches = tqdm(train_data, total=len(train_data), ncols=100,
                       desc=set_color(f"Train {epoch_idx:>5}", "pink")) if show_progress else train_data
        for interaction in batches:
            interaction = interaction.to(self.device)
            sync_loss = 0
            if not self.config["single_spec"]:
                self.set_reduce_hook()
                sync_loss = self.sync_grad_loss()
            with autocast(self.dtype, self.device):
                losses = loss_func(interaction)
            loss, total_loss = self._add_losses(losses, total_loss)
            self._check_nan(loss)
            self.scaler.scale((loss + sync_loss) / self.accum_steps).backward()
            pending += 1
            if pending == self.accum_steps:
                self._optimizer_step()
                pending = 0
        if pending:
            self._optimizer_step()
        return total_loss

    @staticmethod
    def _add_losses(losses, total):
        """The batch's summed loss and the epoch's running totals (a tuple per part when the model gives parts)."""
        if isinstance(losses, tuple):
            parts = tuple(part.item() for part in losses)
            return sum(losses), parts if total is None else tuple(map(sum, zip(total, parts)))
        return losses, losses.item() if total is None else total + losses.item()
