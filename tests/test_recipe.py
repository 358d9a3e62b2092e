import time

import pytest
import torch

from fmnist import FmnistError, data
from fmnist.loop import TrainingState, autocast_dtype, compile_ahead, compiled_network, make_step, train_epoch
from fmnist.train import TrainConfig, recipe


def test_seed_recipe_is_the_tutorials():
    c = recipe("seed")
    assert (c.epochs, c.batch_size, c.lr, c.schedule) == (10, 100, 0.01, "constant")
    assert (c.flip, c.shift, c.label_smoothing, c.ema) == (False, 0, 0.0, 0.0)


def test_tuned_recipe_is_the_default_and_options_win():
    c = recipe("tuned")
    assert (c.epochs, c.batch_size, c.lr, c.schedule) == (30, 128, 0.005, "onecycle")   # docs/training.md's table
    assert (c.flip, c.shift, c.label_smoothing, c.ema) == (False, 1, 0.1, 0.0)
    assert TrainConfig().epochs == c.epochs   # what `fmnist train` takes without --recipe
    assert recipe("seed", lr=0.002, epochs=None).lr == 0.002 and recipe("seed", epochs=None).epochs == 10
    assert recipe("tuned", flip=False).flip is False
    with pytest.raises(FmnistError, match="--recipe best: choose one of tuned, seed"):
        recipe("best")


def test_augment_makes_flips_and_shifts_of_each_image():
    images = torch.rand(64, 1, 28, 28)
    out = data.augment(images, flip=True, shift=2, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flipped_count, offsets = 0, set()
    for original, got in zip(padded, out, strict=True):
        matches = [(flip, dy, dx) for flip in (False, True) for dy in range(5) for dx in range(5)
                   if torch.equal((original.flip(2) if flip else original)[:, dy:dy + 28, dx:dx + 28], got)]
        assert matches, "an augmented image is not a flip and shift of its original"
        flipped_count += matches[0][0]
        offsets.add(matches[0][1:])
    assert 16 <= flipped_count <= 48            # about half; 64 fair coins land outside this once in 10^4
    assert len(offsets) >= 15                   # 64 draws of 25 offsets: fewer than 15 distinct, about never
    again = data.augment(images, flip=True, shift=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert data.augment(images, flip=False, shift=0, generator=None) is images


def losses_of_a_few_steps(images, labels, seed, compiled=False, steps=5):
    config = recipe("tuned", seed=seed, batch_size=100, epochs=1)
    torch.manual_seed(seed)
    state = TrainingState(config, torch.device("cpu"), steps_per_epoch=steps)
    forward = compiled_network(state.model, torch.device("cpu")) if compiled else state.model
    step = make_step(forward, state, config.label_smoothing)
    losses = [step(data.augment(images[i * 100:(i + 1) * 100], config.flip, config.shift, state.order),
                   labels[i * 100:(i + 1) * 100])[0].item() for i in range(steps)]
    return losses, state.model.state_dict()


@pytest.fixture(scope="module")
def first_images(real_data):
    images, labels = data.to_tensors(data.load("train", download=False), "cpu")
    return images[:500], labels[:500]


def test_same_seed_gives_the_same_steps_on_cpu(first_images):
    losses, weights = losses_of_a_few_steps(*first_images, seed=3)
    again, weights_again = losses_of_a_few_steps(*first_images, seed=3)
    other, _ = losses_of_a_few_steps(*first_images, seed=4)
    assert losses == again and all(torch.equal(weights[k], weights_again[k]) for k in weights)
    assert other != losses


def test_compiled_step_matches_the_eager_step(first_images):
    eager, _ = losses_of_a_few_steps(*first_images, seed=0)
    compiled, _ = losses_of_a_few_steps(*first_images, seed=0, compiled=True)
    # Stated tolerance: inductor reorders float32 sums, and five Adam steps carry the differences along.
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_compile_ahead_compiles_every_batch_size_and_leaves_the_weights(first_images):
    images, labels = (t[:250] for t in first_images)   # batches of 100, 100 and a last one of 50
    config = recipe("seed")
    torch.manual_seed(0)
    state = TrainingState(config, torch.device("cpu"), steps_per_epoch=3)
    before = {name: value.clone() for name, value in state.model.state_dict().items()}
    step = make_step(compiled_network(state.model, torch.device("cpu")), state)
    start = time.perf_counter()
    seconds = compile_ahead(step, images, labels, batch_size=100)
    assert 0 < seconds <= time.perf_counter() - start   # the time it reports is its own
    assert all(torch.equal(before[name], value) for name, value in state.model.state_dict().items())
    assert all(p.grad is None for p in state.model.parameters()) and not state.optimizer.state
    with torch._dynamo.config.patch(error_on_recompile=True):   # the epoch compiles nothing more
        total_loss, _ = train_epoch(step, images, labels, config, state.order)
    assert torch.isfinite(total_loss) and state.optimizer.state[state.model.out.bias]["step"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP is CUDA autocast; this machine has no CUDA")
def test_amp_step_on_cuda_follows_float32(first_images):
    images, labels = (t.cuda() for t in first_images)
    config = recipe("seed", device="cuda", amp=True)
    results = []
    for amp_dtype in (None, autocast_dtype(True, torch.device("cuda"))):
        torch.manual_seed(0)
        state = TrainingState(config, torch.device("cuda"), steps_per_epoch=5, amp_dtype=amp_dtype)
        step = make_step(state.model, state, amp_dtype=amp_dtype)
        results.append([step(images[i * 100:(i + 1) * 100], labels[i * 100:(i + 1) * 100])[0].item()
                        for i in range(5)])
    assert results[1] == pytest.approx(results[0], rel=3e-2)   # 16-bit forward pass: about 2 digits


def test_one_epoch_of_the_loop_counts_every_image(first_images):
    images, labels = first_images
    config = recipe("seed", batch_size=128)   # 500 = 3 x 128 + 116: the last batch is partial
    torch.manual_seed(0)
    state = TrainingState(config, torch.device("cpu"), steps_per_epoch=4)
    real_step, steps = make_step(state.model, state), []

    def recorded_step(batch_images, batch_labels):   # the real step; what it saw and said is kept
        loss, correct = real_step(batch_images, batch_labels)
        steps.append((len(batch_images), loss.item(), int(correct)))
        return loss, correct

    total_loss, correct = train_epoch(recorded_step, images, labels, config, state.order)
    assert [size for size, _, _ in steps] == [128, 128, 128, 116]
    assert int(correct) == sum(c for _, _, c in steps)                                  # every image counted
    assert total_loss.item() == pytest.approx(sum(size * loss for size, loss, _ in steps), rel=1e-6)  # by its size
    assert state.optimizer.state[state.model.conv1.weight]["step"] == 4
