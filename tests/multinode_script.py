"""One "node" of a multi-node run, for tests/test_multinode.py: the test starts this script once per node, each with
the environment a multi-node launch gives it (``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), and Lightning's
``LightningEnvironment`` and script launcher join the processes into one gloo group. Run without ``NODE_RANK`` and
with NODES = 1 it is the single-process reference. Each process saves what it saw, and what it wrote to disk.

Usage: python tests/multinode_script.py OUT_DIR STRATEGY MODE NODES [DEVICES]

STRATEGY is a key of ``STRATEGIES`` ("dp" or "dp_model_parallel": FSDP2, the module shards itself in
``configure_model`` and each checkpoint is a folder of per-rank shards plus rank 0's ``meta.pt``); MODE is "exact"
(q = 1, negligible noise: a deterministic update) or "poisson" (q < 1 with fixed sampling and noise seeds, Adam).
DEVICES (default 1) processes per node: ``1 2`` is one node with two processes, the same global ranks as ``2 1``.
"""

import os
import sys

import lightning as L
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import ClassifierModule, mlp  # noqa: E402

from lightning_dp import DPModelParallelStrategy, DPStrategy  # noqa: E402
from lightning_dp.journal import PrivacyJournal  # noqa: E402

#: The strategies a node can run, by the name the test passes (the test's ``STRATEGIES``).
STRATEGIES = {"dp": DPStrategy, "dp_model_parallel": DPModelParallelStrategy}

N = 40
SAMPLING_SEED = 7


class IndexedClassifier(ClassifierModule):
    """Batches are ``(x, y, index)``: the index says which examples a rank drew; the loss ignores it."""

    def configure_model(self):
        """Under ``DPModelParallelStrategy``: shard each layer with parameters, then the module (FSDP2)."""
        if not isinstance(self.trainer.strategy, DPModelParallelStrategy):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters(recurse=False)):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return super().training_step(batch[:2], batch_idx)


class Recorder(L.Callback):
    """The dataset indices of this rank's logical batch at every step."""

    def __init__(self):
        self.indices = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(sorted(batch[2].tolist()))


class CountingCheckpointIO(TorchCheckpointIO):
    """Writes as Lightning does and records, in this process, every checkpoint file it wrote."""

    def __init__(self):
        super().__init__()
        self.saved = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saved.append(os.path.basename(os.fspath(path)))
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)


def count_metadata_writes():
    """Record, in this process, every checkpoint folder whose ``meta.pt`` (the checkpoint without the model's and
    optimizer's shards: progress, callbacks, the privacy state) it wrote: ``ModelParallelStrategy`` writes it with
    ``torch.save``, and uses no ``CheckpointIO``.
    """
    saved = []
    save = torch.save

    def counted(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.basename(os.fspath(f)) == _METADATA_FILENAME:
            saved.append(os.path.basename(os.path.dirname(os.fspath(f))))
        return save(obj, f, *args, **kwargs)

    torch.save = counted
    return saved


def whole(p):
    """A parameter as one tensor (a sharded one gathered from every rank: a collective)."""
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def count_journal_writes():
    """Record, in this process, every creation, opening and appended line of a privacy journal."""
    calls = []

    def counted(name, fn):
        def inner(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return inner

    PrivacyJournal.create = staticmethod(counted("create", PrivacyJournal.create))  # bound classmethods
    PrivacyJournal.open = staticmethod(counted("open", PrivacyJournal.open))
    PrivacyJournal._append = counted("append", PrivacyJournal._append)
    return calls


def options(mode):
    """The strategy's arguments, the per-device batch size for a global B, the optimizer and the step count."""
    if mode == "exact":  # q = 1 and negligible noise: the update is deterministic
        strategy = {"noise_multiplier": 1e-7, "max_grad_norm": 0.5, "max_physical_batch_size": 3}
        return strategy, N, "sgd", 3
    strategy = {
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "max_physical_batch_size": 2,
        "sampling_seed": SAMPLING_SEED,
        "noise_seed": 0,
    }
    return strategy, 10, "adam", 4


def main():
    out, kind, mode, nodes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    devices = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    tag = f"{nodes}n" + (f"{devices}d" if devices > 1 else "")
    run_dir = os.path.join(out, f"{mode}-{tag}")
    journal_calls = count_journal_writes()
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(N, 10, generator=g), torch.randint(0, 3, (N,), generator=g), torch.arange(N))
    strategy_options, global_batch, optimizer, steps = options(mode)
    net = mlp()
    model = IndexedClassifier(net, lr=0.1 if optimizer == "sgd" else 0.01, optimizer=optimizer)
    strategy = STRATEGIES[kind](journal_dir=os.path.join(run_dir, "journal"), **strategy_options)
    recorder = Recorder()
    if kind == "dp":
        io = CountingCheckpointIO()
        plugins, written = [io], io.saved
    else:  # each rank writes its shards (torch.distributed.checkpoint), global rank 0 the metadata
        plugins, written = [], count_metadata_writes()
    checkpoints = ModelCheckpoint(dirpath=os.path.join(run_dir, "ckpt"), every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=nodes,
        strategy=strategy,
        plugins=plugins,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder, checkpoints],
        default_root_dir=run_dir,
    )
    before = [p.detach().clone() for p in net.parameters()]
    trainer.fit(model, DataLoader(ds, batch_size=global_batch // (nodes * devices), shuffle=True))
    torch.save(
        {
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "before": before,
            "after": [whole(p) for p in net.parameters()],
            "indices": recorder.indices,
            "ledger": strategy.ledger.state_dict(),
            "epsilon": strategy.epsilon,
            "sample_rate": strategy.sample_rate,
            "global_step": trainer.global_step,
            "journal_calls": journal_calls,
            "checkpoints_written": written,
        },
        os.path.join(out, f"{kind}-{mode}-{tag}-rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
