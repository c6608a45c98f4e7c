import pytest
import torch
from torch import nn

from fedsim.config import ConfigError
from fedsim.models import CME_DEFAULT_LAYER, HEAD_WIDTH, MODELS, build_model, list_models, register_model
from fedsim.models.aicnet3d import AICNet3D
from fedsim.models.h3denet import WIDTHS
from fedsim.models.landmark_heads import LandmarkNet
from fedsim.models.sharing import shared_parameter_names
from fedsim.registry import UnknownNameError

FEATURES = {"resnet50": 2048, "densenet121": 1024, "alexnet_skip": 256, "small_cnn": 64}
AICNET3D = ["aicnet3d_epa", "aicnet3d_hemiretinal", "aicnet3d_hemiretinal_neuronaxon", "aicnet3d_neuronaxon", "aicnet3d_plain"]
LANDMARK = ["h3denet", "h3denet_heatmap", "unet3d"]


def test_one_registry_holds_the_2d_oct_and_ct_models_by_task():
    assert list_models(task="brain_mri") == ["alexnet_skip", "densenet121", "resnet50", "small_cnn"]
    assert list_models(task="aicnet3d") == AICNET3D
    assert list_models(task="h3denet") == LANDMARK
    assert list_models() == sorted([*FEATURES, *AICNET3D, *LANDMARK])
    assert list_models(task="no_such_task") == []


def test_3d_models_build_through_the_registry():
    with torch.device("meta"):
        oct_net = build_model("aicnet3d_plain", input_shape=(16, 24, 14))
        ct_net = build_model("unet3d", size="tiny", num_landmarks=5)
    assert isinstance(oct_net, AICNet3D) and oct_net.attention is None
    assert isinstance(ct_net, LandmarkNet) and ct_net.backbone.widths == WIDTHS["tiny"].unet
    assert ct_net.head.num_landmarks == 5


def test_unknown_name_bad_config_key_and_unknown_size_are_clear_errors():
    with pytest.raises(UnknownNameError, match=r"unknown model 'resnet18'; valid choices: aicnet3d_epa, .*small_cnn, unet3d"):
        build_model("resnet18")
    with pytest.raises(
        ConfigError, match=r"model 'resnet50' takes no config key 'input_shape'; valid keys: num_classes, in_channels, spatial_dims"
    ):
        build_model("resnet50", input_shape=(16, 24, 14))
    with pytest.raises(ConfigError, match=r"unknown size 'huge'.*valid choices: tiny, quick, paper"):
        build_model("h3denet", size="huge")


def test_registration_is_one_decorator_and_duplicates_are_an_error():
    @register_model("_test_linear", tasks=("_test_task",))
    def build(width: int) -> nn.Module:
        return nn.Linear(width, 2)

    try:
        assert list_models(task="_test_task") == ["_test_linear"]
        assert build_model("_test_linear", width=3).in_features == 3
        with pytest.raises(ConfigError, match=r"needs the config key.*'width'"):
            build_model("_test_linear")
        with pytest.raises(ValueError, match="model 'resnet50' is already registered"):
            register_model("resnet50")(build)
    finally:
        MODELS._items.pop("_test_linear")


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
    with pytest.raises(ValueError, match=r"2D torchvision backbone.*alexnet_skip"):
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
    # a file for another head size: the backbone loads, mismatched head tensors keep their init
    torch.manual_seed(1)
    other = build_model("small_cnn", num_classes=6, weights=tmp_path / "w.pt")
    mismatched = {k for k, v in other.state_dict().items() if not torch.equal(v, src.state_dict()[k])}
    assert mismatched == {"head.out.bias", "head.out.weight"}
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_model("small_cnn", weights=tmp_path / "missing.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"no tensor .* matches"):
        build_model("small_cnn", weights=tmp_path / "other.pt")


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
