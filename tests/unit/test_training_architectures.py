"""The small networks for Fashion-MNIST-sized images: shapes, sizes, widths, test-time flip."""

from __future__ import annotations

import pytest
import torch

from perito_training.architectures import PooledNetwork, get_architecture, vgg_net
from perito_training.config import ModelConfig


def _multiply_adds(network: torch.nn.Module, size: int) -> int:
    total = 0

    def count(module: torch.nn.Module, _: object, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels
            total += output[0].numel() * kernel // module.groups
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in network.modules()]
    network.eval()
    with torch.no_grad():
        network(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return total


def test_vgg7_is_what_its_description_says() -> None:
    architecture = get_architecture("vgg7")
    network = architecture.build(10, ModelConfig(architecture="vgg7", input_size=28))
    assert isinstance(network, PooledNetwork)
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 64, 128, 128, 256]
    assert sum(p.numel() for p in network.parameters()) == pytest.approx(0.58e6, rel=0.01)
    assert _multiply_adds(network, 28) == pytest.approx(27.1e6, rel=0.01)
    network.train()
    logits = network(torch.rand(2, 3, 28, 28))
    assert logits.shape == (2, 10)
    logits.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in network.parameters())


def test_vgg7_widths_scale_every_stage() -> None:
    config = ModelConfig(architecture="vgg7", widths=(8, 16, 24, 40), dropout=0.0)
    network = get_architecture("vgg7").build(4, config)
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 16, 24, 24, 40]
    assert network(torch.rand(1, 3, 33, 33)).shape == (1, 4)  # any size: global pooling
    with pytest.raises(ValueError, match="vgg7 takes 4 widths"):
        vgg_net((8, 16), 4, ModelConfig(architecture="vgg7"))


def test_vgg7_test_time_flip_averages_the_mirror_image_in_eval_mode() -> None:
    torch.manual_seed(0)
    config = ModelConfig(architecture="vgg7", widths=(8, 8, 8, 8), test_time_flip=True)
    network = get_architecture("vgg7").build(3, config).eval()
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        expected = (network.once(x) + network.once(x.flip(3))) / 2  # type: ignore[operator]
        torch.testing.assert_close(network(x), expected)
        torch.testing.assert_close(network(x), network(x.flip(3)))
