"""Hugging Face Transformers: the callback logs what the measures give by hand and changes
nothing the trainer sees; SAMTrainer makes the bare loop's SAM / m-SAM updates. Tiny models
built from configs: nothing is downloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from sharpgen import GSAM, SAM, hessian_trace, sam_sharpness
from sharpgen.curvature import ModelObjective
from sharpgen.integrations import SAMTrainer, SharpnessTrainerCallback


def output_loss(outputs, targets):
    return outputs.loss


def gpt2(seed=0):
    config = GPT2Config(
        vocab_size=12, n_positions=6, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager",  # the CPU SDPA kernel has no second derivative
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).double()


def tokens(n=16, seed=0):
    ids = torch.randint(0, 12, (n, 6), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": t, "labels": t} for t in ids]


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def arguments(tmp_path, **overrides):
    kwargs = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 0.05,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 100,
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class Sequential:
    """Take the batches in order (so a bare loop can replay them)."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class SequentialTrainer(Sequential, Trainer):
    pass


class SequentialSAMTrainer(Sequential, SAMTrainer):
    pass


class Snapshots(TrainerCallback):
    """Keeps a copy of the model after every optimizer step (runs after the sharpness one)."""

    def __init__(self):
        self.models = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.models[state.global_step] = copy.deepcopy(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.models[state.global_step] = copy.deepcopy(model)


class Seen(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def test_logged_metrics_equal_the_measures_by_hand_at_the_same_steps(tmp_path):
    data = tokens()
    held = collate(data[:4])
    model = gpt2()
    trainer = SequentialTrainer(
        model=model, args=arguments(tmp_path), train_dataset=data, data_collator=collate,
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.05), None),
    )  # fmt: skip
    callback = SharpnessTrainerCallback(
        held, every_n_steps=2, measures=("loss", "trace", "sam"),
        options={"trace": {"method": "hutchinson", "num_matvecs": 4}},
        generator=torch.Generator().manual_seed(0),
    ).attach(trainer)  # fmt: skip
    snapshots, seen = Snapshots(), Seen()
    trainer.add_callback(snapshots)
    trainer.add_callback(seen)
    trainer.train()

    logged = [(step, logs) for step, logs in seen.logs if "sharpness/loss" in logs]
    assert [step for step, _ in logged] == [0, 2, 4]
    hand_gen = torch.Generator().manual_seed(0)
    batch = (held, None)
    for step, logs in logged:
        net = snapshots.models[step]
        trace = hessian_trace(
            net, output_loss, batch, method="hutchinson", num_matvecs=4, generator=hand_gen
        )
        assert logs["sharpness/loss"] == float(ModelObjective(net, output_loss, batch).loss())
        assert logs["sharpness/trace"] == trace.value
        assert logs["sharpness/trace_stderr"] == trace.stderr
        assert logs["sharpness/sam"] == sam_sharpness(net, output_loss, batch, 0.05).value
    assert [r["step"] for r in trainer.state.log_history if "sharpness/sam" in r] == [0, 2, 4]
    assert callback.tracker.to_dataframe().index.tolist() == [0, 2, 4]


def run_with_dropout(tmp_path, with_callback):
    data = tokens()
    config = BertConfig(
        vocab_size=12,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=2,
    )  # fmt: skip  (dropout 0.1: training draws from the global RNG)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    rows = [{"input_ids": r["input_ids"], "labels": r["input_ids"][0] % 2} for r in data]
    trainer = Trainer(
        model=model, args=arguments(tmp_path, max_steps=3), train_dataset=rows,
        data_collator=collate,
    )  # fmt: skip
    callback = None
    if with_callback:
        loader = trainer.get_train_dataloader()  # a shuffled loader as the data
        callback = SharpnessTrainerCallback(
            loader, every_n_steps=1, measures=("loss", "average"),
            options={"average": {"num_samples": 2}},  # global RNG: no generator
        )  # fmt: skip
        trainer.add_callback(callback)
    model.zero_grad()
    trainer.train()
    return model, callback


def test_the_trainer_sees_the_same_run_with_and_without_the_callback(ih, tmp_path):
    with_cb, callback = run_with_dropout(tmp_path, True)
    without, _ = run_with_dropout(tmp_path, False)
    assert len(callback.tracker.history) == 4
    ih.assert_same_snapshot(ih.snapshot(with_cb), ih.snapshot(without))


def test_a_measurement_leaves_the_model_as_it_was(ih):
    model = gpt2()
    batch = collate(tokens(4))
    model(**batch).loss.backward()
    model.transformer.h[0].eval()
    model.lm_head.weight.requires_grad_(False)  # tied to the embedding: both frozen
    before = ih.snapshot(model)
    callback = SharpnessTrainerCallback(batch, every_n_steps=3, measures=("loss", "sam"))
    state = type("State", (), {"global_step": 3, "epoch": 0.5, "log_history": []})()
    rng = torch.get_rng_state()
    callback.on_step_end(None, state, None, model=model)
    assert state.log_history[0]["step"] == 3 and "sharpness/sam" in state.log_history[0]
    ih.assert_same_snapshot(before, ih.snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())
    callback.on_step_end(None, type(state)(), None, model=model)  # same step: not twice
    assert len(callback.tracker.history) == 1


def bare_sam(model, make_optimizer, data, batch_size, accumulation):
    """SAM.step(closure) (accumulation 1) or SAM.accumulate per micro-batch, in order."""
    opt = make_optimizer(model)
    model.train()
    micro = [collate(data[i : i + batch_size]) for i in range(0, len(data), batch_size)]
    for start in range(0, len(micro), accumulation):
        group = micro[start : start + accumulation]
        # the Trainer's loss: summed over the group's tokens, divided by their count
        count = sum(int(b["labels"].numel()) for b in group)
        for batch in group:

            def closure(batch=batch, count=count):
                opt.zero_grad()
                loss = model(**batch, num_items_in_batch=torch.tensor(count)).loss
                loss.backward()
                return loss

            if accumulation == 1:
                opt.step(closure)
            else:
                opt.accumulate(closure)
        if accumulation > 1:
            opt.step()
    return model


SAM_KINDS = {
    "sam": lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.05),
    "gsam": lambda m: GSAM(
        m.parameters(), torch.optim.SGD, rho_max=0.05, rho_min=0.05, alpha=0.2, lr=0.05,
        lr_min=0.05,
    ),
}  # fmt: skip


@pytest.mark.parametrize(("kind", "accumulation"), [("sam", 1), ("gsam", 1), ("sam", 2)])
def test_sam_trainer_equals_the_bare_loop(ih, tmp_path, kind, accumulation):
    data = tokens(16)
    model = gpt2()
    trainer = SequentialSAMTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=2, gradient_accumulation_steps=accumulation),
        train_dataset=data, data_collator=collate,
        optimizers=(SAM_KINDS[kind](model), None),
    )  # fmt: skip
    trainer.train()
    bare = bare_sam(gpt2(), SAM_KINDS[kind], data[: 8 * accumulation], 4, accumulation)
    a, b = ih.snapshot(model), ih.snapshot(bare)
    for key in a["state"]:
        torch.testing.assert_close(a["state"][key], b["state"][key], rtol=1e-10, atol=1e-12)


def test_sam_trainer_rejects_a_plain_optimizer_when_built(tmp_path):
    model = gpt2()
    common = dict(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=tokens(4),
                  data_collator=collate)  # fmt: skip
    with pytest.raises(TypeError, match="SAM-family optimizer.*got no optimizer"):
        SAMTrainer(**common)
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match="SAM-family optimizer.*got AdamW"):
        SAMTrainer(**common, optimizers=(adam, None))
    with pytest.raises(TypeError, match="SAM-family optimizer.*got AdamW"):
        SAMTrainer(**common, optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-3}))

    class OwnOptimizer(SAMTrainer):  # its own create_optimizer: checked at the first step
        def create_optimizer(self, model=None):
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
            return self.optimizer

    trainer = OwnOptimizer(**common)
    with pytest.raises(TypeError, match="SAMTrainer needs a SAM-family optimizer"):
        trainer.train()
    with pytest.raises(ValueError, match="exactly one of every_n_steps"):
        SharpnessTrainerCallback(tokens(1)[0])
    with pytest.raises(TypeError, match="trainer must be a transformers.Trainer"):
        SharpnessTrainerCallback(collate(tokens(2)), every_n_steps=1).attach(object())


def test_epoch_schedule():
    model = gpt2()
    callback = SharpnessTrainerCallback(collate(tokens(4)), every_n_epochs=2, measures=("loss",))
    for step, epoch in ((4, 1.0), (8, 2.0), (12, 3.0), (16, 4.0)):
        state = type("State", (), {"global_step": step, "epoch": epoch, "log_history": []})()
        callback.on_step_end(None, state, None, model=model)  # not on the step schedule
        callback.on_epoch_end(None, state, None, model=model)
    assert [r["step"] for r in callback.tracker.history] == [8, 16]
