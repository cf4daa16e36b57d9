"""The callbacks on real stacks: `SharpnessTrainerCallback` in a Hugging Face ``Trainer``
fine-tuning a tiny BERT classifier and training a tiny GPT-2 language model, and
`SharpnessMonitor` in Lightning around a tiny Hugging Face vision model. Float32 models with
their default (SDPA) attention and dropout on, as users train them; nothing is downloaded.
Each run measures the Hessian (trace, top eigenvalue) and the SAM sharpness, logs them, and
trains to weights bitwise equal to those of the same run without the callback."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from sharpgen import sam_sharpness
from sharpgen.integrations import SharpnessMonitor, SharpnessTrainerCallback

MEASURES = ("loss", "trace", "top_eigenvalue", "sam")
OPTIONS = {
    "trace": {"method": "hutchinson", "num_matvecs": 3},
    "top_eigenvalue": {"tol": 1e-2},
}


def own_loss(outputs, targets):
    return outputs.loss


def bert():
    config = BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=8, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def gpt2():
    config = GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def text_rows(vocab, kind, n=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[::3, -2:] = 0
    labels = ids.clone() if kind == "lm" else torch.randint(0, 2, (n,), generator=g)
    if kind == "lm":
        labels[mask == 0] = -100
    return [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(ids, mask, labels, strict=True)
    ]


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


STACKS = {"bert": (bert, 20, "cls"), "gpt2": (gpt2, 16, "lm")}


def hf_run(tmp_path, name, with_callback):
    make, vocab, kind = STACKS[name]
    rows = text_rows(vocab, kind)
    held = collate(rows[:4])
    args = TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=4,
        learning_rate=0.05, lr_scheduler_type="constant", report_to=[], save_strategy="no",
        logging_steps=100, use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = make()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    callback = None
    if with_callback:
        callback = SharpnessTrainerCallback(
            held, every_n_steps=2, measures=MEASURES, options=OPTIONS,
            generator=torch.Generator().manual_seed(0),
        ).attach(trainer)  # fmt: skip
    trainer.train()
    return model, trainer, callback, held, initial


@pytest.mark.parametrize("name", list(STACKS))
def test_the_trainer_callback_measures_logs_and_leaves_training_as_it_was(tmp_path, name):
    model, trainer, callback, held, initial = hf_run(tmp_path, name, True)
    plain, *_ = hf_run(tmp_path, name, False)
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not torch.equal(model.state_dict()[next(iter(initial))], initial[next(iter(initial))])

    rows = [r for r in trainer.state.log_history if "sharpness/trace" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        for key in MEASURES:
            assert math.isfinite(row[f"sharpness/{key}"]), (row["step"], key)
        assert row["sharpness/sam"] >= 0
        assert row["sharpness/top_eigenvalue_converged"]
    # step 0 by hand: the initial model's own loss and SAM sharpness on the held batch
    start = type(model)(model.config)
    start.load_state_dict(initial)
    start.eval()
    with torch.no_grad():
        assert rows[0]["sharpness/loss"] == pytest.approx(float(start(**held).loss), rel=1e-6)
    sam = sam_sharpness(start, own_loss, (held, None), rho=0.05).value
    assert rows[0]["sharpness/sam"] == pytest.approx(sam, rel=1e-4, abs=1e-7)


class MemoryLogger(Logger):
    """Keeps the sharpness rows of every ``log_metrics`` call."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("sharpness/") for k in metrics):
            self.rows.append((step, dict(metrics)))


class VisionClassifier(pl.LightningModule):
    """A LightningModule around a Hugging Face ViT: ``forward(pixel_values) -> logits``."""

    def __init__(self):
        super().__init__()
        config = ViTConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
            image_size=8, patch_size=4, num_labels=3,
        )  # fmt: skip
        self.net = ViTForImageClassification(config)

    def forward(self, pixel_values):
        return self.net(pixel_values=pixel_values).logits

    def training_step(self, batch, batch_idx):
        pixel_values, labels = batch
        return F.cross_entropy(self(pixel_values), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def lightning_run(with_monitor):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=g)
    torch.manual_seed(0)
    module = VisionClassifier()
    logger, callbacks = MemoryLogger(), []
    if with_monitor:
        callbacks = [
            SharpnessMonitor(
                F.cross_entropy, (x[:4], y[:4]), every_n_steps=2, measures=MEASURES,
                options=OPTIONS, generator=torch.Generator().manual_seed(0),
            )
        ]  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=4, callbacks=callbacks, logger=logger,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, loader)
    return module, logger


def test_the_lightning_monitor_measures_logs_and_leaves_training_as_it_was():
    module, logger = lightning_run(True)
    plain, _ = lightning_run(False)
    for key, value in plain.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key
    assert [step for step, _ in logger.rows] == [0, 2, 4]
    for _, metrics in logger.rows:
        for key in MEASURES:
            assert math.isfinite(metrics[f"sharpness/{key}"]), key
        assert metrics["sharpness/sam"] >= 0
