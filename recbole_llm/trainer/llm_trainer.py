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
  in ``llm_modules()``.
- ``llm_sharding: fsdp`` (multi-process runs): torch FSDP2 (``fully_shard``) in place of RecBole's DDP. Each decoder
  layer of those LLMs (their ``_no_split_modules``) is a unit and each LLM one more, so that a rank holds 1/world of
  every LLM weight and gathers one layer at a time; the small rest stays replicated. Checkpoints hold the full state dict (rank 0
  writes it), so a sharded run's checkpoint reloads in one process. A single-process run ignores the key.

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

from recbole_llm.utils import RecBoleLLMError, atomic_target, config_choice, read_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULERS = ("constant", "linear", "cosine")
SHARDING = ("none", "fsdp")


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


def llm_modules(model, key):
    """``model.llm_modules()``, the Hugging Face LLMs inside the model; an error naming ``key`` when there are none."""
    modules = getattr(model, "llm_modules", lambda: [])()
    if not modules:
        raise RecBoleLLMError(f"{key} is set but {type(model).__name__} has no LLM that supports it; turn {key} off.")
    return modules


def enable_gradient_checkpointing(model):
    """Turn on non-reentrant gradient checkpointing in each LLM of ``model.llm_modules()``: transformers' activation
    checkpointing, or, in the transformers versions before that name, its gradient checkpointing (now deprecated)."""
    for module in llm_modules(model, "llm_gradient_checkpointing"):
        if hasattr(module, "activation_checkpointing_enable"):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard(model):
    """FSDP2 over the LLMs of ``model``: one unit per decoder layer (their ``_no_split_modules``) and one per LLM for
    the rest of it, except its input embedding, which stays replicated because the models call it outside the LLM's
    forward. The small rest of the model (adapters, heads, scalars) is replicated too; ``average_replicated_gradients``
    keeps the replicas equal. Returns ``(units, replicated trainable parameters)``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    with torch.no_grad():  # RecBole seeds each rank differently; start from rank 0's weights, as DDP does
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor, src=0)
    units = 0
    for llm in llm_modules(model, "llm_sharding"):
        embedding = set(llm.get_input_embeddings().parameters())
        for layer in list(llm.modules()):
            if type(layer).__name__ in (llm._no_split_modules or ()) and embedding.isdisjoint(layer.parameters()):
                fully_shard(layer)
                units += 1
        fully_shard(llm, ignored_params=embedding)
        units += 1
    replicated = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    return units, replicated


def average_replicated_gradients(parameters):
    """The mean over the ranks of each replicated parameter's gradient (FSDP reduces only its own units)."""
    world = torch.distributed.get_world_size()
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)  # a rank whose batch skipped it still takes part
        torch.distributed.all_reduce(parameter.grad)
        parameter.grad /= world


def clip_sharded_gradients(parameters, max_norm):
    """``clip_grad_norm_`` over sharded and replicated parameters together, which torch's refuses to mix: the global
    norm is the root of the two groups' squared norms (the sharded one summed over the ranks)."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import get_total_norm

    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    squares = 0.0
    if sharded:
        squares += get_total_norm(sharded).full_tensor().item() ** 2
    if replicated:
        squares += get_total_norm(replicated).item() ** 2
    coefficient = min(1.0, max_norm / (squares ** 0.5 + 1e-6))  # torch's own epsilon
    for grad in grads:
        grad.mul_(coefficient)


class LLMTrainer(Trainer):
    """RecBole's Trainer with the training control of the module docstring; evaluation is RecBole's."""

    def __init__(self, config, model):
        self.sharded = not config["single_spec"] and config_choice(config, "llm_sharding", SHARDING) == "fsdp"
        if self.sharded:  # FSDP replaces RecBole's DDP wrapper: build the trainer as for one process, then shard
            config["single_spec"] = True
            try:
                super().__init__(config, model)
            finally:
                config["single_spec"] = False
            units, self.replicated = shard(model)
            self.logger.info(f"llm_sharding fsdp: {units} units over {torch.distributed.get_world_size()} ranks, "
                             f"{len(self.replicated)} replicated parameters")
            self.optimizer = self._build_optimizer()  # over the sharded parameters
        else:
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
        if self.sharded:
            average_replicated_gradients(self.replicated)
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            if self.sharded:
                clip_sharded_gradients(self.model.parameters(), self.max_grad_norm)
            else:
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
            if not self.config["single_spec"] and not self.sharded:  # RecBole's DDP hooks; FSDP reduces itself
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

    # --- checkpoints of a sharded run: the full state dict, gathered from every rank, written by rank 0 -----------
    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.sharded:
            return super()._save_checkpoint(epoch, verbose=verbose, **kwargs)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)  # collective
        kept = self.model.state_dict().keys()  # the model's own choice (SLMRec and RecLoRA keep what trains)
        model_state = {key: value for key, value in model_state.items() if key in kept}
        if torch.distributed.get_rank() != 0:
            return
        target = kwargs.get("saved_model_file", self.saved_model_file)
        with atomic_target(target) as temporary:
            torch.save({"config": self.config, "epoch": epoch, "cur_step": self.cur_step,
                        "best_valid_score": self.best_valid_score, "state_dict": model_state,
                        "other_parameter": self.model.other_parameter(), "optimizer": optimizer_state},
                       temporary, pickle_protocol=4)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {target}")

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if self.sharded and load_best_model:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            checkpoint = read_checkpoint(model_file or self.saved_model_file, "the best-model checkpoint",
                                         "rerun the training")
            set_model_state_dict(self.model, checkpoint["state_dict"],
                                 options=StateDictOptions(full_state_dict=True, strict=False))  # torch adds the frozen keys
            load_best_model = False
        return super().evaluate(eval_data, load_best_model, model_file, show_progress)

    def resume_checkpoint(self, resume_file):
        if self.sharded:
            raise RecBoleLLMError("resuming a run with llm_sharding: fsdp is not supported; start it again, or "
                                  "resume without sharding.")
        return super().resume_checkpoint(resume_file)

    @staticmethod
    def _add_losses(losses, total):
        """The batch's summed loss and the epoch's running totals (a tuple per part when the model gives parts)."""
        if isinstance(losses, tuple):
            parts = tuple(part.item() for part in losses)
            return sum(losses), parts if total is None else tuple(map(sum, zip(total, parts)))
        return losses, losses.item() if total is None else total + losses.item()
