import pytest
import torch

from fedsim.models import CME_DEFAULT_LAYER, HEAD_WIDTH, build_model, list_models, load_local_weights
from fedsim.models.sharing import shared_parameter_names

FEATURES = {"resnet50": 2048, "densenet121": 1024, "alexnet_skip": 256, "small_cnn": 64}


def test_registry_lists_all_models():
    assert list_models() == ["alexnet_skip", "densenet121", "resnet50", "small_cnn"]


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_standard_head_keys_and_shapes(name):
    model = build_model(name, num_classes=7, in_channels=1)
    head = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("head.")}
    assert head == {
        "head.fc1.weight": (HEAD_WIDTH, FEATURES[name]),
        "head.fc1.bias": (HEAD_WIDTH,),
        "head.fc2.weight": (HEAD_WIDTH, HEAD_WIDTH),
        "head.fc2.bias": (HEAD_WIDTH,),
        "head.out.weight": (7, HEAD_WIDTH),
        "head.out.bias": (7,),
    }
    assert model.state_dict()[CME_DEFAULT_LAYER].shape == (128, 128)


@pytest.mark.parametrize("name", sorted(FEATURES))
@pytest.mark.parametrize("size", [32, 40])
def test_forward_2d_tiny_inputs(name, size):
    model = build_model(name, num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 5)


@pytest.mark.parametrize("name", ["alexnet_skip", "small_cnn"])
def test_forward_3d_tiny_inputs(name):
    model = build_model(name, num_classes=3, in_channels=2, spatial_dims=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 2, 12, 20, 16)).shape == (2, 3)


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_torchvision_backbones_refuse_3d_with_clear_error(name):
    with pytest.raises(ValueError, match="2D torchvision backbone.*alexnet_skip"):
        build_model(name, spatial_dims=3)


def test_alexnet_skip_connections_carry_signal():
    """Zeroing conv3/conv4 must not cut the path: the 1x1 skip from conv2 still reaches the head."""
    model = build_model("alexnet_skip", num_classes=3).eval()
    bb = model.backbone
    for m in (bb.conv3[0], bb.conv4[0], bb.conv5[0]):
        torch.nn.init.zeros_(m.weight)
        torch.nn.init.zeros_(m.bias)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        feats = bb(x)
    assert feats.abs().sum() > 0


def test_local_weights_file_round_trip(tmp_path):
    src = build_model("small_cnn", num_classes=4)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = build_model("small_cnn", num_classes=4, weights=tmp_path / "w.pt")
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])
    # a file for another head size: backbone loads, mismatched head tensors are reported as skipped
    other = build_model("small_cnn", num_classes=6)
    skipped = load_local_weights(other, tmp_path / "w.pt")
    assert skipped == ["head.out.bias", "head.out.weight"]
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_model("small_cnn", weights=tmp_path / "missing.pt")


def test_sharing_same_model_is_whole_float_state():
    build = lambda m: build_model(m, num_classes=4)  # noqa: E731
    keys = shared_parameter_names(["resnet50", "resnet50"], build)
    state = build_model("resnet50").state_dict()
    assert set(keys) == {k for k, v in state.items() if v.dtype.is_floating_point}
    assert "backbone.bn1.running_mean" in keys and not any(k.endswith("num_batches_tracked") for k in keys)


def test_sharing_mixed_models_is_head_layers_with_equal_shapes():
    build = lambda m: build_model(m, num_classes=4)  # noqa: E731
    keys = shared_parameter_names(["resnet50", "densenet121", "alexnet_skip"], build)
    assert keys == ["head.fc1.bias", "head.fc2.weight", "head.fc2.bias", "head.out.weight", "head.out.bias"]
