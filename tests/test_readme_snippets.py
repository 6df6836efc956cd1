"""The original README's two fine-tuning snippets run unchanged against our checkpoint.

The snippets below are pasted verbatim from the original README (`Your Dataset` is the only
text replaced, since it is not Python); `config`, `device` and `intial_epoch` are given tiny
definitions in the namespace they run in, and `weight_dir` (relative, as in the README) points
at a checkpoint written by ``models.checkpoint.save_checkpoint`` from an untrained width-32
``YNet3D``. Every ``UNet3D`` key must be copied ("Copying k <---- k"), and only the Y-Net's
classification head is reported as not found.
"""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from models.checkpoint import save_checkpoint
from models.ynet3d import UNet3D, YNet3D

# shared/ lies beside the checkout (also in CI, which clones main next to a copy of it).
SEED_README = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_71ba735b5fbd18be.txt"
WEIGHT_DIR = "Checkpoints/en_de/semantic_genesis_chest_ct.pt"

CLASSIFICATION_SNIPPET = """

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import Dataset, DataLoader
from models.ynet3d import *

# prepare your own data
train_loader = DataLoader(Your Dataset, batch_size=config.batch_size, shuffle=True)

# prepare the 3D model
class TargetNet(nn.Module):
    def __init__(self, base_model,n_class=1):
        super(TargetNet, self).__init__()

        self.base_model = base_model
        self.dense_1 = nn.Linear(512, n_class, bias=True)

    def forward(self, x):
        self.base_model(x)
        self.base_out = self.base_model.out512
        # This global average polling is for shape (N,C,H,W) not for (N, H, W, C)
        # where N = batch_size, C = channels, H = height, and W = Width
        self.out_glb_avg_pool = F.avg_pool3d(self.base_out, kernel_size=self.base_out.size()[2:]).view(self.base_out.size()[0],-1)
        self.linear_out = self.dense_1(self.out_glb_avg_pool)
        final_out = F.relu(self.linear_out)
        return final_out
        
base_model = UNet3D()

#Load pre-trained weights
weight_dir = 'Checkpoints/en_de/semantic_genesis_chest_ct.pt'
checkpoint = torch.load(weight_dir)
state_dict = checkpoint['state_dict']
state_dict = {k.replace("module.", ""): v for k, v in state_dict.items()}
delete = [key for key in state_dict if "projection_head" in key]
for key in delete: del state_dict[key]
delete = [key for key in state_dict if "prototypes" in key]
for key in delete: del state_dict[key]
for key in state_dict.keys():
    if key in base_model.state_dict().keys():
        base_model.state_dict()[key].copy_(state_dict[key])
        print("Copying {} <---- {}".format(key, key))
    elif key.replace("classficationNet.", "") in base_model.state_dict().keys():
        base_model.state_dict()[key.replace("classficationNet.", "")].copy_(state_dict[key])
        print("Copying {} <---- {}".format(key.replace("classficationNet.", ""), key))
    else:
        print("Key {} is not found".format(key))

target_model = TargetNet(base_model)
target_model.to(device)
target_model = nn.DataParallel(target_model, device_ids = [i for i in range(torch.cuda.device_count())])
criterion = nn.BCELoss()
optimizer = torch.optim.SGD(target_model.parameters(), config.lr, momentum=0.9, weight_decay=0.0, nesterov=False)

# train the model

for epoch in range(intial_epoch, config.nb_epoch):
    target_model.train()
    for batch_ndx, (x,y) in enumerate(train_loader):
        x, y = x.float().to(device), y.float().to(device)
        pred = F.sigmoid(target_model(x))
        loss = criterion(pred, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
"""

SEGMENTATION_SNIPPET = """
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import Dataset, DataLoader
from models.ynet3d import *

#Declare the Dice Loss
def torch_dice_coef_loss(y_true,y_pred, smooth=1.):
    y_true_f = torch.flatten(y_true)
    y_pred_f = torch.flatten(y_pred)
    intersection = torch.sum(y_true_f * y_pred_f)
    return 1. - ((2. * intersection + smooth) / (torch.sum(y_true_f) + torch.sum(y_pred_f) + smooth))

# prepare your own data
train_loader = DataLoader(Your Dataset, batch_size=config.batch_size, shuffle=True)

# prepare the 3D model

model = UNet3D()

#Load pre-trained weights
weight_dir = 'Checkpoints/en_de/semantic_genesis_chest_ct.pt'
checkpoint = torch.load(weight_dir)
state_dict = checkpoint['state_dict']
#Load pre-trained weights
checkpoint = torch.load(weight_dir)
state_dict = checkpoint['state_dict']
state_dict = {k.replace("module.", ""): v for k, v in state_dict.items()}
delete = [key for key in state_dict if "projection_head" in key]
for key in delete: del state_dict[key]
delete = [key for key in state_dict if "prototypes" in key]
for key in delete: del state_dict[key]
for key in state_dict.keys():
    if key in model.state_dict().keys():
        model.state_dict()[key].copy_(state_dict[key])
        print("Copying {} <---- {}".format(key, key))
    elif key.replace("classficationNet.", "") in model.state_dict().keys():
        model.state_dict()[key.replace("classficationNet.", "")].copy_(state_dict[key])
        print("Copying {} <---- {}".format(key.replace("classficationNet.", ""), key))
    else:
        print("Key {} is not found".format(key))

model.to(device)
model = nn.DataParallel(model, device_ids = [i for i in range(torch.cuda.device_count())])
criterion = torch_dice_coef_loss
optimizer = torch.optim.SGD(model.parameters(), config.lr, momentum=0.9, weight_decay=0.0, nesterov=False)

# train the model

for epoch in range(intial_epoch, config.nb_epoch):
    model.train()
    for batch_ndx, (x,y) in enumerate(train_loader):
        x, y = x.float().to(device), y.float().to(device)
        pred = model(x)
        loss = criterion(pred, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

"""


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory):
    """A folder holding WEIGHT_DIR: an untrained width-32 YNet3D saved by save_checkpoint."""
    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    model = YNet3D(cls_classes=44, width=32)
    save_checkpoint(root / WEIGHT_DIR, model, epoch=1, best_loss=1.0,
                    arch="YNet3D", model_config={"width": 32, "cls_classes": 44})
    return root


def _run_snippet(code: str, root: Path, y: torch.Tensor, monkeypatch, capsys) -> tuple[dict, str]:
    monkeypatch.chdir(root)
    x = torch.rand(1, 1, 32, 32, 16)  # one tiny cube keeps a width-32 step fast on CPU
    ns = {
        "__name__": "readme_snippet",
        "config": SimpleNamespace(batch_size=1, lr=1e-3, nb_epoch=1),
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


def test_snippets_are_the_readme_text():
    if not SEED_README.is_file():
        pytest.skip("the original README is not available here")
    blocks = re.findall(r"```python\n(.*?)```", SEED_README.read_text(), re.S)
    assert blocks == [CLASSIFICATION_SNIPPET, SEGMENTATION_SNIPPET]


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
