"""Self-discovery stage 2: feature extractor, index check, both stages under torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import save_checkpoint
from runtime.errors import InputError
from self_discovery import feature_extractor as fe
from self_discovery import train_autoencoder as ta
from self_discovery.volumes import load_resized
from tests.fold_fixtures import make_volume_dataset as make_dataset

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--input_rows", "32", "--input_cols", "32", "--input_deps", "16", "--num_workers", "0",
         "--device", "cpu", "--verbose", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dataset (5 train, 3 validation) and a width-4 autoencoder checkpoint with non-trivial
    BatchNorm statistics."""
    root = tmp_path_factory.mktemp("fe")
    data = make_dataset(root / "data", n_train=5, n_val=3, seed=1)
    torch.manual_seed(0)
    model = ta.build_autoencoder(width=4)
    with torch.no_grad():
        model.train()
        model(torch.rand(3, 1, 32, 32, 16))  # update running statistics
    weights = save_checkpoint(root / "ae.pt", model, arch="UNet3D",
                              model_config={"width": 4, "decoder": "upsampling",
                                            "norm": "standard", "n_class": 1})
    return root, data, weights


def _extract(data: Path, weights: Path, out: Path, *extra: str) -> int:
    return fe.main(["--data_dir", str(data), "--weights", str(weights), "--output_dir", str(out),
                    *SMALL, *extra])


def test_features_shape_order_index_and_batch_independence(setup, tmp_path):
    _, data, weights = setup
    assert _extract(data, weights, tmp_path / "b3", "--batch_size", "3") == 0
    assert _extract(data, weights, tmp_path / "b1", "--batch_size", "1") == 0
    tr = np.load(tmp_path / "b3" / fe.TRAIN_NAME)
    va = np.load(tmp_path / "b3" / fe.VAL_NAME)
    assert tr.shape == (5, 64) and va.shape == (3, 64) and tr.dtype == np.float32
    assert np.isfinite(tr).all() and np.isfinite(va).all()
    np.testing.assert_allclose(np.load(tmp_path / "b1" / fe.TRAIN_NAME), tr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "b1" / fe.VAL_NAME), va, rtol=1e-5, atol=1e-6)
    index = json.loads((tmp_path / "b3" / fe.INDEX_NAME).read_text())
    assert index["train"] == [f"patient_{i:03d}.npy" for i in range(5)]
    assert index["validation"] == [f"patient_{i:03d}.npy" for i in range(3)]
    assert index["feature_dim"] == 64
    assert (tmp_path / "b3" / "config.json").is_file()
    # row i is the feature of file i: recompute one volume alone
    model, _ = fe.load_encoder(weights)
    x = load_resized(data / "train" / "patient_003.npy", (32, 32, 16))[None]
    with torch.no_grad():
        one = model.encode(x).mean(dim=(2, 3, 4))[0].numpy()
    np.testing.assert_allclose(tr[3], one, rtol=1e-5, atol=1e-6)
    # load_features returns the same arrays and the files in row order
    t2, v2, tf, vf = fe.load_features(tmp_path / "b3" / fe.TRAIN_NAME,
                                      tmp_path / "b3" / fe.VAL_NAME, data)
    np.testing.assert_array_equal(t2, tr)
    assert [f.name for f in tf] == index["train"] and [f.name for f in vf] == index["validation"]


def test_index_mismatch_raises_naming_files(setup, tmp_path):
    _, data0, weights = setup
    data = tmp_path / "data"
    for split in ("train", "validation"):
        (data / split).mkdir(parents=True)
        for f in (data0 / split).iterdir():
            (data / split / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "feat"
    assert _extract(data, weights, out) == 0
    paths = (out / fe.TRAIN_NAME, out / fe.VAL_NAME, data)
    fe.load_features(*paths)
    (data / "train" / "patient_002.npy").unlink()
    (data / "validation" / "patient_000.npy").rename(data / "validation" / "zz_new.npy")
    with pytest.raises(InputError) as e:
        fe.load_features(*paths)
    msg = str(e.value)
    for name in ("patient_002.npy", "zz_new.npy", "patient_000.npy", "feature_extractor.py"):
        assert name in msg
    (out / fe.INDEX_NAME).unlink()
    with pytest.raises(InputError, match="feature_extractor.py"):
        fe.load_features(*paths)


def test_bad_inputs_give_one_line_errors(setup, tmp_path, capsys):
    _, data, weights = setup

    def one_line_error(*names: str) -> None:
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1, err
        for n in names:
            assert n in err, err

    assert _extract(tmp_path / "missing", weights, tmp_path / "o") == 2
    one_line_error("missing")
    nan_data = make_dataset(tmp_path / "nan", n_train=2, n_val=1)
    v = np.load(nan_data / "validation" / "patient_000.npy")
    v[0, 0, 0] = np.inf
    np.save(nan_data / "validation" / "patient_000.npy", v)
    assert _extract(nan_data, weights, tmp_path / "o") == 2
    one_line_error("patient_000.npy", "NaN")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(Path(weights).read_bytes()[:200])
    assert _extract(data, trunc, tmp_path / "o") == 2
    one_line_error("trunc.pt")
    assert _extract(data, tmp_path / "absent.pt", tmp_path / "o") == 2
    one_line_error("absent.pt")
    assert not (tmp_path / "o" / fe.TRAIN_NAME).exists()


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import torch
    from runtime.distributed import init_distributed, cleanup_distributed
    from self_discovery import feature_extractor, train_autoencoder
    init_distributed(torch.device("cpu"))
    rc = train_autoencoder.main({ae_args!r})
    rc = rc or feature_extractor.main({fe_args!r})
    cleanup_distributed()
    sys.exit(rc)
""")


@pytest.mark.slow  # two processes under torchrun
def test_two_process_ddp_matches_one_process(setup, tmp_path):
    _, data, _ = setup
    ckpt_dir = tmp_path / "ckpt"
    ae_args = ["--data_dir", str(data), "--output_dir", str(ckpt_dir), "--log_dir",
               str(tmp_path / "tb"), "--input_rows", "32", "--input_cols", "32", "--input_deps",
               "16", "--width", "4", "--batch_size", "2", "--num_workers", "0", "--device", "cpu",
               "--nb_epoch", "1", "--verbose", "0"]
    weights = ckpt_dir / ta.BEST_NAME
    fe_args = ["--data_dir", str(data), "--weights", str(weights), "--output_dir",
               str(tmp_path / "ddp"), "--batch_size", "2", *SMALL]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO), ae_args=ae_args, fe_args=fe_args))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(driver)]
    for attempt in range(2):  # one retry, only when the launcher could not get a free port
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                errors="replace", start_new_session=True)
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
            out, err = proc.communicate()
        if proc.returncode == 0 or not any(s in err for s in ("EADDRINUSE", "already in use")):
            break
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert sorted(p.name for p in ckpt_dir.glob("*.pt")) == sorted([ta.BEST_NAME, ta.LAST_NAME])
    assert not list(ckpt_dir.glob(".*tmp"))
    ckpt = torch.load(weights)
    assert ckpt["epoch"] == 1 and ckpt["config"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    # the same checkpoint, one process
    assert _extract(data, weights, tmp_path / "single", "--batch_size", "3") == 0
    for name in (fe.TRAIN_NAME, fe.VAL_NAME):
        np.testing.assert_allclose(np.load(tmp_path / "ddp" / name),
                                   np.load(tmp_path / "single" / name), rtol=1e-5, atol=1e-6)
    assert (json.loads((tmp_path / "ddp" / fe.INDEX_NAME).read_text())["train"]
            == json.loads((tmp_path / "single" / fe.INDEX_NAME).read_text())["train"])
