"""The CUDA paths: skipped without a GPU (CI); run by ``experiments/gpu_check.sh`` on a device.

What only a GPU exercises: float16 cubes resident on the device, the pinned-host feeder with
its staging buffers, bf16 autocast with channels_last_3d and fused Adam, the training step with
``torch.cuda.set_sync_debug_mode("error")`` (any host synchronisation raises), the perturbations
computed by CUDA kernels against the CPU ones, and the CLIs with ``--device cuda`` writing
checkpoints that load on the CPU. Tiny sizes: the whole file runs in well under a minute.
"""
from __future__ import annotations

import json

import pytest
import torch

from models.checkpoint import load_checkpoint, load_state_dict_checked
from models.ynet3d import YNet3D
from pytorch import train as train_cli
from pytorch.data import BatchFeeder, PretrainingCubes
from pytorch.engine import (LossConfig, build_model, make_optimizer, perturb_inputs,
                            prepare_model_for_speed, summarize_stats, train_step)
from pytorch.perturbations import (bezier_map, bezier_tables, elastic_displacement,
                                   local_pixel_shuffle, perturb_batch_with_choices, warp_inplane)
from experiments.benchmark_pretrain import smooth_random_cubes
from self_discovery import train_autoencoder
from tests.fold_fixtures import (autoencoder_args, make_fold_files, make_volume_dataset,
                                 train_args)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def _smooth_cubes(n: int, shape=(32, 32, 16), seed: int = 0) -> torch.Tensor:
    """(n, 1, X, Y, Z) float32 in [0, 1]: the benchmark's smooth synthetic cubes."""
    return torch.from_numpy(smooth_random_cubes(n, shape, seed)[0])[:, None]


def test_perturbation_kernels_match_cpu():
    """Same inputs and random parameters: CUDA results equal the CPU ones (float tolerance)."""
    x = _smooth_cubes(4)
    disp = elastic_displacement(4, (32, 32, 16), torch.Generator().manual_seed(0))
    cpu = warp_inplane(x, disp)
    gpu = warp_inplane(x.to(CUDA), disp.to(CUDA)).cpu()
    assert (cpu - gpu).abs().max() < 1e-4
    control = torch.rand(4, 4, generator=torch.Generator().manual_seed(1))
    inverted = torch.tensor([False, True, False, True])
    cpu = bezier_map(x, *bezier_tables(control, inverted))
    gpu = bezier_map(x.to(CUDA), *bezier_tables(control.to(CUDA), inverted.to(CUDA))).cpu()
    assert (cpu - gpu).abs().max() < 1e-5
    shuffled = local_pixel_shuffle(x.to(CUDA), torch.Generator(CUDA).manual_seed(2))
    assert torch.equal(torch.sort(shuffled.flatten(1)).values.cpu(),
                       torch.sort(x.flatten(1)).values)        # a permutation of each cube


def test_perturbation_statistics_on_cuda():
    """The operation shares and value range hold for the CUDA generator too."""
    x = _smooth_cubes(256).to(CUDA)
    out, choice = perturb_batch_with_choices(x, torch.Generator(CUDA).manual_seed(3))
    shares = torch.bincount(choice, minlength=4).float().cpu() / 256
    assert ((shares - 0.25).abs() < 0.09).all(), shares
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert out.shape == x.shape and out.device == x.device


@pytest.mark.parametrize("exp", ["en_de", "en"])
def test_training_step_never_synchronises(exp):
    """Feeder (fp16 on the GPU) + perturbations + bf16 channels_last step + fused Adam."""
    torch.manual_seed(0)
    data = PretrainingCubes(_smooth_cubes(24).to(CUDA, torch.float16),
                   torch.randint(0, 3, (24,)).to(CUDA))
    feeder = BatchFeeder(data, CUDA, max_batch=8)
    model = prepare_model_for_speed(build_model(exp, 3, width=4), CUDA)
    optimizer = make_optimizer(model)
    gen = torch.Generator(CUDA).manual_seed(0)
    idx = torch.randperm(24, device=CUDA)
    cfg = LossConfig(exp)

    def step(i: int) -> torch.Tensor:
        original, labels = feeder(idx[8 * i:8 * (i + 1)])
        return train_step(model, optimizer, perturb_inputs(original, gen), original, labels,
                          cfg, torch.bfloat16)

    sums = step(0)                           # warm-up: cuDNN autotuning, optimiser state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums = sums + step(1) + step(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = summarize_stats(sums)
    assert stats["n"] == 24 and torch.isfinite(torch.tensor(stats["loss"]))


def test_pinned_host_feeder_gathers_the_right_cubes():
    """Cubes in pinned host memory: two staging buffers, asynchronous copies, right rows."""
    cubes = _smooth_cubes(20).half().pin_memory()
    labels = torch.arange(20)
    feeder = BatchFeeder(PretrainingCubes(cubes, labels), CUDA, max_batch=6)
    assert not feeder.on_device
    idx = torch.randperm(20)
    for s in range(0, 20, 6):                  # 4 batches: each buffer reused
        x, y = feeder(idx[s:s + 6])
        assert x.device.type == "cuda" and x.dtype == torch.float32
        assert torch.equal(x.cpu(), cubes[idx[s:s + 6]].float())
        assert torch.equal(y.cpu(), labels[idx[s:s + 6]])


@pytest.mark.parametrize("data_device", ["cuda", "cpu"])
def test_pretraining_cli_on_cuda_loads_on_cpu(tmp_path, data_device):
    """pytorch/train.py --device cuda: fp16 cubes, bf16; the checkpoint loads on the CPU."""
    folds = make_fold_files(tmp_path / "folds", classes=3, instances=4, val_instances=2)
    argv = train_args(folds, tmp_path, width=4, epochs=2, batch_size=4, device="cuda")
    assert train_cli.main(argv + ["--data_device", data_device, "--verbose", "0"]) == 0
    ckpt_dir = tmp_path / "ckpt"
    cfg = json.loads(next(ckpt_dir.glob("*_config.json")).read_text())
    assert cfg["amp_resolved"].endswith("bfloat16") and cfg["cube_dtype_resolved"] == "float16"
    assert cfg["data_device_resolved"].startswith(data_device)
    ckpt = load_checkpoint(next(p for p in ckpt_dir.glob("*.pt") if "_last" not in p.name))
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())
    load_state_dict_checked(YNet3D(cls_classes=3, width=4), ckpt["state_dict"])


def test_autoencoder_cli_on_cuda(tmp_path):
    """Stage 1 with --device cuda (bf16 autocast, fused Adam) writes a CPU-loadable checkpoint."""
    data = make_volume_dataset(tmp_path / "vol", n_train=4, n_val=2, shape=(32, 32, 16))
    argv = autoencoder_args(data, tmp_path, "--nb_epoch", "2", device="cuda")
    assert train_autoencoder.main(argv) == 0
    ckpt = load_checkpoint(tmp_path / "ckpt" / train_autoencoder.LAST_NAME)
    assert ckpt["epoch"] == 2
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())


def test_compiled_pretraining_cli_on_cuda(tmp_path):
    """--compile: the training graph compiles (once per batch shape) and trains."""
    folds = make_fold_files(tmp_path / "folds", classes=3, instances=4, val_instances=2)
    argv = train_args(folds, tmp_path, width=4, epochs=1, batch_size=4, device="cuda")
    assert train_cli.main(argv + ["--compile", "--verbose", "0"]) == 0
    ckpt = load_checkpoint(next((tmp_path / "ckpt").glob("*_last.pt")))
    assert not any(k.startswith("_orig_mod.") for k in ckpt["state_dict"])
