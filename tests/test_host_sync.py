"""The training hot paths (pretraining, autoencoder, both fine-tuning loops) never wait for the
device, checked on CPU.

On a GPU, ``.item()``, ``bool(t)``, ``nonzero`` and boolean indexing stall the host until the
device catches up; the training loop must do none between log intervals. A CPU run cannot see the
stall, but it can see the operators that cause it: ``RecordOps`` records every aten call, and
the tests count the host-reading ones. (A ``.cpu()`` of a CPU tensor dispatches nothing, so
device-to-host copies are left to the CUDA test with ``torch.cuda.set_sync_debug_mode`` in
tests/test_perturbations.py.) The ``torch.compile`` path is checked for graph breaks with
``torch._dynamo.explain``, which traces without generating code.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.ynet3d import ClassificationNet3D, UNet3D, YNet3D
from pytorch import train as train_cli
from pytorch.data import BatchFeeder, PretrainingCubes
from pytorch.engine import (LossConfig, build_model, eval_step, make_optimizer, perturb_inputs,
                            prepare_model_for_speed, train_step)
from finetune import classification as finetune_classification
from finetune import segmentation as finetune_segmentation
from preparation.phantoms import make_nodule_cubes, write_phantom_dataset
from self_discovery import train_autoencoder, volumes
from tests.fold_fixtures import (autoencoder_args, make_fold_files, make_volume_dataset,
                                 train_args)

#: aten operators whose result the host must read: a device synchronisation on CUDA.
HOST_READS = frozenset({"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select",
                        "aten.is_nonzero", "aten.equal", "aten._unique2", "aten.unique_dim",
                        "aten.unique_consecutive", "aten.repeat_interleave"})


class RecordOps(TorchDispatchMode):
    """Counts the aten operators dispatched while active (``ops``: name -> calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def ignoring(self, fn):
        """``fn`` with its operators not counted (host-side work such as reading a file)."""
        def wrapped(*args, **kwargs):
            self.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = False
        return wrapped

    def host_reads(self) -> dict[str, int]:
        return {name: n for name, n in self.ops.items() if name in HOST_READS}


@pytest.mark.parametrize("exp", ["en_de", "en"])
def test_one_pretraining_step_reads_nothing_back(exp):
    """Batch gather, perturbations, forward, backward, fused Adam and eval: no host reads."""
    torch.manual_seed(0)
    data = PretrainingCubes(torch.rand(12, 1, 32, 32, 16).half(), torch.randint(0, 3, (12,)))
    feeder = BatchFeeder(data, torch.device("cpu"), max_batch=6)
    model = prepare_model_for_speed(build_model(exp, 3, width=4), "cpu")
    optimizer = make_optimizer(model)
    assert optimizer.defaults["fused"]  # plain Adam would read each step counter back
    gen = torch.Generator().manual_seed(0)
    cfg = LossConfig(exp)
    idx = torch.randperm(12)
    with RecordOps() as rec:
        for step in range(2):
            original, labels = feeder(idx[6 * step:6 * (step + 1)])
            inputs = perturb_inputs(original, gen)
            train_step(model, optimizer, inputs, original, labels, cfg)
        model.eval()
        eval_step(model, inputs, original, labels, cfg)
    assert rec.host_reads() == {}
    assert sum(rec.ops.values()) > 500  # the recorder did see the work


def _pretrain_reads(root, instances: int) -> dict[str, int]:
    folds = make_fold_files(root / f"folds{instances}", classes=2, instances=instances,
                            val_instances=2, resolutions=1)
    argv = train_args(folds, root / f"out{instances}", classes=2, instances=instances,
                      resolutions=1, epochs=1, batch_size=4) + ["--verbose", "0"]
    with RecordOps() as rec:
        assert train_cli.main(argv) == 0
    return rec.host_reads()


def test_pretraining_epoch_host_reads_do_not_grow_with_steps(tmp_path):
    """pytorch/train.py: the same host reads for 2 and for 4 steps per epoch (per-epoch only)."""
    assert _pretrain_reads(tmp_path, 4) == _pretrain_reads(tmp_path, 8)


def _autoencoder_reads(root, n_train: int, monkeypatch) -> dict[str, int]:
    data = make_volume_dataset(root / f"vol{n_train}", n_train=n_train, n_val=2,
                               shape=(32, 32, 16))
    argv = autoencoder_args(data, root / f"ae{n_train}", "--nb_epoch", "1")
    rec = RecordOps()
    # Reading a volume checks its values on the host (DataLoader workers in a real run):
    # not part of the device's hot path.
    monkeypatch.setattr(volumes, "load_resized", rec.ignoring(volumes.load_resized))
    with rec:
        assert train_autoencoder.main(argv) == 0
    return rec.host_reads()


def test_autoencoder_epoch_host_reads_do_not_grow_with_steps(tmp_path, monkeypatch):
    """Stage 1 likewise: 2 and 4 training steps per epoch read the same."""
    assert (_autoencoder_reads(tmp_path, 4, monkeypatch)
            == _autoencoder_reads(tmp_path, 8, monkeypatch))


#: Flags of a one-epoch fine-tuning run on CPU with a width-4 network and no worker processes.
FINETUNE_FLAGS = ["--width", "4", "--nb_epoch", "1", "--num_workers", "0", "--device", "cpu",
                  "--quiet"]


def _finetune_reads(main, argv: list[str]) -> dict[str, int]:
    with RecordOps() as rec:
        assert main(argv + FINETUNE_FLAGS) == 0
    return rec.host_reads()


def _classification_argv(root, n_train: int) -> list[str]:
    arrays = dict(zip(("x", "y"), make_nodule_cubes(n_train, (16, 16, 8), seed=0)))
    arrays.update(zip(("vx", "vy"), make_nodule_cubes(4, (16, 16, 8), seed=1)))
    for name, arr in arrays.items():
        np.save(root / f"{name}{n_train}.npy", arr)
    flags = ("--data", "x", "--labels", "y", "--val_data", "vx", "--val_labels", "vy")
    return [str(root / f"{v}{n_train}.npy") if i % 2 else v for i, v in enumerate(flags)] + [
        "--batch_size", "4", "--output_dir", str(root / f"cls{n_train}")]


def test_classification_finetuning_host_reads_do_not_grow_with_steps(tmp_path):
    """Fine-tuning sums its loss on the device: 2 and 4 steps per epoch read the same."""
    main = finetune_classification.main
    assert (_finetune_reads(main, _classification_argv(tmp_path, 8))
            == _finetune_reads(main, _classification_argv(tmp_path, 16)))


def test_segmentation_finetuning_host_reads_do_not_grow_with_steps(tmp_path):
    """Likewise for segmentation: --steps_per_epoch 2 and 4 read the same."""
    write_phantom_dataset(tmp_path / "img", 3, (24, 24, 16), seed=0, fmt="npy", nodules=1,
                          mask_dir=tmp_path / "msk")
    reads = [_finetune_reads(finetune_segmentation.main, [
        "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"), "--crop", "16",
        "16", "8", "--steps_per_epoch", str(steps), "--batch_size", "2",
        "--output_dir", str(tmp_path / f"seg{steps}")]) for steps in (2, 4)]
    assert reads[0] == reads[1]


@pytest.mark.parametrize("net", [
    lambda: YNet3D(cls_classes=3, width=4),
    lambda: ClassificationNet3D(cls_classes=3, width=4),
    lambda: UNet3D(n_class=1, width=4, norm="standard"),
], ids=["ynet3d", "classification", "autoencoder"])
def test_networks_compile_to_one_graph(net):
    """``--compile`` gets one graph per network: no graph break in any forward."""
    torch._dynamo.reset()
    model = net().train()
    explanation = torch._dynamo.explain(model)(torch.rand(2, 1, 16, 16, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
