"""One run, two stages: switch from stage 1 (single ID) to stage 2 (multi ID) at a configured step."""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

log = logging.getLogger(__name__)


class StageSwitch(L.Callback):
    """At the end of the first training epoch whose global step is >= `at_step` (in its last batch's
    `on_train_batch_end`): the module moves to
    stage 2 (routers + multi-ID LoRA trainable, ID embedding frozen), the optimizer is rebuilt with
    stage-2 parameter groups, and the DataModule moves to multi-identity data (`multi_id_shards`),
    which the next epoch's dataloader uses (`trainer.reload_dataloaders_every_n_epochs: 1`).

    Switching at an epoch boundary keeps the data stream consistent with checkpoints: a resume on
    either side of the switch restores the stage from the module's checkpoint section and the data
    mode from the DataModule's state.
    """

    def __init__(self, at_step: int, multi_id_shards: str | None = None) -> None:
        if at_step < 0:
            raise ValueError(f"StageSwitch.at_step must be >= 0, got {at_step}")
        self.at_step = at_step
        self.multi_id_shards = multi_id_shards

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "StageSwitch needs `trainer.reload_dataloaders_every_n_epochs: 1` so the next epoch "
                f"loads multi-identity data (got {trainer.reload_dataloaders_every_n_epochs})"
            )
        if trainer.datamodule is None or not hasattr(trainer.datamodule, "set_multi_id"):
            raise ValueError("StageSwitch needs a DataModule with set_multi_id()")
        if type(trainer.strategy) not in (SingleDeviceStrategy, DDPStrategy):
            raise ValueError(f"StageSwitch supports the single-device and DDP strategies, not "
                             f"{type(trainer.strategy).__name__}: train stage 1, then start stage 2 from its "
                             "checkpoint (configs/stage2.yaml, model.init_from)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Switch at the end of the epoch's last batch, not in on_train_epoch_end: ModelCheckpoint runs
        # after this hook, so a step checkpoint of that batch already holds stage 2. (A resume from a
        # checkpoint written after an epoch's last batch skips that epoch's on_train_epoch_end.)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.switch(trainer, pl_module)

    def switch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.stage != 1 or trainer.global_step < self.at_step:
            return
        log.info("stage switch at step %d: stage 1 -> stage 2", trainer.global_step)
        pl_module.configure_stage(2)
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and strategy.model is not pl_module:
            # DDP averages the gradients of the parameters that were trainable when it wrapped the module:
            # wrap it again, so the new routers and multi-ID LoRA are averaged too and start from rank 0's
            # values (DDP broadcasts them; each rank initialised its routers with its own seed).
            strategy.model = pl_module
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)
        trainer.datamodule.set_multi_id(True, self.multi_id_shards)
        if trainer.is_global_zero:
            print(f"[stage switch] step {trainer.global_step}: now stage 2 (router + multi-ID LoRA)", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"at_step": self.at_step}
