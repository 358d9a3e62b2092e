"""The training loop, evaluation and checkpoints."""

import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fmnist import FmnistError, __version__, data
from fmnist.model import Network


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10            # full passes over the 60,000 training images
    batch_size: int = 100       # the tutorial's batch
    lr: float = 0.01            # Adam's step size, the tutorial's
    seed: int = 0               # weights' initialisation and the batches' order
    device: str = "auto"        # auto | cpu | cuda; auto takes CUDA when present
    compile: bool = False       # torch.compile the Network
    amp: bool = False           # CUDA autocast: bf16 where supported, else fp16 with a GradScaler
    data_dir: str | None = None  # where Fashion-MNIST is (see fmnist.data); None searches
    out: str = "export"         # where fmnist.pt and metrics.jsonl are written


class Reporter:
    """Where the library tells about its progress. This one stays silent; the CLI's draws bars and lines."""

    def note(self, message: str) -> None: ...

    def epoch_start(self, epoch: int, epochs: int, samples: int) -> None: ...

    def step(self, samples_done: int, loss: torch.Tensor) -> None:
        """`loss` is still on the device: reading it syncs, so a reporter reads it only when it draws."""

    def epoch_end(self, row: dict) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FmnistError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    if name not in ("cpu", "cuda"):
        raise FmnistError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def train(config: TrainConfig, report: Reporter = Reporter()) -> list[dict]:
    """Train the Network as `config` says; after each epoch, write the checkpoint and metrics to config.out.

    Returns the metrics, one dict per epoch.
    """
    device = resolve_device(config.device)
    out = prepare_out(config.out)
    torch.manual_seed(config.seed)
    train_x, train_y = data.to_tensors(data.load("train", config.data_dir), device)
    test_x, test_y = data.to_tensors(data.load("test", config.data_dir), device)

    model = Network().to(device)
    forward = torch.compile(model) if config.compile else model   # save `model`: compiled keys gain _orig_mod.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step = make_step(forward, optimizer, _amp_dtype(config.amp, device, report))
    order = torch.Generator(device=device).manual_seed(config.seed)   # the batches' order, epoch by epoch
    n = len(train_x)
    history = []

    # repeat for epochs
    for epoch in range(1, config.epochs + 1):
        model.train()
        report.epoch_start(epoch, config.epochs, n)
        start = time.perf_counter()
        total_loss, total_correct = train_epoch(step, train_x, train_y, config.batch_size, order, report)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        test_loss, test_accuracy = evaluate(model, test_x, test_y)
        history.append({
            "epoch": epoch,
            "train_loss": total_loss.item() / n,             # running mean over the epoch, in train mode
            "train_accuracy": total_correct.item() / n,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "train_seconds": seconds,
            "samples_per_second": n / seconds,
        })
        save_checkpoint(out / "fmnist.pt", model, optimizer, config, history)
        write_metrics(out / "metrics.jsonl", history)
        report.epoch_end(history[-1])
    return history


def train_epoch(step, images: torch.Tensor, labels: torch.Tensor, batch_size: int, order: torch.Generator,
                report: Reporter = Reporter()) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over all `images` in a random order. Returns the summed loss and the number of correct
    predictions, both still on the device: nothing here waits for the device until the caller reads them."""
    n = len(images)
    permutation = torch.randperm(n, device=images.device, generator=order)
    total_loss = torch.zeros((), device=images.device)
    total_correct = torch.zeros((), device=images.device, dtype=torch.long)

    # repeat for the epoch
    for i in range(0, n, batch_size):
        # get batch: one indexing operation on the device, no DataLoader
        index = permutation[i:i + batch_size]
        loss, correct = step(images[index], labels[index])

        total_loss += loss * len(index)
        total_correct += correct
        report.step(i + len(index), loss)
    return total_loss, total_correct


def make_step(forward, optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None = None):
    """The training step on one batch: pass batch, calculate loss, calculate gradients, update weights.

    `forward` is the Network (or its torch.compile'd form). amp_dtype: None trains in float32; bfloat16 or
    float16 runs the forward pass under CUDA autocast, float16 with a GradScaler against underflow.
    """
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def step(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pass batch
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            preds = forward(images)
            # calculate loss
            loss = F.cross_entropy(preds, labels)

        # calculate gradients
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()

        # update weights
        scaler.step(optimizer)
        scaler.update()
        return loss.detach(), (preds.argmax(dim=1) == labels).sum()

    return step


def _amp_dtype(amp: bool, device: torch.device, report: Reporter) -> torch.dtype | None:
    """The autocast dtype, or None for float32 throughout."""
    if not amp:
        return None
    if device.type != "cuda":
        report.note("--amp is CUDA autocast: this run is on the CPU, so it trains in float32 as without --amp")
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---- evaluation ----------------------------------------------------------------------------------

@torch.inference_mode()
def infer(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Logits (N, 10) for images (N, 1, 28, 28), in eval mode; batched to bound the memory of conv1's output."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy as a fraction) of the model on these images."""
    logits = infer(model, images)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(dim=1) == labels).float().mean().item()


# ---- files ---------------------------------------------------------------------------------------

def prepare_out(folder: str | Path) -> Path:
    """Make sure we can write in `folder` before spending time on training."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FmnistError(f"{out}: cannot write there ({e.strerror}); choose another folder") from None
    return out


@contextmanager
def atomic_path(path: Path):
    """A temporary name to write to; renamed to `path` when the block succeeds, removed when it fails.

    So an interruption or a failed check never leaves a half-written file, nor harms the one already there.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, model, optimizer, config: TrainConfig, history: list[dict]) -> None:
    """Weights under "model" (the plain Network's state_dict) and only plain-typed metadata beside them,
    so that torch.load(path, weights_only=True) reads it all."""
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": history[-1]["epoch"],
        "config": asdict(config),
        "metrics": history,
        "versions": {"fmnist": __version__, "torch": str(torch.__version__), "python": platform.python_version()},
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by save_checkpoint, read safely (weights_only: a hostile file cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise FmnistError(f"checkpoint {path} not found; train one with `fmnist train` or pass --checkpoint PATH")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FmnistError(f"{path} is not a readable fmnist checkpoint ({type(e).__name__}); pass a fmnist.pt "
                          "written by `fmnist train`") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise FmnistError(f"{path} is not an fmnist checkpoint (no 'model' entry); pass a fmnist.pt written by "
                          "`fmnist train`")
    return checkpoint


def load_network(path: str | Path) -> Network:
    """The Network with a checkpoint's weights, in eval mode on the CPU."""
    model = Network()
    try:
        model.load_state_dict(load_checkpoint(path)["model"])
    except RuntimeError:
        raise FmnistError(f"{path} holds the weights of another architecture, not the tutorial's Network") from None
    return model.eval()


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl: one JSON object per epoch, rewritten whole (and atomically) after each epoch."""
    text = "".join(json.dumps(row) + "\n" for row in history)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
