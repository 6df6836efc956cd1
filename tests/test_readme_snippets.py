"""The Python blocks of our README.md and docs/checkpoints.md run as written, against the checkpoints users have.

README.md and docs/checkpoints.md hold the original README's two fine-tuning snippets verbatim (pinned below by their
SHA-256, so an edit that "fixes" them fails here) and the ``load_pretrained`` example. The
snippets run with ``Your Dataset`` (the only text that is not Python) replaced by a tiny
dataset, and tiny ``config``, ``device`` and ``intial_epoch`` in their namespace; ``weight_dir``
(relative, as written) points at:
* a checkpoint written by ``models.checkpoint.save_checkpoint`` from a width-32 ``YNet3D``;
* a checkpoint in the published format (NumPy scalars, DataParallel keys, optimiser state),
  after ``scripts/convert_checkpoint.py``: every ``UNet3D`` tensor must equal the source's.
Every ``UNet3D`` key must be copied ("Copying k <---- k"), and only the Y-Net's classification
head is reported as not found.
"""
import hashlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from models.checkpoint import save_checkpoint
from models.ynet3d import UNet3D, YNet3D
from models import convert as cc
from tests.checkpoint_fixtures import save_published

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the documents holding the snippets: the classification one in the README, the segmentation
#: one in the checkpoint documentation
DOCUMENTS = [README, ROOT / "docs" / "checkpoints.md"]
WEIGHT_DIR = "Checkpoints/en_de/semantic_genesis_chest_ct.pt"
#: SHA-256 of the original README's classification and segmentation snippets (each line
#: right-stripped, blank lines at both ends removed).
SNIPPET_SHA256 = ["004f242a2558a4ba5cb33a605f0768f2e80713176ac8698a9b6bd5fdc44a2030",
                  "c67e8977bd2257be4ba5d4b8b522eed11261f8e1d5341cfdce40eac063ae3768"]


def _python_blocks() -> list[str]:
    return [b for doc in DOCUMENTS
            for b in re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)]


def _digest(code: str) -> str:
    text = "\n".join(line.rstrip() for line in code.strip("\n").splitlines())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


SNIPPETS = [b for b in _python_blocks() if "Your Dataset" in b]
CLASSIFICATION_SNIPPET, SEGMENTATION_SNIPPET = (SNIPPETS + ["", ""])[:2]
#: the other blocks that load the checkpoint (e.g. the ``load_pretrained`` example)
OTHER_BLOCKS = [b for b in _python_blocks() if "Your Dataset" not in b and WEIGHT_DIR in b]


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory):
    """A folder holding WEIGHT_DIR: an untrained width-32 YNet3D saved by save_checkpoint."""
    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    model = YNet3D(cls_classes=44, width=32)
    save_checkpoint(root / WEIGHT_DIR, model, epoch=1, best_loss=1.0,
                    arch="YNet3D", model_config={"width": 32, "cls_classes": 44})
    return root


def _run_snippet(code: str, root: Path, y: torch.Tensor, monkeypatch, capsys,
                 epochs: int = 1) -> tuple[dict, str]:
    monkeypatch.chdir(root)
    x = torch.rand(1, 1, 32, 32, 16)  # one tiny cube keeps a width-32 step fast on CPU
    ns = {
        "__name__": "readme_snippet",
        "config": SimpleNamespace(batch_size=1, lr=1e-3, nb_epoch=epochs),
        "device": torch.device("cpu"),
        "intial_epoch": 0,
        "your_dataset": TensorDataset(x, y),
    }
    exec(compile(code.replace("Your Dataset", "your_dataset"), "README snippet", "exec"), ns)
    return ns, capsys.readouterr().out


def _check_copy_lines(out: str) -> None:
    unet_keys = set(UNet3D().state_dict())
    copied = re.findall(r"^Copying (\S+) <---- (\S+)$", out, re.M)
    assert all(a == b for a, b in copied)
    assert {a for a, _ in copied} == unet_keys and len(copied) == len(unet_keys)
    not_found = re.findall(r"^Key (\S+) is not found$", out, re.M)
    assert not_found and all(k.startswith("clc_out.") for k in not_found)


def _ckpt_state(root: Path) -> dict:
    return torch.load(root / WEIGHT_DIR)["state_dict"]


def test_readme_holds_the_original_snippets_verbatim():
    assert [_digest(b) for b in SNIPPETS] == SNIPPET_SHA256
    assert "TargetNet" in CLASSIFICATION_SNIPPET and "torch_dice_coef_loss" in SEGMENTATION_SNIPPET
    assert CLASSIFICATION_SNIPPET.count(f"weight_dir = '{WEIGHT_DIR}'") == 1


def test_classification_snippet_runs_unchanged(readme_dir, monkeypatch, capsys):
    ns, out = _run_snippet(CLASSIFICATION_SNIPPET, readme_dir, torch.ones(1, 1), monkeypatch, capsys)
    _check_copy_lines(out)
    assert torch.isfinite(ns["loss"])
    assert ns["base_model"].out512.shape == (1, 512, 4, 4, 2)
    # The decoder gets no gradient in TargetNet, so it still holds the checkpoint's weights.
    ref = _ckpt_state(readme_dir)
    assert torch.equal(ns["base_model"].out_tr.final_conv.weight, ref["out_tr.final_conv.weight"])
    assert torch.equal(ns["base_model"].up_tr64.ops[1].conv1.weight, ref["up_tr64.ops.1.conv1.weight"])


def test_segmentation_snippet_runs_unchanged(readme_dir, monkeypatch, capsys):
    y = (torch.rand(1, 1, 32, 32, 16) > 0.7).float()
    ns, out = _run_snippet(SEGMENTATION_SNIPPET, readme_dir, y, monkeypatch, capsys)
    _check_copy_lines(out)
    assert 0.0 <= float(ns["loss"].detach()) <= 1.0
    # BatchNorm running statistics were copied, then updated by the training step.
    ref = _ckpt_state(readme_dir)
    model = ns["model"].module if hasattr(ns["model"], "module") else ns["model"]
    assert not torch.equal(model.state_dict()["down_tr64.ops.0.bn1.running_mean"],
                           ref["down_tr64.ops.0.bn1.running_mean"])
    assert ns["pred"].shape == y.shape


def test_other_checkpoint_blocks_of_the_readme_run(readme_dir, monkeypatch):
    assert OTHER_BLOCKS and any("load_pretrained" in b for b in OTHER_BLOCKS)
    monkeypatch.chdir(readme_dir)
    for code in OTHER_BLOCKS:
        exec(compile(code, "README block", "exec"), {"__name__": "readme_block"})


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    """WEIGHT_DIR converted from a published-format width-32 Y-Net; and that Y-Net's weights."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(1)
    source = save_published(root / "downloaded.pt", YNet3D(cls_classes=44, width=32))
    assert cc.main([str(root / "downloaded.pt"), str(root / WEIGHT_DIR)]) == 0
    (root / "downloaded.pt").unlink()  # 300 MB: keep only the converted file
    return root, source


@pytest.mark.parametrize("which", ["classification", "segmentation"])
def test_snippets_on_the_converted_published_checkpoint(converted_dir, which, monkeypatch,
                                                       capsys):
    """No training epoch (nb_epoch 0): the model holds exactly what the snippet copied."""
    root, source = converted_dir
    capsys.readouterr()
    code = CLASSIFICATION_SNIPPET if which == "classification" else SEGMENTATION_SNIPPET
    y = torch.ones(1, 1) if which == "classification" else torch.zeros(1, 1, 32, 32, 16)
    ns, out = _run_snippet(code, root, y, monkeypatch, capsys, epochs=0)
    _check_copy_lines(out)
    model = ns["base_model"] if which == "classification" else ns["model"]
    model = model.module if hasattr(model, "module") else model
    state = model.state_dict()
    assert set(state) == set(UNet3D().state_dict())
    for key, value in state.items():
        assert torch.equal(value, source[key]), key
