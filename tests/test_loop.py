"""The training loop's parts on their own, fast, on 600 real training images: the step is the tutorial's (pass
batch, loss, gradients, update), each epoch sees every image once in the order its generator draws, the state
a checkpoint keeps resumes to the very same steps, and evaluation counts every image."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fmnist import FmnistError, data
from fmnist.graph import adam_step, start_adam_state
from fmnist.loop import MovingAverage, TrainingState, make_step, train_epoch
from fmnist.model import Network
from fmnist.train import infer, recipe

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def first(real_data):
    images, labels = data.to_tensors(data.load("train", download=False), "cpu")
    return images[:600], labels[:600]


def state_of(seed=0, **options) -> TrainingState:
    torch.manual_seed(seed)
    return TrainingState(recipe("seed", seed=seed, **options), CPU, steps_per_epoch=6)


def test_a_step_is_the_tutorials_pass_loss_gradients_update(first):
    images, labels = first[0][:100], first[1][:100]
    state = state_of()
    model = copy.deepcopy(state.model)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    preds = model(images)
    expected_loss = F.cross_entropy(preds, labels)
    adam.zero_grad()
    expected_loss.backward()
    adam.step()
    loss, correct = make_step(state.model, state)(images, labels)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6) and not loss.requires_grad
    assert int(correct) == int((preds.argmax(1) == labels).sum())
    for (name, got), want in zip(state.model.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_label_smoothing_is_the_losss_and_a_step_without_update_leaves_everything(first):
    images, labels = first[0][:100], first[1][:100]
    state = state_of(schedule="onecycle", ema=0.5)
    before = copy.deepcopy(state.model.state_dict())
    loss, correct = make_step(state.model, state, label_smoothing=0.2)(images, labels, update=False)
    with torch.no_grad():
        preds = state.model(images)
    assert loss.item() == pytest.approx(F.cross_entropy(preds, labels, label_smoothing=0.2).item(), rel=1e-6)
    assert int(correct) == int((preds.argmax(1) == labels).sum())
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    assert all(p.grad is None for p in state.model.parameters()) and not state.optimizer.state
    assert state.scheduler.last_epoch == 0 and state.ema.updates == 0


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_an_amp_step_runs_its_forward_pass_under_autocast_in_its_dtype(first, amp_dtype):
    """CUDA's AMP path, on the CPU's autocast (which takes both 16-bit types): the loss is the one computed
    under autocast in that dtype, not float32's; a float32 step asks nothing of autocast (no warning)."""
    images, labels = first[0][:100], first[1][:100]
    torch.manual_seed(0)
    state = TrainingState(recipe("seed"), CPU, steps_per_epoch=6, amp_dtype=amp_dtype)
    model = copy.deepcopy(state.model)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype):
        expected = F.cross_entropy(model(images), labels)
    with torch.no_grad():
        full = F.cross_entropy(model(images), labels)
    loss, _ = make_step(state.model, state, amp_dtype=amp_dtype)(images, labels, update=False)
    assert loss.item() == expected.item() != full.item()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = state_of()
        make_step(plain.model, plain)(images, labels)


def test_each_step_moves_the_schedule_and_the_average_once(first):
    images, labels = first
    state = state_of(schedule="cosine", ema=0.9, epochs=2)
    step = make_step(state.model, state)
    rates = []
    for i in range(3):
        rates.append(state.optimizer.param_groups[0]["lr"])
        step(images[i * 100:(i + 1) * 100], labels[i * 100:(i + 1) * 100])
    assert state.scheduler.last_epoch == 3 and state.ema.updates == 3 and int(state.ema.n_averaged) == 3
    assert rates[0] == 0.01 and rates[0] > rates[1] > rates[2]
    assert state.network() is state.ema.module
    assert any(not torch.equal(a, b) for a, b in zip(state.ema.module.parameters(), state.model.parameters(),
                                                     strict=True))


def test_the_state_holds_the_schedule_the_average_and_the_order_the_config_asks_for():
    state = state_of(seed=5, schedule="onecycle", epochs=3, lr=0.02)
    assert isinstance(state.scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert state.scheduler.total_steps == 3 * 6 and state.optimizer.param_groups[0]["max_lr"] == 0.02
    cosine = state_of(schedule="cosine", epochs=2).scheduler
    assert isinstance(cosine, torch.optim.lr_scheduler.CosineAnnealingLR) and cosine.T_max == 2 * 6
    plain = state_of()
    assert plain.scheduler is None and plain.ema is None and plain.network() is plain.model
    assert not plain.scaler.is_enabled()
    assert state_of(ema=0.75).ema.decay == 0.75
    assert torch.equal(torch.randperm(50, generator=state.order), torch.randperm(50, generator=torch.Generator()
                                                                                  .manual_seed(5)))
    assert state.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert state.optimizer.defaults["fused"] is True and state.optimizer.defaults["lr"] == 0.02


def numbered(first):
    """The images with their number written into their top-left pixel, so a step can tell which it got."""
    images, labels = first
    images = images.clone()
    images[:, 0, 0, 0] = torch.arange(len(images), dtype=images.dtype)
    return images, labels


class Reported:
    def __init__(self):
        self.done, self.losses = [], []

    def step(self, samples_done, loss):
        self.done.append(samples_done)
        self.losses.append(float(loss))


def test_an_epoch_takes_every_image_once_in_its_generators_order(first):
    images, labels = numbered(first)
    config = recipe("seed", batch_size=256)   # 600 = 256 + 256 + 88
    seen = []

    def step(batch, batch_labels):
        seen.append(batch[:, 0, 0, 0].long())
        assert torch.equal(labels[seen[-1]], batch_labels)
        return torch.tensor(1.5 + len(seen)), torch.tensor(len(batch) // 2)

    report = Reported()
    loss, correct = train_epoch(step, images, labels, config, torch.Generator().manual_seed(9), report)
    order = torch.cat(seen)
    assert torch.equal(order, torch.randperm(600, generator=torch.Generator().manual_seed(9)))
    assert [len(s) for s in seen] == [256, 256, 88] and report.done == [256, 512, 600]
    assert report.losses == [2.5, 3.5, 4.5]                       # each step's own loss, as it went
    assert loss.item() == 2.5 * 256 + 3.5 * 256 + 4.5 * 88 and int(correct) == 128 + 128 + 44


def test_an_epoch_augments_each_batch_with_the_runs_generator(first):
    images, labels = first
    config = recipe("tuned", batch_size=200, flip=True, shift=2)
    got = []

    def step(batch, batch_labels):
        got.append(batch)
        return torch.tensor(0.0), torch.tensor(0)

    train_epoch(step, images, labels, config, torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)          # the same draws, in the same order: the order first,
    order = torch.randperm(600, generator=generator)      # then each batch's flips and shifts
    for i, batch in enumerate(got):
        expected = data.augment(images[order[i * 200:(i + 1) * 200]], True, 2, generator)
        assert torch.equal(batch, expected)
    assert not torch.equal(got[0], images[order[:200]])


def test_a_resumed_state_takes_the_very_steps_an_uninterrupted_one_takes(first):
    images, labels = first

    def steps(state, count):
        step = make_step(state.model, state, 0.1)
        for i in range(count):
            batch = data.augment(images[i * 100:(i + 1) * 100], True, 1, state.order)
            step(batch, labels[i * 100:(i + 1) * 100])

    straight = state_of(schedule="onecycle", ema=0.9, flip=True, shift=1)
    steps(straight, 2)
    saved = copy.deepcopy(straight.state_dict())
    steps(straight, 2)
    resumed = state_of(seed=0, schedule="onecycle", ema=0.9, flip=True, shift=1)
    torch.manual_seed(123)                                 # whatever the new process's own seed
    resumed.load_state_dict(saved)
    steps(resumed, 2)
    for a, b in ((straight.model, resumed.model), (straight.ema.module, resumed.ema.module)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert resumed.ema.updates == 4 and resumed.scheduler.last_epoch == 4
    assert saved["device"] == "cpu" and set(saved) == {"model", "optimizer", "scheduler", "ema", "order", "device",
                                                       "scaler"}
    plain = state_of()                                     # no schedule, no average: None for both
    plain_saved = plain.state_dict()
    assert plain_saved["scheduler"] is None and plain_saved["ema"] is None
    state_of().load_state_dict(plain_saved)
    with pytest.raises(FmnistError) as caught:
        state_of().load_state_dict({**saved, "device": "cuda"})
    assert str(caught.value) == "this run was trained on cuda: resume it with --device cuda"


def test_the_moving_average_moves_a_share_of_the_way_and_copies_first():
    torch.manual_seed(0)
    model = Network()
    average = MovingAverage(model, 0.75)
    target = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update_parameters(model)                        # the first update copies
    assert all(torch.equal(a, p) for a, p in zip(average.module.parameters(), model.parameters(), strict=True))
    with torch.no_grad():
        for p, t in zip(model.parameters(), target, strict=True):
            p.copy_(t)
    average.update_parameters(model)                        # then a quarter of the way to the weights
    for a, t in zip(average.module.parameters(), target, strict=True):
        torch.testing.assert_close(a, t + 0.75)
    assert average.updates == 2 and int(average.n_averaged) == 2
    back = MovingAverage(Network(), 0.75)
    back.load_state_dict(average.state_dict())
    assert back.updates == 2
    with pytest.raises(RuntimeError, match="Missing key"):    # strict, as torch's load_state_dict
        MovingAverage(Network(), 0.75).load_state_dict({k: v for k, v in average.state_dict().items()
                                                        if k != "module.out.bias"})


def test_fp16s_loss_scale_is_kept_and_resumed():
    """fmnist takes fp16 (and so a GradScaler) on CUDA alone; its state moves the same way on the CPU."""
    torch.manual_seed(0)
    config = recipe("seed")
    half = TrainingState(config, CPU, steps_per_epoch=6, amp_dtype=torch.float16)
    assert half.scaler.is_enabled()
    half.scaler.scale(torch.tensor(1.0))                   # made on first use, at 65536
    half.scaler.update(new_scale=1024.0)
    saved = half.state_dict()
    resumed = TrainingState(config, CPU, steps_per_epoch=6, amp_dtype=torch.float16)
    resumed.load_state_dict(saved)
    assert resumed.scaler.get_scale() == 1024.0
    resumed.load_state_dict({**saved, "scaler": {}})      # an older checkpoint, without it: the scale stays
    assert resumed.scaler.get_scale() == 1024.0
    plain = state_of()
    plain.load_state_dict(saved)                           # resumed without --amp: no scaler to load into
    assert not plain.scaler.is_enabled() and plain.scaler.state_dict() == {}


def test_inference_is_batched_in_eval_mode_and_covers_every_image(first):
    torch.manual_seed(0)
    model = Network().train()
    images = first[0][:250]
    with torch.no_grad():
        expected = model(images)
    got = infer(model, images, batch_size=100)              # 100 + 100 + 50
    assert got.shape == (250, 10) and not model.training
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("decay", [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True}],
                         ids=["none", "L2", "decoupled"])
def test_adam_step_takes_the_steps_of_torchs_adam_as_its_first_beta_moves(decay):
    # The epoch graph's own Adam (a step size and first beta read from tensors) against torch's fused Adam,
    # given the same gradients, with beta1 and the step size moving as onecycle moves them.
    torch.manual_seed(0)
    theirs = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(3))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    reference = torch.optim.Adam(theirs, lr=0.01, fused=True, **decay)
    optimizer = torch.optim.Adam(ours, lr=0.01, fused=True, **decay)
    start_adam_state(optimizer)
    for k in range(6):
        lr, beta1 = 0.002 * (k + 1), 0.95 - 0.02 * k
        reference.param_groups[0].update(lr=lr, betas=(beta1, 0.999))
        for i, (a, b) in enumerate(zip(theirs, ours, strict=True)):
            a.grad = torch.randn_like(a) * (1e-7 if i else 10 ** -k)   # the bias's at the scale where eps matters
            b.grad = a.grad.clone()
        reference.step()
        adam_step(optimizer, torch.tensor(lr), torch.tensor(beta1))
    for a, b in zip(theirs, ours, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(reference.state[a][key], optimizer.state[b][key], rtol=1e-5, atol=1e-9)
    assert float(optimizer.state[ours[0]]["step"]) == 6


def test_weight_decay_is_adamws_and_zero_is_adam():
    torch.manual_seed(0)
    for decay in (0.0, 0.1):
        state = state_of(weight_decay=decay)
        reference_model = Network()
        reference_model.load_state_dict(state.model.state_dict())
        reference = torch.optim.AdamW(reference_model.parameters(), lr=state_of().optimizer.defaults["lr"],
                                      weight_decay=decay)
        for _ in range(3):
            for p, q in zip(state.model.parameters(), reference_model.parameters(), strict=True):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            state.optimizer.step()
            reference.step()
        for p, q in zip(state.model.parameters(), reference_model.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    assert state_of().optimizer.defaults["weight_decay"] == 0.0
