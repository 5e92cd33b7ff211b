"""A training process that crashes, and one that resumes it: run by tests/test_privacy_paths.py.

Usage: python tests/resume_script.py OUT_DIR crash
       python tests/resume_script.py OUT_DIR resume STEP POLICY
"""

import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import ClassifierModule, mlp, tensor_data  # noqa: E402

from lightning_dp import DPStrategy  # noqa: E402


class CheckpointsThenCrash(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step in (3, 6):
            trainer.save_checkpoint(os.path.join(self.out, f"step{trainer.global_step}.ckpt"))
        if trainer.global_step == 8:
            os._exit(17)  # killed: no teardown, no final checkpoint


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    L.seed_everything(0)
    kw = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    data = DataLoader(tensor_data(), batch_size=20)
    if mode == "crash":
        trainer = L.Trainer(
            strategy=DPStrategy(noise_multiplier=1.0), max_steps=20, callbacks=[CheckpointsThenCrash(out)], **kw
        )
        trainer.fit(ClassifierModule(mlp()), data)
        return
    step, policy = sys.argv[3], sys.argv[4]
    strategy = DPStrategy(noise_multiplier=1.0, resume_policy=policy)
    trainer = L.Trainer(strategy=strategy, max_steps=10, **kw)
    trainer.fit(ClassifierModule(mlp()), data, ckpt_path=os.path.join(out, f"step{step}.ckpt"))
    print(f"ledger_steps={strategy.ledger.steps} global_step={trainer.global_step}")
    torch.save({}, os.path.join(out, "done.pt"))


if __name__ == "__main__":
    main()
