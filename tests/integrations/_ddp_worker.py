"""A rank of the Lightning DDP test (launched like torchrun: RANK, WORLD_SIZE, LOCAL_RANK, ...).

``python _ddp_worker.py OUTDIR``: trains a tiny regressor for 2 steps with
``Trainer(strategy="ddp", devices=2)`` and a `SharpnessMonitor` that measures every 2 steps on
this rank's half of a held batch; writes the monitor's history and the final parameters to
``OUTDIR/rank{RANK}.pt``.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sharpgen.integrations import SharpnessMonitor


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def build_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return x, torch.sin(x[:, :1])


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_model()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(outdir: str) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    x, y = build_data()
    held = (x[rank::world], y[rank::world])  # this rank's shard of the held batch
    monitor = SharpnessMonitor(
        nn.functional.mse_loss, held, every_n_steps=2, measures=("loss", "trace"), module="net"
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy="ddp", max_steps=2, callbacks=[monitor],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )  # fmt: skip
    module = Regressor()
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    torch.save(
        {"history": monitor.tracker.history, "final": module.net.state_dict()},
        os.path.join(outdir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
