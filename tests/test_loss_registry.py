"""Loss registry: lookups by name and config dict, graph and surrogate files, clear errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.tasks.segmentation import baselines as seg_losses
from components.errors import LossforgeError
from components.tasks.loss_registry import LOSSES, build_loss, loss_name, register_loss

# The AutoLoss-Zero search space can express cross-entropy: neg(mul(y, log(y_hat))), Eq. 3 divides the
# sum over (N, C, H, W) by N·H·W, so the graph equals the mean per-pixel cross-entropy.
CE_GRAPH = {
    "format": "lossforge.loss/1",
    "task": "segmentation",
    "branches": {
        "seg": {
            "operator_set": "autoloss_zero",
            "tree": {"op": "neg", "children": [
                {"op": "mul", "children": [{"input": "y"}, {"op": "log", "children": [{"input": "y_hat"}]}]}
            ]},
        }
    },
}


def _batch(seed=0, n=2, c=4, h=6, w=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g)
    target = torch.randint(0, c, (n, h, w), generator=g)
    return logits, target


def test_every_baseline_is_registered_by_its_name():
    for name, cls in seg_losses.BASELINE_LOSSES.items():
        assert name in LOSSES
        assert isinstance(build_loss(name), cls)
    assert {"ce", "weighted_ce", "dice", "lovasz", "focal", "soft_iou"} <= set(LOSSES.names())


def test_name_string_and_dict_build_the_same_loss():
    logits, target = _batch()
    ce = build_loss("ce")
    assert torch.allclose(ce(logits, target), F.cross_entropy(logits, target))
    assert torch.allclose(build_loss({"type": "ce"})(logits, target), ce(logits, target))


def test_dict_kwargs_reach_the_constructor():
    focal = build_loss({"type": "focal", "gamma": 0.0})
    logits, target = _batch(1)
    # focal loss with gamma = 0 (and no alpha) is cross-entropy
    assert torch.allclose(focal(logits, target), F.cross_entropy(logits, target), atol=1e-6)
    g3 = build_loss({"type": "focal", "gamma": 3.0})(logits, target)
    assert not torch.allclose(g3, focal(logits, target))


def test_unknown_type_lists_the_known_types():
    with pytest.raises(LossforgeError) as err:
        build_loss("hinge_of_doom")
    msg = str(err.value)
    assert "hinge_of_doom" in msg and "ce" in msg and "graph" in msg and "surrogate" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"gamma": 2}, "no 'type'"),
        ({"type": 3}, "type"),
        (42, "int"),
        ({"type": "focal", "gama": 2}, "gama"),
        ({"type": "graph"}, "path"),
        ({"type": "surrogate", "path": "x.json"}, "num_classes"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, needle):
    with pytest.raises(LossforgeError, match=needle):
        build_loss(spec)


def test_register_loss_decorator_and_conflicts():
    @register_loss("test_mean_logit")
    class MeanLogit(nn.Module):
        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def forward(self, logits, target):
            return self.scale * logits.mean()

    logits, target = _batch()
    built = build_loss({"type": "test_mean_logit", "scale": 2.0})
    assert isinstance(built, MeanLogit)
    assert torch.allclose(built(logits, target), 2.0 * logits.mean())
    register_loss("test_mean_logit")(MeanLogit)  # same class again: fine

    class Other(nn.Module):
        pass

    with pytest.raises(LossforgeError, match="already registered"):
        register_loss("test_mean_logit")(Other)
    with pytest.raises(LossforgeError, match="reserved"):
        register_loss("graph")(Other)
    with pytest.raises(LossforgeError, match="nn.Module"):
        register_loss("test_not_a_module")(object)


def test_graph_file_builds_a_loss_equal_to_its_formula(tmp_path):
    path = tmp_path / "ce.json"
    path.write_text(json.dumps(CE_GRAPH))
    loss = build_loss({"type": "graph", "path": str(path)})
    logits, target = _batch(2)
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target), atol=1e-5)
    # ignore label 255 is masked out like F.cross_entropy(ignore_index=255)
    target[0, :2] = 255
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target, ignore_index=255), atol=1e-5)
    assert loss_name({"type": "graph", "path": str(path)}) == "graph:ce"
    # in-memory graph dicts work too (the search engine hands graphs over without files)
    assert torch.allclose(build_loss({"type": "graph", "graph": CE_GRAPH})(logits, target), loss(logits, target))


def test_graph_with_a_forbidden_operator_is_rejected(tmp_path):
    bad = json.loads(json.dumps(CE_GRAPH))
    bad["branches"]["seg"]["tree"]["op"] = "__import__"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(LossforgeError, match="__import__"):
        build_loss({"type": "graph", "path": str(path)})


def test_surrogate_file_builds_a_metric_loss(tmp_path):
    from components.surrogates.metric_surrogates import SurrogateLoss, SurrogateSpec, save_surrogate

    path = tmp_path / "miou.json"
    save_surrogate(SurrogateSpec(metrics={"mIoU": 1.0}), path)
    loss = build_loss({"type": "surrogate", "path": str(path)}, num_classes=4)
    assert isinstance(loss, SurrogateLoss)
    logits, target = _batch(3)
    perfect = 50.0 * F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    value, good = loss(logits, target), loss(perfect, target)
    assert 0.0 <= float(good) < 1e-3 < float(value) <= 1.0  # 1 − soft mIoU: ~0 for a perfect prediction


def test_loss_name_for_display():
    assert loss_name("ce") == "ce"
    assert loss_name({"type": "focal", "gamma": 2}) == "focal(gamma=2)"
    assert loss_name({"type": "dice"}) == "dice"


def test_graph_spec_with_boundary_target(tmp_path):
    from components.tasks.segmentation.probe import GraphSegLoss

    logits, _ = _batch(5, h=9, w=9)
    target = torch.zeros(2, 9, 9, dtype=torch.long)  # blocks, so that most pixels are not edges
    target[:, 3:7, 2:6] = 1
    target[1, :, 7:] = 3
    target[0, :2] = 255
    label = build_loss({"type": "graph", "graph": CE_GRAPH})
    boundary = build_loss({"type": "graph", "graph": CE_GRAPH, "target": "boundary"})
    assert isinstance(boundary, GraphSegLoss) and boundary.target == "boundary" and label.target == "label"
    assert not torch.isclose(boundary(logits, target), label(logits, target))
    # the loss JSON's metadata.target (written by a boundary-metric search) is used when the spec has none
    path = tmp_path / "bf1.json"
    path.write_text(json.dumps({**CE_GRAPH, "metadata": {"target": "boundary"}}))
    from_file = build_loss({"type": "graph", "path": str(path)})
    assert from_file.target == "boundary"
    assert torch.equal(from_file(logits, target), boundary(logits, target))
    assert build_loss({"type": "graph", "path": str(path), "target": "label"}).target == "label"
    with pytest.raises(LossforgeError, match="target must be one of label, boundary"):
        build_loss({"type": "graph", "graph": CE_GRAPH, "target": "edges"})
    with pytest.raises(LossforgeError, match="unknown key"):
        build_loss({"type": "graph", "graph": CE_GRAPH, "targt": "boundary"})
