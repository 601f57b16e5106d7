"""MultiTaskUNet: heads, shapes, deep supervision, seg-only export, input checks, and that it learns."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import verify_net_in_out
from monai.networks.utils import convert_to_torchscript

from medmtl.losses import MultiTaskLoss
from medmtl.networks import MultiTaskUNet, SegmentationUNet

# tiny configurations: 3D 16^3 and 2D 32^2 inputs, bottleneck of 2 voxels per axis
TINY = {
    3: {"filters": (4, 8, 16, 32), "strides": (1, 2, 2, 2), "size": (16, 16, 16)},
    2: {"filters": (4, 8, 16, 32), "strides": (1, 2, 2, 2), "size": (32, 32)},
}

# the hippocampus default's layout, tiny: a strided first stage, a stride-1 bottleneck, a top stage
STRIDED = {"filters": (4, 8, 16, 32), "strides": (2, 2, 2, 1), "top_filters": 4}


def make_net(spatial_dims: int, **kwargs) -> MultiTaskUNet:
    torch.manual_seed(0)
    cfg = TINY[spatial_dims]
    args = {"filters": cfg["filters"], "strides": cfg["strides"], "cls_hidden": 8, **kwargs}
    return MultiTaskUNet(spatial_dims, 1, 3, **args)


def make_input(spatial_dims: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, *TINY[spatial_dims]["size"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_all_heads_keys_and_shapes(spatial_dims):
    net = make_net(spatial_dims, num_cls_outputs=4).eval()
    size = TINY[spatial_dims]["size"]
    with torch.no_grad():
        out = net(make_input(spatial_dims))
    assert set(out) == {"seg", "cls", "boundary"}
    assert out["seg"].shape == (2, 3, *size)
    assert out["cls"].shape == (2, 4)
    assert out["boundary"].shape == (2, 2, *size)  # one channel per foreground class
    assert out["boundary"].abs().max() <= 1.0  # tanh
    assert torch.isfinite(out["seg"]).all()


@pytest.mark.parametrize("off", ["cls", "boundary"])
def test_switched_off_head_has_no_parameters_and_no_output(off):
    heads = tuple(h for h in ("seg", "cls", "boundary") if h != off)
    net = make_net(3, heads=heads)
    full = make_net(3)
    names = [n for n, _ in net.named_parameters()]
    assert not any(n.startswith(f"{off}_head.") for n in names)
    assert any(n.startswith(f"{off}_head.") for n, _ in full.named_parameters())
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in full.parameters())
    out = net(make_input(3))
    assert set(out) == set(heads)


def test_segmentation_only_network():
    out = make_net(2, heads=("seg",))(make_input(2))
    assert set(out) == {"seg"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads": ("cls",)}, "must include 'seg'"),
        ({"heads": ("seg", "edges")}, "unknown head"),
        ({"strides": (1, 0, 2, 2)}, "strides must be positive"),
        ({"strides": (2, 2, 2, 1), "top_filters": 0}, "top_filters must be positive"),
        ({"deep_supervision": True, "deep_supr_num": 3}, "deep_supr_num"),
        ({"output": "tuple"}, "output must be"),
        ({"kernel_size": (3, 3)}, "kernel_size"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_net(3, **kwargs)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_deep_supervision_in_training_mode_only(spatial_dims):
    net = make_net(spatial_dims, deep_supervision=True, deep_supr_num=2)
    size = torch.tensor(TINY[spatial_dims]["size"])
    out = net.train()(make_input(spatial_dims))
    assert [tuple(t.shape) for t in out["seg_ds"]] == [
        (2, 3, *(size // 2).tolist()),
        (2, 3, *(size // 4).tolist()),
    ]
    assert out["seg"].shape == (2, 3, *size.tolist())
    with torch.no_grad():
        assert "seg_ds" not in net.eval()(make_input(spatial_dims))


def test_anisotropic_strides_and_kernels():
    net = MultiTaskUNet(
        3, 1, 2, filters=(4, 8, 16), strides=(1, (2, 2, 1), 2), kernel_size=(3, (3, 3, 1), 3), cls_hidden=8
    )
    assert net.size_divisor == (4, 4, 2)
    out = net(torch.rand(1, 1, 8, 8, 6))
    assert out["seg"].shape == (1, 2, 8, 8, 6)


def test_seg_output_shares_state_dict_and_matches_dict_network():
    dict_net = make_net(3, deep_supervision=True).eval()
    seg_net = make_net(3, deep_supervision=True, output="seg")
    torch.nn.init.normal_(seg_net.seg_head.conv.conv.weight)  # differ before loading
    assert list(seg_net.state_dict()) == list(dict_net.state_dict())
    seg_net.load_state_dict(dict_net.state_dict(), strict=True)
    x = make_input(3)
    with torch.no_grad():
        seg = seg_net.eval()(x)
        expected = dict_net(x)["seg"]
    assert isinstance(seg, torch.Tensor)
    torch.testing.assert_close(seg, expected)
    # also a tensor in training mode, where the dict network adds seg_ds
    assert isinstance(seg_net.train()(x), torch.Tensor)


def test_monai_verify_net_in_out(tmp_path):
    config = {
        "network_def": {
            "_target_": "medmtl.networks.MultiTaskUNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "num_classes": 3,
            "filters": [4, 8, 16],
            "strides": [1, 2, 2],
            "output": "seg",
        }
    }
    meta = {
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1, "spatial_shape": [8, 8, "8*n"], "dtype": "float32"}},
            "outputs": {"pred": {"num_channels": 3, "dtype": "float32"}},
        }
    }
    (tmp_path / "inference.json").write_text(json.dumps(config))
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    # raises unless the output is a tensor with the declared channels and dtype
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(tmp_path / "metadata.json"),
        config_file=str(tmp_path / "inference.json"),
        device="cpu",
        n=2,
    )


def test_torchscript_trace_of_seg_network_matches_eager(tmp_path):
    net = make_net(3, output="seg").eval()
    path = tmp_path / "model.ts"
    convert_to_torchscript(net, filename_or_obj=path, use_trace=True, inputs=[make_input(3)])
    traced = torch.jit.load(path)
    x = make_input(3)  # another input than the one traced
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"deep_supervision": True}, {"heads": ("seg",)}, {**STRIDED, "channels_last": True}],
    ids=["all-heads", "deep-supervision", "seg-only", "strided-channels-last"],
)
def test_torch_jit_script_matches_eager(kwargs):
    """Both networks script (what ckpt_export and the model zoo run) and give the eager outputs."""
    dict_net = make_net(3, **kwargs).eval()
    seg_net = make_net(3, output="seg", **kwargs).eval()
    assert isinstance(seg_net, SegmentationUNet) and seg_net.output == "seg"
    seg_net.load_state_dict(dict_net.state_dict(), strict=True)
    scripted_dict, scripted_seg = torch.jit.script(dict_net), torch.jit.script(seg_net)
    assert str(scripted_seg.forward.schema).endswith("-> Tensor")
    x = make_input(3)
    with torch.no_grad():
        expected = dict_net(x)
        got = scripted_dict(x)
        assert set(got) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value)
        torch.testing.assert_close(scripted_seg(x), expected["seg"], rtol=1e-4, atol=1e-5)
    if kwargs.get("deep_supervision"):
        assert len(scripted_dict.train()(x)["seg_ds"]) == len(dict_net.train()(x)["seg_ds"])
    # the scripted network refuses a bad input with the eager message
    with pytest.raises(torch.jit.Error, match=r"\(16, 12, 16\) is not divisible by"):
        scripted_seg(torch.rand(1, 1, 16, 12, 16))


def test_input_size_not_divisible_is_named():
    net = make_net(3)
    with pytest.raises(ValueError, match=r"\(16, 12, 16\) is not divisible by \(8, 8, 8\)"):
        net(torch.rand(1, 1, 16, 12, 16))


def test_input_too_small_or_wrong_channels():
    net = make_net(3)
    with pytest.raises(ValueError, match="one-voxel bottleneck"):
        net(torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="expects 1 input channel"):
        net(torch.rand(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="3 spatial axes"):
        net(torch.rand(1, 1, 16, 16))


def test_optimizer_steps_reduce_multitask_loss():
    torch.manual_seed(0)
    net = make_net(2, deep_supervision=True, deep_supr_num=1)
    loss_fn = MultiTaskLoss(num_classes=3)
    # a fixed batch: two discs of class 1 and 2, case label = which disc is larger
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    label = torch.zeros(2, 1, 32, 32)
    label[0, 0][(yy - 10) ** 2 + (xx - 10) ** 2 < 36] = 1
    label[0, 0][(yy - 22) ** 2 + (xx - 22) ** 2 < 16] = 2
    label[1, 0][(yy - 16) ** 2 + (xx - 8) ** 2 < 9] = 1
    label[1, 0][(yy - 16) ** 2 + (xx - 22) ** 2 < 49] = 2
    image = label / 2 + 0.1 * torch.randn_like(label)
    boundary = torch.stack([(label[:, 0] == c).float() * 2 - 1 for c in (1, 2)], dim=1)
    targets = {"label": label, "cls": torch.tensor([0, 1]), "boundary": boundary}
    losses = _fit(net, loss_fn, image, targets)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_gives_the_same_outputs_and_state_dict(spatial_dims):
    plain, fast = make_net(spatial_dims), make_net(spatial_dims, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    conv = fast.encoder[1].conv1.conv.weight
    memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    assert conv.is_contiguous(memory_format=memory_format) and not conv.is_contiguous()
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = make_input(spatial_dims)
    with torch.no_grad():
        expected, got = plain.eval()(x), fast.eval()(x)
    for key in ("seg", "boundary", "cls"):
        assert got[key].is_contiguous()  # callers may .view() the outputs
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)




@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_strided_first_stage_keeps_every_head_at_input_resolution(spatial_dims):
    net = make_net(spatial_dims, **STRIDED, num_cls_outputs=2, deep_supervision=True, deep_supr_num=2)
    size = torch.tensor(TINY[spatial_dims]["size"])
    assert net.strided_stem and net.size_divisor == (8,) * spatial_dims
    x = make_input(spatial_dims)
    out = net.train()(x)
    assert out["seg"].shape == (2, 3, *size.tolist())
    assert out["boundary"].shape == (2, 2, *size.tolist())
    assert out["cls"].shape == (2, 2)
    # deep supervision starts one level below the output: the strided input block's resolution
    assert [tuple(t.shape) for t in out["seg_ds"]] == [(2, 3, *(size // 2).tolist()), (2, 3, *(size // 4).tolist())]
    # no encoder block runs at full resolution: the first one already halves every axis
    assert net.encoder[0](x).shape[2:] == tuple((size // 2).tolist())


def test_strided_first_stage_sees_the_input_at_full_resolution():
    """The top stage reads the upsampled decoder features and the image itself, at input resolution."""
    net = make_net(3, **STRIDED).eval()
    seen = []
    net.top_block.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = make_input(3, batch=1)
    with torch.no_grad():
        net(x)
    (top_input,) = seen
    assert top_input.shape == (1, STRIDED["top_filters"] + 1, *TINY[3]["size"])
    torch.testing.assert_close(top_input[:, -1:], x)


def test_strided_first_stage_seg_output_matches_and_trains():
    dict_net = make_net(3, **STRIDED).eval()
    seg_net = make_net(3, **STRIDED, output="seg", channels_last=True)
    seg_net.load_state_dict(dict_net.state_dict(), strict=True)
    x = make_input(3)
    with torch.no_grad():
        torch.testing.assert_close(seg_net.eval()(x), dict_net(x)["seg"], rtol=1e-4, atol=1e-5)
    # learns a fixed batch: two boxes, all heads on
    torch.manual_seed(0)
    net = make_net(3, **STRIDED, num_cls_outputs=2)
    label = torch.zeros(2, 1, 16, 16, 16)
    label[:, :, 2:8, 2:14, 4:12] = 1
    label[:, :, 8:14, 2:14, 4:12] = 2
    image = label / 2 + 0.1 * torch.randn_like(label)
    boundary = torch.cat([(label == c).float() * 2 - 1 for c in (1, 2)], dim=1)
    targets = {"label": label, "cls": torch.ones(2, 2), "boundary": boundary}
    loss_fn = MultiTaskLoss(num_classes=3, cls_mode="presence")
    losses = _fit(net, loss_fn, image, targets)
    assert losses[-1] < 0.7 * losses[0], losses


def _fit(net: torch.nn.Module, loss_fn, image: torch.Tensor, targets: dict, steps: int = 12) -> list[float]:
    """Train `net` on one batch with Adam (lr 1e-2); the loss after each step."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(net(image), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
