"""Fine-tuning: load_pretrained for every model/width, TargetClassifier, both fine-tune scripts
(two epochs on tiny phantom data at width 4) and their bad-input errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.checkpoint import (load_checkpoint, load_pretrained, load_state_dict_checked,
                               save_checkpoint)
from models.targets import (Encoder3D, TargetClassifier, binary_dice_iou, build_classifier,
                            build_segmentation_model, dice_coef_loss, infer_width)
from models.ynet3d import ClassificationNet3D, UNet3D, YNet3D
from runtime.errors import CheckpointError
from finetune import classification as fc
from finetune import segmentation as fs
from preparation.phantoms import make_nodule_cubes, write_phantom_dataset, write_volume

CUBE = (32, 32, 16)


@pytest.fixture(scope="module")
def ynet4(tmp_path_factory) -> Path:
    """A width-4 YNet3D checkpoint in our schema."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ynet4.pt", YNet3D(cls_classes=5, width=4),
                           epoch=2, arch="YNet3D", model_config={"width": 4, "cls_classes": 5})


@pytest.fixture(scope="module")
def cubes(tmp_path_factory) -> Path:
    """12 nodule / no-nodule phantom cubes of 32 x 32 x 16 with labels, and 4 test cubes."""
    root = tmp_path_factory.mktemp("cubes")
    c, lab = make_nodule_cubes(12, CUBE, seed=0)
    np.save(root / "cubes.npy", c)
    np.save(root / "labels.npy", lab)
    c, lab = make_nodule_cubes(4, CUBE, seed=1)
    np.save(root / "test_cubes.npy", c)
    (root / "test_labels.txt").write_text("\n".join(str(int(v)) for v in lab) + "\n")
    return root


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """3 training phantoms (.npy in [0, 1]) and 1 test phantom (.nrrd in HU), with nodule masks."""
    root = tmp_path_factory.mktemp("vols")
    write_phantom_dataset(root / "img", 3, (40, 40, 16), seed=0, fmt="npy", nodules=2,
                          mask_dir=root / "msk")
    write_phantom_dataset(root / "timg", 1, (40, 40, 16), seed=7, fmt="nrrd", nodules=2,
                          mask_dir=root / "tmsk")
    return root


# ------------------------------------------------------------------------------------------
# load_pretrained (review of models/checkpoint.py) and the target networks
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [4, 8])
def test_load_round_trips_every_model_and_width(tmp_path, width):
    torch.manual_seed(width)
    for make in (lambda: UNet3D(width=width), lambda: YNet3D(cls_classes=3, width=width),
                 lambda: ClassificationNet3D(cls_classes=3, width=width),
                 lambda: Encoder3D(width=width)):
        model, fresh = make(), make()
        for p in model.parameters():  # make every tensor differ from a fresh model's
            p.data.normal_()
        path = save_checkpoint(tmp_path / f"{type(model).__name__}.pt", model)
        loaded = load_pretrained(fresh, path)
        assert set(loaded) == set(fresh.state_dict())
        for k, v in model.state_dict().items():
            assert torch.equal(v, fresh.state_dict()[k]), k
        assert infer_width(load_checkpoint(path)["state_dict"]) == width


def test_published_format_prefixes_and_extra_keys(tmp_path):
    ynet = YNet3D(cls_classes=3, width=4)
    sd = {("module.classficationNet." if k.startswith("down_tr") else "module.") + k: v
          for k, v in ynet.state_dict().items()}
    sd.update({"module.projection_head.0.weight": torch.zeros(3, 2), "prototypes.weight": torch.zeros(4),
               "module.projection_head.2.bias": torch.zeros(3)})
    torch.save({"state_dict": sd, "epoch": 7}, tmp_path / "published.pt")
    compiled = {"_orig_mod." + k: v for k, v in ynet.state_dict().items()}
    torch.save({"state_dict": compiled}, tmp_path / "compiled.pt")
    for path in (tmp_path / "published.pt", tmp_path / "compiled.pt"):
        unet = UNet3D(width=4)
        assert set(load_pretrained(unet, path)) == set(unet.state_dict())  # clc_out skipped
        enc = Encoder3D(width=4)
        assert set(load_pretrained(enc, path)) == set(enc.state_dict())   # decoder skipped too
        assert torch.equal(enc.down_tr512.ops[1].conv1.weight, ynet.down_tr512.ops[1].conv1.weight)


def test_missing_key_and_other_architecture_raise(tmp_path):
    unet = UNet3D(width=4)
    sd = unet.state_dict()
    del sd["up_tr64.ops.1.bn1.running_var"]
    torch.save({"state_dict": sd}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): up_tr64.ops.1.bn1.running_var"):
        load_pretrained(UNet3D(width=4), tmp_path / "missing.pt")
    # An encoder-only (``--exp en``) checkpoint cannot initialise a whole U-Net ...
    en = save_checkpoint(tmp_path / "en.pt", ClassificationNet3D(cls_classes=3, width=4))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): up_tr256"):
        build_segmentation_model(width=4, weights=en)
    # ... but initialises a classifier's encoder; the decoder may be declared new.
    model, loaded = build_classifier(width=4, weights=en)
    assert len(loaded) == len(model.base_model.state_dict())
    assert set(load_pretrained(UNet3D(width=4), en, new_keys=["up_tr256", "up_tr128", "up_tr64", "out_tr"])) \
        == set(Encoder3D(width=4).state_dict())
    # Another architecture entirely: every key listed as missing / unexpected with names.
    torch.save({"state_dict": nn.Sequential(nn.Linear(3, 2)).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt.*missing key.*unexpected key\(s\): 0.weight"):
        load_pretrained(UNet3D(width=4), tmp_path / "other.pt")


def test_width_mismatch_is_one_short_line_without_cli_advice(ynet4):
    with pytest.raises(CheckpointError) as err:
        build_classifier(width=8, weights=ynet4)
    msg = str(err.value)
    assert msg.startswith(f"{ynet4}: a Semantic Genesis pretraining checkpoint (en_de: YNet3D, width 4)")
    assert "does not fit this Encoder3D of width 8" in msg
    assert "down_tr64.ops.0.conv1.weight: checkpoint (4, 1, 3, 3, 3) vs model (8, 1, 3, 3, 3)" in msg
    assert "--" not in msg and "\n" not in msg and len(msg) < 400
    # without a width the checkpoint's is used
    model, loaded = build_classifier(weights=ynet4)
    assert model.base_model.down_tr64.ops[0].conv1.weight.shape[0] == 4 and loaded


def test_new_keys_fresh_output_layer(ynet4):
    model, loaded = build_segmentation_model(width=4, weights=ynet4, n_class=3)
    assert "out_tr.final_conv.weight" not in loaded and "up_tr64.ops.0.conv1.weight" in loaded
    assert model(torch.rand(1, 1, *CUBE)).shape == (1, 3, *CUBE)


def test_target_classifier_head_has_no_relu():
    torch.manual_seed(0)
    base = UNet3D(width=4)
    clf = TargetClassifier(base, n_class=2)
    nn.init.constant_(clf.dense_1.bias, -5.0)
    x = torch.rand(2, 1, *CUBE)
    logits = clf(x)
    assert logits.shape == (2, 2) and (logits < 0).all()  # the README's ReLU would give 0 here
    # Same features as the README's way: base_model(x); GAP of base_model.out512.
    base(x)
    ref = torch.nn.functional.avg_pool3d(base.out512, kernel_size=base.out512.size()[2:]).view(2, -1)
    assert torch.allclose(clf.features(x), ref, atol=1e-6)
    frozen, _ = build_classifier(width=4, freeze_encoder=True)
    assert not any(p.requires_grad for p in frozen.base_model.parameters())
    assert all(p.requires_grad for p in frozen.dense_1.parameters())


def test_dice_loss_and_dice_iou_values_on_known_overlaps():
    t = torch.zeros(2, 1, 4, 4, 4)
    t[:, :, :2] = 1
    assert float(dice_coef_loss(t, t)) == pytest.approx(0.0)
    assert float(dice_coef_loss(t, 1 - t)) == pytest.approx(1 - 1 / 129)
    p = torch.zeros_like(t, dtype=torch.bool)
    p[:, :, :1] = True
    assert binary_dice_iou(p, t) == pytest.approx((2 * 32 / (32 + 64), 32 / 64))
    assert binary_dice_iou(np.zeros(3), np.zeros(3)) == (1.0, 1.0)


def test_sliding_window_stitches_exactly():
    class Echo(nn.Module):  # returns its input: the stitched output must equal the volume
        def forward(self, x):
            return x

    vol = np.random.default_rng(0).random((40, 37, 20), dtype=np.float32)
    for crop, overlap in (((16, 16, 8), 0.5), ((32, 32, 16), 0.25), ((64, 64, 32), 0.0)):
        out = fs.sliding_window_predict(Echo(), vol, crop, overlap, batch_size=3)
        assert out.shape == vol.shape and np.allclose(out, vol, atol=1e-5)


def test_foreground_oversampling():
    img = np.zeros((64, 64, 32), np.float32)
    msk = np.zeros((64, 64, 32), np.uint8)
    msk[50:53, 5:8, 28:30] = 1
    case = fs.Case("c", img, msk, np.argwhere(msk).astype(np.int32), "i", "m")
    rng = np.random.default_rng(0)
    crops = [fs.sample_crop(case, (16, 16, 8), rng, 1.0) for _ in range(20)]
    assert all(m.sum() > 0 and m.shape == (16, 16, 8) for _, m in crops)
    small = fs.Case("s", img[:8, :8, :8], msk[:8, :8, :8], np.zeros((0, 3), np.int32), "i", "m")
    im, m = fs.sample_crop(small, (16, 16, 8), rng, 0.5)
    assert im.shape == m.shape == (16, 16, 8)


# ------------------------------------------------------------------------------------------
# the fine-tune scripts
# ------------------------------------------------------------------------------------------
def _common(out: Path, epochs: int = 2) -> list[str]:
    return ["--width", "4", "--nb_epoch", str(epochs), "--patience", "5", "--num_workers", "0",
            "--device", "cpu", "--quiet", "--output_dir", str(out)]


def test_classification_two_epochs_frozen_pretrained(cubes, ynet4, tmp_path):
    out = tmp_path / "cls"
    rc = fc.main(["--data", str(cubes / "cubes.npy"), "--labels", str(cubes / "labels.npy"),
                  "--test_data", str(cubes / "test_cubes.npy"), "--test_labels", str(cubes / "test_labels.txt"),
                  "--weights", str(ynet4), "--freeze_encoder", "--batch_size", "4", "--augment",
                  "--val_fraction", "0.34"] + _common(out))
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 2 and len(m["history"]) == 2 and m["loss"] == "bce"
    assert m["n_train"] == 8 and m["n_val"] == 4 and m["n_test"] == 4 and m["init"] == "pretrained"
    assert m["loaded_keys"] == len(Encoder3D(width=4).state_dict())
    for key in ("loss", "auc", "accuracy"):
        assert key in m["val"] and key in m["test"]
    assert 0.0 <= m["test"]["accuracy"] <= 1.0
    assert json.loads((out / "config.json").read_text())["freeze_encoder"] is True
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # The frozen encoder still holds the pretrained weights; only the head trained.
    best = load_checkpoint(out / "best.pt")
    assert best["arch"] == "TargetClassifier" and best["model_config"]["width"] == 4
    src = load_checkpoint(ynet4)["state_dict"]
    for k in ("down_tr64.ops.0.conv1.weight", "down_tr512.ops.1.bn1.running_mean"):
        assert torch.equal(best["state_dict"]["base_model." + k], src[k])
    model = TargetClassifier(Encoder3D(width=4), n_class=1)
    load_state_dict_checked(model, best["state_dict"])


def test_classification_folder_per_class_ce_and_resume(cubes, tmp_path):
    c, lab = np.load(cubes / "cubes.npy"), np.load(cubes / "labels.npy")
    root = tmp_path / "classes"
    for name, v in (("no_nodule", 0), ("nodule", 1)):
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(lab == v):
            np.save(root / name / f"cube_{i:02d}.npy", c[i])
    out = tmp_path / "run"
    args = ["--data_dir", str(root), "--loss", "ce", "--optimizer", "adam", "--lr", "1e-3",
            "--batch_size", "6", "--monitor", "auc"]
    assert fc.main(args + _common(out, epochs=1)) == 0
    assert fc.main(args + _common(out, epochs=2) + ["--resume", str(out / "last.pt")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["no_nodule", "nodule"] and m["loss"] == "ce"
    assert [h["epoch"] for h in m["history"]] == [1, 2]


def test_classification_bad_inputs(cubes, ynet4, tmp_path, capsys):
    base = _common(tmp_path / "bad")
    data = ["--data", str(cubes / "cubes.npy")]
    np.save(tmp_path / "short.npy", np.zeros(5, np.int64))
    assert fc.main(data + ["--labels", str(tmp_path / "short.npy")] + base) == 2
    err = capsys.readouterr().err
    assert "short.npy has 5 labels" in err and "cubes.npy holds 12 cube(s)" in err
    assert fc.main(data + ["--labels", str(cubes / "labels.npy"), "--weights", str(ynet4),
                           "--width", "8"] + base[2:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "width 4" in err and "pass --width 4" in err
    assert err.count("\n") == 1 and len(err) < 400
    np.save(tmp_path / "hu.npy", np.full((2, 32, 32, 16), -1000.0, np.float32))
    np.save(tmp_path / "two.npy", np.zeros(2, np.int64))
    assert fc.main(["--data", str(tmp_path / "hu.npy"), "--labels", str(tmp_path / "two.npy")] + base) == 2
    assert "expected [0, 1]" in capsys.readouterr().err
    np.save(tmp_path / "odd.npy", np.zeros((2, 30, 32, 16), np.float32))
    assert fc.main(["--data", str(tmp_path / "odd.npy"), "--labels", str(tmp_path / "two.npy")] + base) == 2
    assert "divisible by 8" in capsys.readouterr().err


def test_segmentation_two_epochs_pretrained(volumes, ynet4, tmp_path):
    out = tmp_path / "seg"
    rc = fs.main(["--images", str(volumes / "img"), "--masks", str(volumes / "msk"),
                  "--test_images", str(volumes / "timg"), "--test_masks", str(volumes / "tmsk"),
                  "--weights", str(ynet4), "--crop", *map(str, CUBE), "--steps_per_epoch", "2",
                  "--batch_size", "2", "--foreground_prob", "0.7", "--overlap", "0.5",
                  "--save_predictions", "--loss", "bce_dice"] + _common(out))
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 2 and m["n_train"] == 2 and m["n_val"] == 1 and m["n_test"] == 1
    assert m["loaded_keys"] == len(UNet3D(width=4).state_dict())
    for split in ("val", "test"):
        assert 0.0 <= m[split]["dice"] <= 1.0 and 0.0 <= m[split]["iou"] <= m[split]["dice"] + 1e-9
    pred = np.load(out / "predictions" / "phantom_000.npy")
    assert pred.shape == (40, 40, 16) and pred.dtype == np.uint8
    best = load_checkpoint(out / "best.pt")
    assert best["arch"] == "UNet3D"
    load_pretrained(UNet3D(width=4), out / "best.pt")  # a fine-tuned U-Net loads back
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_segmentation_bad_inputs(volumes, tmp_path, capsys):
    base = _common(tmp_path / "bad") + ["--crop", *map(str, CUBE)]
    img, msk = tmp_path / "img", tmp_path / "msk"
    img.mkdir()
    msk.mkdir()
    np.save(img / "a.npy", np.zeros((40, 40, 16), np.float32))
    np.save(msk / "a_label.npy", np.zeros((40, 40, 8), np.uint8))
    assert fs.main(["--images", str(img), "--masks", str(msk)] + base) == 2
    err = capsys.readouterr().err
    assert "a_label.npy" in err and "a.npy" in err and "(40, 40, 16) vs (40, 40, 8)" in err
    # SimpleITK files: same size, other spacing.
    write_volume(tmp_path / "h.nrrd", np.zeros((40, 40, 16), np.int16), (0.7, 0.7, 2.5))
    write_volume(tmp_path / "h_label.nrrd", np.zeros((40, 40, 16), np.uint8), (0.7, 0.7, 1.25))
    assert fs.main(["--images", str(tmp_path / "h.nrrd"), "--masks", str(tmp_path / "h_label.nrrd"),
                    "--val_images", str(volumes / "timg"), "--val_masks", str(volumes / "tmsk")] + base) == 2
    err = capsys.readouterr().err
    assert "h_label.nrrd" in err and "h.nrrd" in err and "spacing" in err
    assert fs.main(["--images", str(volumes / "img"), "--masks", str(volumes / "tmsk")] + base) == 2
    err = capsys.readouterr().err
    assert "image(s) without a mask" in err and "phantom_001.npy" in err
    with pytest.raises(SystemExit) as exit_:   # the argparse type of --crop
        fs.main(["--images", str(volumes / "img"), "--masks", str(volumes / "msk"),
                 "--crop", "30", "32", "16"] + base[:-4])
    assert exit_.value.code == 2 and "'30' is not a multiple of 8" in capsys.readouterr().err


def test_test_metrics_on_hand_made_predictions():
    """The reported metrics on predictions computed by hand: the classification AUC and
    accuracy, and the whole-volume sliding-window IoU / Dice of segmentation (an identity
    "model" predicts its input, so the prediction is the image thresholded at 0.5)."""
    m = fc.classification_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert m["auc"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(0.75)

    class Identity(nn.Module):
        def forward(self, x):
            return x

    shape = (24, 20, 12)
    image = np.zeros(shape, np.float32)
    image[4:12, 4:12, 2:6] = 1.0                     # predicted: 8 x 8 x 4 = 256 voxels
    mask = np.zeros(shape, np.uint8)
    mask[8:16, 4:12, 2:6] = 1                        # truth: shifted by 4 in x, overlap 128
    empty = fs.Case("empty", image, np.zeros(shape, np.uint8), np.zeros((0, 3), np.int32), "", "")
    case = fs.Case("case", image, mask, np.argwhere(mask).astype(np.int32), "", "")
    out = fs.evaluate_cases(Identity(), [case, empty], crop=(16, 16, 8), overlap=0.5,
                            batch_size=2, device=torch.device("cpu"))
    assert out["iou"] == pytest.approx(128 / 384) and out["dice"] == pytest.approx(256 / 512)
    assert out["n"] == 2 and out["n_empty"] == 1     # an empty mask leaves the means alone
