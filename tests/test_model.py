import torch
import torch.nn.functional as F

from fmnist import data
from fmnist.model import CLASSES, Network
from tests import tutorial


def test_same_state_dict_keys_and_shapes_as_the_tutorial():
    ours, theirs = Network().state_dict(), tutorial.Network().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert sum(p.numel() for p in Network().parameters()) == 32_998


def test_weights_move_both_ways_with_the_same_outputs():
    torch.manual_seed(1)
    images = torch.rand(16, 1, 28, 28)
    ours, theirs = Network(), tutorial.Network()
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(images), theirs(images), rtol=0, atol=0)
    theirs = tutorial.Network()
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(images), theirs(images), rtol=0, atol=0)


def test_logits_shape_and_classes():
    assert Network()(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert len(CLASSES) == 10 and CLASSES[9] == "Ankle boot"


def test_one_adam_step_lowers_the_batch_loss(real_data):
    # The tutorial's single-batch experiment, on the first 100 real training images.
    torch.manual_seed(0)
    images, labels = data.to_tensors(data.load("train", download=False), "cpu")
    images, labels = images[:100], labels[:100]
    model = Network()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    assert F.cross_entropy(model(images), labels).item() < loss.item()
