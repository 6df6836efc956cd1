"""Shapes and published layer names of the networks."""
import pytest
import torch

from models.ynet3d import ClassificationNet3D, ContBatchNorm3d, UNet3D, YNet3D
from pytorch.engine import (LossConfig, build_model, eval_step, is_channels_last,
                            prepare_model_for_speed)

# Published parameter shapes at width 32 (every conv weight of the U-Net and the head).
PUBLISHED_SHAPES = {
    "down_tr64.ops.0.conv1.weight": (32, 1, 3, 3, 3),
    "down_tr64.ops.1.conv1.weight": (64, 32, 3, 3, 3),
    "down_tr128.ops.0.conv1.weight": (64, 64, 3, 3, 3),
    "down_tr128.ops.1.conv1.weight": (128, 64, 3, 3, 3),
    "down_tr256.ops.0.conv1.weight": (128, 128, 3, 3, 3),
    "down_tr256.ops.1.conv1.weight": (256, 128, 3, 3, 3),
    "down_tr512.ops.0.conv1.weight": (256, 256, 3, 3, 3),
    "down_tr512.ops.1.conv1.weight": (512, 256, 3, 3, 3),
    "up_tr256.up_conv.weight": (512, 512, 2, 2, 2),
    "up_tr256.ops.0.conv1.weight": (256, 768, 3, 3, 3),
    "up_tr256.ops.1.conv1.weight": (256, 256, 3, 3, 3),
    "up_tr128.up_conv.weight": (256, 256, 2, 2, 2),
    "up_tr128.ops.0.conv1.weight": (128, 384, 3, 3, 3),
    "up_tr128.ops.1.conv1.weight": (128, 128, 3, 3, 3),
    "up_tr64.up_conv.weight": (128, 128, 2, 2, 2),
    "up_tr64.ops.0.conv1.weight": (64, 192, 3, 3, 3),
    "up_tr64.ops.1.conv1.weight": (64, 64, 3, 3, 3),
    "out_tr.final_conv.weight": (1, 64, 1, 1, 1),
    "down_tr64.ops.0.bn1.running_mean": (32,),
    "clc_out.conv1.weight": (1024, 512, 3, 3, 3),
    "clc_out.bn1.weight": (1024,),
    "clc_out.fc1.weight": (44, 1024),
    "clc_out.fc1.bias": (44,),
}


def test_published_names_and_shapes_meta():
    with torch.device("meta"):
        model = YNet3D()
    sd = model.state_dict()
    for key, shape in PUBLISHED_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    unet_params = sum(v.numel() for k, v in model.named_parameters() if not k.startswith("clc_out"))
    assert unet_params == 19_073_665  # the published 3D U-Net of Models/Semantic Genesis
    with torch.device("meta"):
        unet = UNet3D()
    assert set(unet.state_dict()) == {k for k in sd if not k.startswith("clc_out")}


def test_state_dict_keys_are_exactly_the_published_ones():
    """Every key of the published Y-Net 3D, nothing more: modules without weights (max-pool,
    identity, ReLU, upsampling) and plain attributes add no key."""
    luconv = ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean",
              "bn1.running_var", "bn1.num_batches_tracked")
    levels = ("down_tr64", "down_tr128", "down_tr256", "down_tr512", "up_tr256", "up_tr128",
              "up_tr64")
    published = {f"{lv}.ops.{i}.{k}" for lv in levels for i in (0, 1) for k in luconv}
    published |= {f"up_tr{n}.up_conv.{k}" for n in (256, 128, 64) for k in ("weight", "bias")}
    published |= {"out_tr.final_conv.weight", "out_tr.final_conv.bias"}
    published |= {f"clc_out.{k}" for k in luconv + ("fc1.weight", "fc1.bias")}
    with torch.device("meta"):
        keys = list(YNet3D().state_dict())
    assert len(keys) == len(published) == 115 and set(keys) == published


@pytest.mark.parametrize("width", [4, 8])
def test_ynet_and_unet_output_and_bottleneck_shapes(width):
    x = torch.rand(2, 1, 64, 64, 32)
    y = YNet3D(cls_classes=5, width=width)
    restored, logits = y(x)
    assert restored.shape == x.shape and logits.shape == (2, 5)
    assert y.out512.shape == (2, 16 * width, 8, 8, 4)
    assert 0 <= restored.min() and restored.max() <= 1
    unet = UNet3D(width=width)
    assert unet(x).shape == x.shape and unet.out512.shape == (2, 16 * width, 8, 8, 4)
    clf = ClassificationNet3D(cls_classes=3, width=width)
    assert clf(x).shape == (2, 3)
    assert set(clf.state_dict()) <= set(y.state_dict())


def test_forward_keeps_only_the_bottleneck():
    """Forward stores ``out512`` (the README snippet reads it) and no other activation."""
    x = torch.rand(2, 1, 16, 16, 8)
    for model in (YNet3D(cls_classes=3, width=4), UNet3D(width=4),
                  ClassificationNet3D(cls_classes=3, width=4)):
        before = set(vars(model))
        model(x)
        assert set(vars(model)) - before == {"out512"}, type(model).__name__


def test_prepare_model_for_speed_sets_the_layout_and_no_global_flag():
    """The memory format is read from the weights; cuDNN/TF32 flags are left alone."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    fast = prepare_model_for_speed(build_model("en_de", 3, width=4), "cpu", channels_last=True)
    plain = prepare_model_for_speed(build_model("en_de", 3, width=4), "cpu")
    assert is_channels_last(fast) and not is_channels_last(plain)
    assert not hasattr(fast, "_channels_last_3d")
    assert flags == (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32)
    plain.load_state_dict(fast.state_dict())
    x = torch.rand(2, 1, 16, 16, 8)
    fast.eval(), plain.eval()
    a = eval_step(fast, x, x, torch.zeros(2, dtype=torch.long), LossConfig("en_de"))[0]
    b = eval_step(plain, x, x, torch.zeros(2, dtype=torch.long), LossConfig("en_de"))[0]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_autoencoder_decoder_has_no_up_conv_weights():
    ae = UNet3D(width=4, decoder="upsampling")
    assert not any("up_conv" in k for k in ae.state_dict())
    assert ae(torch.rand(1, 1, 32, 32, 16)).shape == (1, 1, 32, 32, 16)


def test_batch_stats_norm_is_used_in_eval():
    torch.manual_seed(0)
    bn = ContBatchNorm3d(3)
    x = torch.randn(4, 3, 4, 4, 4) * 5 + 2
    bn.eval()
    out = bn(x)
    # Normalised with batch statistics although in eval mode, running stats untouched.
    assert abs(out.mean().item()) < 1e-4
    assert torch.equal(bn.running_mean, torch.zeros(3))
    std = ContBatchNorm3d(3, norm="standard").eval()
    assert torch.allclose(std(x), x / (1 + 1e-5) ** 0.5, atol=1e-5)  # running stats (0, 1)


def test_input_sides_not_divisible_by_8_are_refused():
    with pytest.raises(ValueError, match="divisible by 8"):
        UNet3D(width=4)(torch.rand(1, 1, 30, 32, 16))
