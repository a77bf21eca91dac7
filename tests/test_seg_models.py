"""Segmentation models: every model builds offline, maps images to per-pixel logits, splits head/backbone."""

import socket

import pytest
import torch

from components.errors import LossforgeError
from components.tasks.segmentation.models import (
    MODEL_PRESETS,
    ModelConfig,
    build_model,
    model_preset,
    param_groups,
    resolve_device,
    split_parameters,
)

CONFIGS = {
    "lite": model_preset("lite", input_size=32),
    "deeplabv3plus-resnet18": ModelConfig(encoder="resnet18", decoder_channels=32, input_size=32),
    "deeplabv3plus-resnet18-os8": ModelConfig(encoder="resnet18", decoder_channels=32, output_stride=8, input_size=32),
    "deeplabv3-torchvision-mobilenet": ModelConfig(name="deeplabv3", encoder="mobilenet_v3_large", input_size=32),
}


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Fail any network connection and point every weight cache at an empty folder."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    for var in ("TORCH_HOME", "HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_model_builds_offline_and_outputs_logits_per_pixel(key, no_network):
    cfg = CONFIGS[key]
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, cfg.input_size, cfg.input_size))
    assert out.shape == (2, 5, cfg.input_size, cfg.input_size)
    assert torch.isfinite(out).all()
    assert not any(no_network.rglob("*")), "a weight file was written to the cache"


@pytest.mark.parametrize("encoder", ["resnet50", "resnet101"])
def test_paper_backbones_build_offline(encoder, no_network):
    model = build_model(ModelConfig(encoder=encoder), num_classes=21)
    n_params = sum(p.numel() for p in model.encoder.parameters())
    assert n_params > 20e6  # a real ResNet-50/101, not a stub
    assert not any(no_network.rglob("*"))


def test_same_seed_same_initial_weights():
    cfg = CONFIGS["lite"]
    torch.manual_seed(3)
    a = build_model(cfg, 4)
    torch.manual_seed(3)
    b = build_model(cfg, 4)
    torch.manual_seed(4)
    c = build_model(cfg, 4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


@pytest.mark.parametrize("key", ["lite", "deeplabv3-torchvision-mobilenet"])
def test_param_groups_split_head_and_backbone(key):
    model = build_model(CONFIGS[key], num_classes=3)
    groups = param_groups(model, lr=0.02, head_lr_mult=10.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.02)
    assert by_name["head"]["lr"] == pytest.approx(0.2)
    backbone_module = getattr(model, "encoder", None) or model.backbone
    assert {id(p) for p in by_name["backbone"]["params"]} == {id(p) for p in backbone_module.parameters()}
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    # the classifier's last layer (per-class logits) is in the head
    head_shapes = [tuple(p.shape) for p in by_name["head"]["params"]]
    assert any(s and s[0] == 3 for s in head_shapes)


def test_model_without_backbone_is_an_error():
    with pytest.raises(LossforgeError, match="encoder"):
        split_parameters(torch.nn.Conv2d(3, 2, 1))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "unet3000"}, "model.name"),
        ({"output_stride": 4}, "model.output_stride"),
        ({"input_size": 100}, "model.input_size"),
        ({"decoder_channels": 0}, "model.decoder_channels"),
        ({"name": "deeplabv3", "encoder": "resnet18"}, "model.encoder"),
        ({"name": "deeplabv3", "encoder": "resnet50", "decoder_channels": 64}, "model.decoder_channels"),
    ],
)
def test_bad_model_config_names_the_field(kwargs, field):
    with pytest.raises(LossforgeError, match=field):
        ModelConfig(**kwargs)


def test_unknown_encoder_and_bad_num_classes_are_clear_errors():
    with pytest.raises(LossforgeError, match="no_such_net"):
        build_model(ModelConfig(encoder="no_such_net"), 3)
    with pytest.raises(LossforgeError, match="num_classes"):
        build_model(CONFIGS["lite"], 1)
    with pytest.raises(LossforgeError, match="preset"):
        model_preset("huge")


def test_presets_carry_the_paper_settings():
    assert MODEL_PRESETS["paper_proxy"].encoder == "resnet50" and MODEL_PRESETS["paper_proxy"].input_size == 128
    assert MODEL_PRESETS["paper_retrain"].encoder == "resnet101" and MODEL_PRESETS["paper_retrain"].input_size == 512


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(LossforgeError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LossforgeError, match="CUDA"):
            resolve_device("cuda")

