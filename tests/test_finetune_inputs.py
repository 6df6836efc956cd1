"""What fine-tuning reads: the kind of the --weights file (named in one line where it cannot
start the task), checkpoints from every source, inputs whose metric would mean nothing
(refused), an output folder inside the data, and runs paired by their seed whatever the
weights. Width-2 networks, 16 x 16 x 8 cubes, one epoch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import classification as fc
from finetune import segmentation as fs
from finetune.inputs import content_digest, data_identity, input_files
from finetune.loop import prepare_run
from models.checkpoint import describe_checkpoint, load_checkpoint, load_pretrained
from models.targets import Encoder3D, build_classifier, build_segmentation_model
from models.ynet3d import UNet3D, YNet3D
from tests.checkpoint_fixtures import save_published
from tests.finetune_fixtures import WIDTH, run_flags, save_kinds, write_cubes, write_volumes
from tests.test_cli_errors import one_error_line


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    return {"root": root, "cls": write_cubes(root / "cubes"), "seg": write_volumes(root / "vols"),
            **save_kinds(root / "ckpt")}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    """The published Semantic Genesis file (DataParallel keys, NumPy scalars, legacy format)
    and Models Genesis-style weights (a U-Net saved from DataParallel, a NumPy best_loss)."""
    root = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(3)
    save_published(root / "published.pt", YNet3D(cls_classes=3, width=WIDTH))
    unet = UNet3D(width=WIDTH)
    torch.save({"epoch": 9, "best_loss": np.float64(0.25), "optimizer_state_dict": {},
                "state_dict": {"module." + k: v for k, v in unet.state_dict().items()}},
               root / "models_genesis.pt")
    return {"published": root / "published.pt", "models_genesis": root / "models_genesis.pt"}


# --- the kind of a checkpoint ------------------------------------------------------------------

def test_describe_checkpoint_names_every_kind(data, foreign, tmp_path):
    kinds = {name: describe_checkpoint(load_checkpoint(p)).kind for name, p in
             {**{k: data[k] for k in ("en_de", "en", "autoencoder", "unet")}, **foreign}.items()}
    assert kinds == {"en_de": "pretraining", "en": "pretraining_en", "autoencoder": "autoencoder",
                     "unet": "unet", "published": "pretraining", "models_genesis": "unet"}
    clf, _ = build_classifier(width=WIDTH)
    torch.save({"state_dict": clf.state_dict()}, tmp_path / "clf.pt")
    info = describe_checkpoint(load_checkpoint(tmp_path / "clf.pt"))
    assert info.kind == "classifier" and info.config["width"] == WIDTH


def test_load_pretrained_errors_are_short_and_name_the_file_kind(data):
    with pytest.raises(Exception) as err:
        load_pretrained(UNet3D(width=WIDTH), data["en"])
    msg = str(err.value)
    assert msg.startswith(f"{data['en']}: an encoder-only pretraining checkpoint")
    assert "missing key(s): up_tr256" in msg and len(msg) < 400 and "--" not in msg


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_an_autoencoder_checkpoint_is_named_and_refused(data, tmp_path, capsys, task):
    module, flags = (fc, data["cls"]) if task == "classification" else (fs, data["seg"])
    rc = module.main(flags + ["--weights", str(data["autoencoder"])] + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, str(data["autoencoder"]), "this is an autoencoder checkpoint (stage 1",
                   "Checkpoints/en_de/")
    assert not (tmp_path / "o").exists()


def test_a_fine_tuned_classifier_as_weights_is_one_short_line(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert fc.main(data["cls"] + ["--weights", str(data["en_de"]), "--batch_size", "4"]
                   + run_flags(run)) == 0
    for module, flags in ((fc, data["cls"]), (fs, data["seg"])):
        rc = module.main(flags + ["--weights", str(run / "best.pt")] + run_flags(tmp_path / "o"))
        line = one_error_line(capsys, rc, str(run / "best.pt"), "a fine-tuned classifier (TargetClassifier")
        assert len(line) < 250 + len(str(run / "best.pt")) and "base_model." not in line


def test_an_encoder_only_checkpoint_needs_new_decoder_for_segmentation(data, tmp_path, capsys):
    rc = fs.main(data["seg"] + ["--weights", str(data["en"])] + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, str(data["en"]), "has no decoder", "pass --new_decoder")


# --- checkpoints from every source -------------------------------------------------------------

@pytest.mark.parametrize("source", ["en_de", "en", "published", "models_genesis"])
def test_weights_from_every_source_fine_tune_both_tasks(data, foreign, tmp_path, source):
    weights = {**data, **foreign}[source]
    encoder_keys = len(Encoder3D(width=WIDTH).state_dict())
    assert fc.main(data["cls"] + ["--weights", str(weights), "--batch_size", "4"]
                   + run_flags(tmp_path / "c")) == 0
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["loaded_keys"] == encoder_keys
    new_decoder = ["--new_decoder"] if source == "en" else []
    assert fs.main(data["seg"] + ["--weights", str(weights)] + new_decoder
                   + run_flags(tmp_path / "s")) == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["loaded_keys"] == (encoder_keys if source == "en" else len(UNet3D(width=WIDTH).state_dict()))
    assert m["width"] == WIDTH


# --- what cannot be measured ---------------------------------------------------------------------

def _labelled(root: Path, labels: list[int], name: str) -> list[str]:
    flags = write_cubes(root, n=len(labels), name=name)
    np.save(flags[3], np.array(labels, np.int64))
    return flags


def test_classification_refuses_sets_of_one_class(data, tmp_path, capsys):
    ones = _labelled(tmp_path, [0] * 8, "one")
    rc = fc.main(ones + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, "one_labels.npy", "every training cube has label 0")
    test = _labelled(tmp_path, [1] * 4, "test")
    rc = fc.main(data["cls"] + ["--test_data", test[1], "--test_labels", test[3]]
                 + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, "test_labels.npy", "every test cube has label 1")
    val = _labelled(tmp_path, [0] * 4, "val")
    rc = fc.main(data["cls"] + ["--val_data", val[1], "--val_labels", val[3]] + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, "val_labels.npy", "every validation cube has label 0")
    assert not (tmp_path / "o").exists()


def test_monitor_auc_needs_every_class_in_validation(tmp_path, capsys):
    train = _labelled(tmp_path, [0, 1, 2] * 4, "train")
    val = _labelled(tmp_path, [0, 1, 0, 1], "val")
    flags = train + ["--val_data", val[1], "--val_labels", val[3], "--width", str(WIDTH),
                     "--batch_size", "4"]
    rc = fc.main(flags + ["--monitor", "auc"] + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, "val_labels.npy", "lack class(es) 2", "--monitor loss")
    assert fc.main(flags + run_flags(tmp_path / "o")) == 0     # the loss is defined: AUC n/a
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["history"][0]["val_auc"] is None and m["val"]["auc_undefined"].endswith("class(es) 2")


def test_output_dir_inside_a_class_folder_root_is_refused(tmp_path, capsys):
    c = np.load(write_cubes(tmp_path / "flat")[1])
    for k in range(2):
        (tmp_path / "classes" / f"c{k}").mkdir(parents=True)
        for i in range(4):
            np.save(tmp_path / "classes" / f"c{k}" / f"{i}.npy", c[4 * k + i])
    rc = fc.main(["--data_dir", str(tmp_path / "classes")]
                 + run_flags(tmp_path / "classes" / "run"))
    one_error_line(capsys, rc, "--output_dir", "--data_dir", "overlap")
    assert not (tmp_path / "classes" / "run").exists()


def _empty_mask(vols: Path, name: str) -> None:
    mask = vols / "msk" / f"{name}_label.npy"
    np.save(mask, np.zeros_like(np.load(mask)))


def test_segmentation_refuses_what_dice_cannot_measure(tmp_path, capsys):
    seg = write_volumes(tmp_path / "v")
    rc = fs.main(seg + ["--foreground_labels", "1", "7"] + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, "--foreground_labels 7", "no training mask holds this value",
                   "the masks hold 0, 1")
    for name in ("phantom_000", "phantom_001", "phantom_002"):
        _empty_mask(tmp_path / "v", name)
    rc = fs.main(seg + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, "none of the 2 training masks", "has a foreground voxel")
    assert not (tmp_path / "o").exists()


def test_empty_validation_masks_are_refused_and_empty_test_cases_left_out(tmp_path, capsys):
    seg = write_volumes(tmp_path / "v", n=4)
    _empty_mask(tmp_path / "v", "phantom_003")
    val = ["--val_images", str(tmp_path / "v" / "img" / "phantom_003.npy"),
           "--val_masks", str(tmp_path / "v" / "msk" / "phantom_003_label.npy")]
    rc = fs.main(seg + val + run_flags(tmp_path / "o"))
    one_error_line(capsys, rc, "every validation mask is empty (phantom_003)")
    test = ["--test_images", str(tmp_path / "v" / "img"), "--test_masks", str(tmp_path / "v" / "msk")]
    assert fs.main(seg + test + ["--val_fraction", "0.25", "--width", str(WIDTH)]
                   + run_flags(tmp_path / "o")) == 0
    t = json.loads((tmp_path / "o" / "metrics.json").read_text())["test"]
    scored = [c["dice"] for c in t["per_case"] if c["name"] != "phantom_003"]
    assert t["n_empty"] == 1 and [c["dice"] for c in t["per_case"]][3] is None
    assert t["dice"] == pytest.approx(np.mean(scored))


# --- runs paired by their seed ----------------------------------------------------------------

def _first_batches(run, epochs=(0, 1)) -> list[torch.Tensor]:
    out = []
    for e in epochs:
        run.set_epoch(e)
        out += [t.clone() for t in next(iter(run.train_loader))]
    return out


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_one_seed_gives_the_same_head_data_and_augmentation_whatever_the_weights(
        data, foreign, tmp_path, task):
    """Scratch and two different checkpoints, one seed: the fresh head (classification) or
    fresh decoder (segmentation, --new_decoder), the data order, crops and flips are equal."""
    module, flags = (fc, data["cls"] + ["--batch_size", "4"]) if task == "classification" \
        else (fs, data["seg"] + ["--new_decoder", "--foreground_prob", "0.5"])
    other = save_kinds(tmp_path / "other", seed=5)["en_de"]
    runs = []
    for weights in (None, data["en_de"], other):
        argv = flags + ["--augment", "--seed", "11", "--width", str(WIDTH)] + (
            ["--weights", str(weights)] if weights else []) + run_flags(tmp_path / "o")
        torch.rand(int(3 + len(runs)))     # whatever ran before must not matter
        runs.append(prepare_run(module.build_parser().parse_args(argv), module.TASK)[0])
    fresh = (lambda m: m.dense_1.state_dict()) if task == "classification" else \
        (lambda m: {k: v for k, v in m.state_dict().items() if k.startswith(("up_tr", "out_tr"))})
    batches = [_first_batches(r) for r in runs]
    for run, seen in zip(runs[1:], batches[1:]):
        for k, v in fresh(runs[0].model).items():
            assert torch.equal(v, fresh(run.model)[k]), k
        assert all(torch.equal(a, b) for a, b in zip(batches[0], seen))
    enc = "base_model.down_tr64.ops.0.conv1.weight" if task == "classification" else "down_tr64.ops.0.conv1.weight"
    assert not torch.equal(runs[1].model.state_dict()[enc], runs[2].model.state_dict()[enc])


def test_build_functions_seed_the_fresh_parts_independently_of_the_global_rng(data):
    torch.manual_seed(0)
    a, _ = build_classifier(weights=data["en_de"], n_class=2, seed=4)
    torch.rand(7)
    b, _ = build_classifier(width=WIDTH, n_class=2, seed=4)
    assert torch.equal(a.dense_1.weight, b.dense_1.weight)
    # --new_decoder: the decoder is fresh (from the seed) even where the file has one
    c, _ = build_segmentation_model(weights=data["en"], new_decoder=True, seed=4)
    d, loaded = build_segmentation_model(weights=data["en_de"], new_decoder=True, seed=4)
    e, _ = build_segmentation_model(width=WIDTH, new_decoder=True, seed=4)
    assert len(loaded) == len(Encoder3D(width=WIDTH).state_dict())
    decoder = [k for k in e.state_dict() if k.startswith(("up_tr", "out_tr"))]
    for k in decoder:
        assert torch.equal(c.state_dict()[k], e.state_dict()[k]), k
        assert torch.equal(d.state_dict()[k], e.state_dict()[k]), k
    src = load_checkpoint(data["en_de"])["state_dict"]
    assert torch.equal(d.down_tr512.ops[1].conv1.weight, src["down_tr512.ops.1.conv1.weight"])


def test_content_identity_of_big_and_small_files(tmp_path):
    """Files up to 4 MiB are hashed whole; a bigger one by its size and sampled blocks, which
    still tell re-made content apart; names inside a given folder count, positions of files
    given directly do."""
    big = tmp_path / "big.npy"
    data = np.random.default_rng(0).random((5 << 20) // 8)
    np.save(big, data)
    first = content_digest(big)
    assert first.startswith("sampled:")
    np.save(big, data[::-1].copy())
    assert content_digest(big) != first
    (tmp_path / "d" / "c1").mkdir(parents=True)
    np.save(tmp_path / "d" / "c1" / "a.npy", np.zeros(3))
    names = [n for n, _ in input_files([tmp_path / "d" / "c1" / "a.npy", big], [tmp_path / "d"])]
    assert names == ["c1/a.npy", "#1"]
    one = data_identity({"data": input_files([big], [])})
    assert one["data"]["files"] == 1 and one["data"]["bytes"] == big.stat().st_size
