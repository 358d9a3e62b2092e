"""An experiment for CUDA, not yet part of `fmnist train`: the whole training step as one CUDA graph.

torch.compile's "reduce-overhead" (what `--compile` uses on CUDA) replays the forward and the backward pass
as CUDA graphs, but the loss, Adam's update and the bookkeeping are still launched kernel by kernel from
Python. At batch 100 a step is a few dozen tiny kernels, so those launches, not the arithmetic, set the
pace. Here forward, loss, backward and Adam are captured together once and each step is one replay: the
pattern of "whole-network capture" in PyTorch's CUDA semantics notes. bench/test_train_speed.py times it
and checks its losses against eager torch; if it wins on a GPU, it is the candidate for `--compile` there.

Not run yet: no session so far has had a GPU. Known limits, fine for the benchmark's constant step size:
the step size is captured as a number, so a schedule would need it as a tensor (Adam accepts lr=Tensor
with capturable=True); AMP is left out.
"""

import torch
import torch.nn.functional as F

from fmnist.train import TrainingState


def graphed_step(forward, state: TrainingState, batch_size: int, warmup_steps: int = 3):
    """A step(images, labels) -> (loss, correct) like make_step's, whose work is one CUDA graph replay.

    `forward` is state.model or its torch.compile'd form (compiled in default mode: the graph is ours).
    state.optimizer is replaced by a capturable fused Adam with the same settings.
    """
    model, device = state.model, next(state.model.parameters()).device
    group = state.optimizer.param_groups[0]
    state.optimizer = optimizer = torch.optim.Adam(model.parameters(), lr=group["lr"], betas=group["betas"],
                                                   eps=group["eps"], fused=True, capturable=True)
    images = torch.zeros(batch_size, 1, 28, 28, device=device)   # the graph reads its inputs here
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)

    def whole_step():
        preds = forward(images)
        loss = F.cross_entropy(preds, labels)
        loss.backward()
        optimizer.step()
        return loss.detach(), (preds.argmax(dim=1) == labels).sum()

    # Warm up outside the graph, on a side stream as capture requires: torch.compile compiles, cuDNN and
    # cuBLAS pick their kernels, Adam makes its state. Then put the weights and Adam's state back as they
    # were, in place: the graph will read and write these very tensors.
    weights = [p.detach().clone() for p in model.parameters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            optimizer.zero_grad(set_to_none=True)
            whole_step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(w)
            for value in optimizer.state[p].values():   # step, exp_avg, exp_avg_sq: all start at zero
                value.zero_()

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)   # backward in the capture makes the gradients in the graph's memory
    with torch.cuda.graph(graph):
        loss, correct = whole_step()

    def step(batch_images: torch.Tensor, batch_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images.copy_(batch_images)
        labels.copy_(batch_labels)
        graph.replay()
        return loss.clone(), correct.clone()   # the next replay overwrites the graph's own

    return step
