"""SLMRecTrainer: RecBole's trainer, plus SLMRec's offline distillation from a frozen deeper teacher.

SLMRec (Xu et al., ICLR 2025). With ``slmrec_distill: True`` each step runs the teacher (an SLMRec checkpoint,
``slmrec_teacher_checkpoint``) in eval mode under ``no_grad`` and adds, over ``slmrec_distill_blocks`` blocks b of the
last-token states (block i ends at layer ``(L // b) * i`` of the student and of the teacher):

- ``slmrec_cos_weight`` λ1 · Σ_i mean_batch(1 − cos(h_s,i, h_t,i));
- ``slmrec_l2_weight`` λ2 · Σ_i mean_batch ‖h_s,i − h_t,i‖₂;
- ``slmrec_ms_weight`` λ3 · Σ_{i<b} CE of the student's extra head on block i (multiple supervision).

A term with weight 0 is neither computed nor logged; each other term is logged on its own after the student's CE.
Without ``slmrec_distill`` it is the shared ``LLMTrainer`` alone (the teacher, or a student trained alone).
"""
import torch
import torch.nn.functional as F
from recbole.utils import set_color

from recbole_llm.model.sequential_recommender.slmrec import SLMRec, block_layers
from recbole_llm.trainer.llm_trainer import LLMTrainer
from recbole_llm.utils import RecBoleLLMError, read_checkpoint


def cosine_distance(student, teacher):
    """Mean over the batch of ``1 − cos`` between the rows of two ``[B, d]`` tensors."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def l2_distance(student, teacher):
    """Mean over the batch of the Euclidean distance between the rows of two ``[B, d]`` tensors."""
    return (student - teacher).norm(dim=-1).mean()


def _refuse(path, what, fix):
    raise RecBoleLLMError(f"slmrec_teacher_checkpoint '{path}': {what}; {fix}")


def load_teacher(config, student):
    """The frozen teacher of ``student``: the SLMRec of ``slmrec_teacher_checkpoint``, checked against the student
    (model, dataset, item table, hidden size, and ``slmrec_distill_blocks`` dividing its depth), in eval mode on the
    student's device, without gradients."""
    path = config["slmrec_teacher_checkpoint"]
    if not path:
        raise RecBoleLLMError("slmrec_distill needs slmrec_teacher_checkpoint: the .pth of a deeper SLMRec run on "
                              "this dataset (train it first with slmrec_distill: False).")
    checkpoint = read_checkpoint(path, "slmrec_teacher_checkpoint",
                                 "pass the .pth file the SLMRec teacher run saved in its checkpoint_dir")
    teacher_config, state = checkpoint["config"], checkpoint["state_dict"]
    if teacher_config["model"] != "SLMRec":
        _refuse(path, f"it holds a {teacher_config['model']}, not an SLMRec", "pass an SLMRec checkpoint")
    if teacher_config["dataset"] != config["dataset"]:
        _refuse(path, f"it was trained on dataset '{teacher_config['dataset']}', the student on '{config['dataset']}'",
                "train the teacher on the student's dataset")
    table = state["item_table.weight"]
    if table.shape != student.item_table.weight.shape or not torch.equal(table, student.item_table.weight.cpu()):
        _refuse(path, "its item table differs from the student's", "give both the same slmrec_item_emb_checkpoint")
    teacher_config["device"] = config["device"]
    teacher = SLMRec(teacher_config, student.dataset, item_table=table)
    teacher.load_state_dict(state)
    if teacher.hidden_size != student.hidden_size:
        _refuse(path, f"its hidden size is {teacher.hidden_size}, the student's {student.hidden_size}",
                "use the same backbone family for both")
    block_layers(teacher.n_layers, config["slmrec_distill_blocks"])  # the blocks must divide the teacher too
    teacher.requires_grad_(False)
    return teacher.to(config["device"]).eval()


class SLMRecTrainer(LLMTrainer):
    """The LLM training control (clipping, schedule, dtype, accumulation); with ``slmrec_distill`` the loss is SLMRec's (see the module docstring)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.teacher = None
        self.loss_names = ("ce",)
        if not config["slmrec_distill"]:
            if config["slmrec_teacher_checkpoint"]:
                raise RecBoleLLMError("slmrec_teacher_checkpoint is set but slmrec_distill is False; set "
                                      "slmrec_distill: True to distill, or remove the teacher checkpoint.")
            return
        self.weights = {"cos": config["slmrec_cos_weight"], "l2": config["slmrec_l2_weight"],
                        "ms": config["slmrec_ms_weight"]}
        if not any(self.weights.values()):
            raise RecBoleLLMError("slmrec_distill is True but slmrec_cos_weight, slmrec_l2_weight and "
                                  "slmrec_ms_weight are all 0; give one a weight, or set slmrec_distill: False.")
        if self.weights["ms"] and not model.ms_heads:
            raise RecBoleLLMError("slmrec_ms_weight > 0 needs intermediate blocks, but slmrec_distill_blocks is 1; "
                                  "use more blocks or set slmrec_ms_weight: 0.")
        self.teacher = load_teacher(config, model)
        self.teacher_blocks = block_layers(self.teacher.n_layers, config["slmrec_distill_blocks"])
        self.loss_names = ("ce",) + tuple(name for name, weight in self.weights.items() if weight)

    def distillation_losses(self, interaction):
        """``(CE, then λ·term for each enabled term)`` of one batch, in ``loss_names`` order."""
        student = self.model
        item_seq, item_seq_len = interaction[student.ITEM_SEQ], interaction[student.ITEM_SEQ_LEN]
        targets = interaction[student.POS_ITEM_ID]
        states = student.layer_states(item_seq, item_seq_len)
        losses = {"ce": student.rec_loss(states[-1], targets)}
        if self.weights["cos"] or self.weights["l2"]:
            with torch.no_grad():
                teacher_states = self.teacher.layer_states(item_seq, item_seq_len)
            pairs = [(states[s], teacher_states[t]) for s, t in zip(student.blocks, self.teacher_blocks)]
            for name, distance in (("cos", cosine_distance), ("l2", l2_distance)):
                if self.weights[name]:
                    losses[name] = self.weights[name] * sum(distance(s, t) for s, t in pairs)
        if self.weights["ms"]:
            losses["ms"] = self.weights["ms"] * student.multi_supervision_loss(states, targets)
        return tuple(losses[name] for name in self.loss_names)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self.teacher is not None and loss_func is None:
            loss_func = self.distillation_losses
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def _generate_train_loss_output(self, epoch_idx, s_time, e_time, losses):
        """RecBole's line, with each distillation term under its own name."""
        if not isinstance(losses, tuple):
            return super()._generate_train_loss_output(epoch_idx, s_time, e_time, losses)
        places = self.config["loss_decimal_place"] or 4
        terms = ", ".join(set_color(f"train_{name}", "blue") + f": {value:.{places}f}"
                          for name, value in zip(self.loss_names, losses))
        return set_color(f"epoch {epoch_idx} training", "green") + " [" + set_color("time", "blue") + \
            f": {e_time - s_time:.2f}s, {terms}]"
