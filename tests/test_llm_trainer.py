"""The shared LLM training control (recbole_llm.trainer.llm_trainer): each key changes what it says it does."""
import math

import pytest
import torch
from recbole.data import data_preparation

from recbole_llm.trainer.llm_trainer import LLMTrainer, build_scheduler, compute_dtype
from recbole_llm.utils import RecBoleLLMError


def sasrec_trainer(tiny, **overrides):
    """A LLMTrainer over a dropout-free SASRec of the tiny dataset, and 8 of its training rows."""
    from recbole_llm.config import Config
    from recbole_llm.utils import create_dataset, get_model

    config_dict, _ = tiny
    config = Config(model="SASRec", dataset="test", config_dict={
        **config_dict, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "train_neg_sample_args": None,
        "loss_type": "CE", "learning_rate": 0.01, "llm_max_grad_norm": None, **overrides})
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    torch.manual_seed(0)
    model = get_model("SASRec")(config, train_data._dataset)
    rows = train_data._dataset.inter_feat[torch.arange(8)]
    return LLMTrainer(config, model), rows


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


def test_accumulation_equals_one_step_on_the_joined_batch(tiny):
    # SGD, whose update scales with the gradient (Adam's would hide a missing division by the window).
    accumulated, rows = sasrec_trainer(tiny, llm_grad_accum_steps=2, learner="sgd", learning_rate=1.0)
    joined, _ = sasrec_trainer(tiny, learner="sgd", learning_rate=1.0)
    assert all(torch.equal(a, b) for a, b in zip(parameters(accumulated.model), parameters(joined.model)))
    halves = [rows[torch.arange(0, 4)], rows[torch.arange(4, 8)]]
    for trainer, batches in ((accumulated, halves), (joined, [rows])):
        trainer.start_schedule(batches)
        trainer._train_epoch(batches, 0)
    before = parameters(sasrec_trainer(tiny)[0].model)
    after_acc, after_joined = parameters(accumulated.model), parameters(joined.model)
    assert any(not torch.equal(a, b) for a, b in zip(before, after_joined))  # the step did move the weights
    for a, b in zip(after_acc, after_joined):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_one_update_per_accumulation_window_and_one_for_the_remainder(tiny):
    trainer, rows = sasrec_trainer(tiny, llm_grad_accum_steps=2)
    batches = [rows[torch.arange(i, i + 2)] for i in range(0, 6, 2)]  # 3 batches: one full window, one remainder
    steps = []
    trainer.optimizer.register_step_post_hook(lambda *args: steps.append(1))
    trainer.start_schedule(batches)
    trainer._train_epoch(batches, 0)
    assert len(steps) == 2 == trainer.optimizer_steps(batches)


def gradient_norms_at_steps(trainer, rows):
    """The global gradient norm the optimizer sees at each of its steps."""
    norms = []

    def record(optimizer, *args):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
    trainer.optimizer.register_step_pre_hook(record)
    trainer.start_schedule([rows])
    trainer._train_epoch([rows], 0)
    return norms


def test_clipping_bounds_the_gradient_norm(tiny):
    unclipped = gradient_norms_at_steps(*sasrec_trainer(tiny))
    clipped = gradient_norms_at_steps(*sasrec_trainer(tiny, llm_max_grad_norm=0.05))
    assert unclipped[0] > 0.05
    assert clipped[0] == pytest.approx(0.05, rel=1e-4)


class OneParameter:
    """The smallest optimizer a scheduler can drive, at learning rate 1."""

    def __init__(self):
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    def rates(self, config, total, steps):
        scheduler = build_scheduler(config, self.optimizer, total)
        rates = []
        for _ in range(steps):
            rates.append(self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()
            scheduler.step()
        return rates


def schedule_config(name, warmup_steps=None, warmup_ratio=0.0):
    return {"llm_lr_scheduler": name, "llm_warmup_steps": warmup_steps, "llm_warmup_ratio": warmup_ratio}


def test_schedules_give_the_expected_rates():
    cosine = OneParameter().rates(schedule_config("cosine", warmup_steps=2), total=10, steps=10)
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert cosine == pytest.approx(expected)
    linear = OneParameter().rates(schedule_config("linear"), total=4, steps=4)
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25])
    ratio = OneParameter().rates(schedule_config("constant", warmup_ratio=0.25), total=8, steps=4)
    assert ratio == pytest.approx([0.0, 0.5, 1.0, 1.0])  # 25% of 8 steps = 2 warm-up steps
    assert OneParameter().rates(schedule_config("constant"), total=3, steps=3) == [1.0, 1.0, 1.0]


def test_schedule_spans_the_run_and_resumes_where_it_stopped(tiny):
    trainer, rows = sasrec_trainer(tiny, llm_lr_scheduler="linear", epochs=2, llm_grad_accum_steps=2)
    batches = [rows[torch.arange(i, i + 2)] for i in range(0, 8, 2)]  # 2 optimizer steps per epoch, 4 in the run
    trainer.start_schedule(batches)
    trainer._train_epoch(batches, 0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 2 / 4)
    resumed, _ = sasrec_trainer(tiny, llm_lr_scheduler="linear", epochs=2, llm_grad_accum_steps=2)
    resumed.start_epoch = 1
    resumed.start_schedule(batches)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 2 / 4)


def test_autocast_dtype_reaches_the_loss(tiny):
    trainer, rows = sasrec_trainer(tiny, llm_dtype="bf16")
    seen = []

    def loss(interaction):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return trainer.model.calculate_loss(interaction)
    trainer.start_schedule([rows])
    trainer._train_epoch([rows], 0, loss_func=loss)
    assert seen == [(True, torch.bfloat16)]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights


def test_fp16_trains_through_a_grad_scaler(tiny):
    trainer, rows = sasrec_trainer(tiny, llm_dtype="fp16")
    assert trainer.scaler.is_enabled()
    before = parameters(trainer.model)
    trainer.start_schedule([rows])
    loss = trainer._train_epoch([rows], 0)
    assert math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, parameters(trainer.model)))
    assert not sasrec_trainer(tiny, llm_dtype="bf16")[0].scaler.is_enabled()


def test_auto_dtype_is_fp32_on_a_cpu():
    assert compute_dtype({"llm_dtype": "auto", "device": torch.device("cpu")}) == torch.float32
    assert compute_dtype({"llm_dtype": "auto", "device": torch.device("cuda")}) == torch.bfloat16


@pytest.mark.parametrize("overrides, message", [
    ({"llm_grad_accum_steps": 0}, "llm_grad_accum_steps must be at least 1"),
    ({"enable_amp": True}, "enable_amp"),
    ({"clip_grad_norm": {"max_norm": 1.0}, "llm_max_grad_norm": 1.0}, "clip_grad_norm"),
    ({"llm_dtype": "half"}, "llm_dtype"),
    ({"llm_gradient_checkpointing": True}, "SASRec has no LLM"),
])
def test_bad_training_keys_are_refused(tiny, overrides, message):
    with pytest.raises(RecBoleLLMError, match=message):
        sasrec_trainer(tiny, **overrides)


def test_bad_schedule_keys_are_refused(tiny):
    trainer, rows = sasrec_trainer(tiny, llm_lr_scheduler="step")
    with pytest.raises(RecBoleLLMError, match="llm_lr_scheduler"):
        trainer.start_schedule([rows])
    trainer, rows = sasrec_trainer(tiny, llm_warmup_steps=2, llm_warmup_ratio=0.1)
    with pytest.raises(RecBoleLLMError, match="llm_warmup_steps or llm_warmup_ratio"):
        trainer.start_schedule([rows])
