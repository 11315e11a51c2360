"""Evaluation and the running sums of training (loss and accuracy summed on the device, reduced over processes),
and the analysis records of :func:`bioprop.metrics.training_metrics`."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import metrics
from . import distributed as dist_utils
from .build import LossFn

if TYPE_CHECKING:
    from .runlog import MetricsLog, TensorBoardLog

__all__ = ["evaluate", "RunningSums", "record_analysis"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, loss_fn: LossFn, *, device: torch.device, amp: bool = False,
             channels_last: bool = False, env: dist_utils.DistEnv = dist_utils.DistEnv()) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over a loader, summed over all processes' shards.

    Returns:
        ``{"loss", "acc", "top5", "error"}``: mean loss, accuracies as fractions, top-1 error in %.
    """
    dist_utils.sync_buffers(model, env)  # every rank scores rank 0's model (its BN statistics included)
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct@1, correct@5
    count = 0
    for x, y in loader:
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)  # (B, K)
        k = min(5, logits.shape[1])
        hits = logits.float().topk(k, dim=1).indices.eq(y[:, None])  # (B, k)
        sums += torch.stack([loss_fn(logits, y).double() * y.shape[0], hits[:, 0].sum().double(),
                             hits.any(dim=1).sum().double()])
        count += y.shape[0]
    values = torch.cat([sums, sums.new_tensor([float(count)])])
    loss_sum, c1, c5, n = dist_utils.all_reduce_sum(values, env).tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "acc": c1 / n, "top5": c5 / n, "error": 100.0 * (1.0 - c1 / n)}


class RunningSums:
    """Loss and accuracy summed on the device between two reads, so that a step never waits for the device."""

    def __init__(self, device: torch.device, step: int) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss·n, correct
        self.count = 0  # samples, known on the host
        self.first_step = step + 1
        self.start = time.perf_counter()

    @torch.no_grad()
    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        n = y.shape[0]
        correct = (logits.argmax(dim=1) == y).sum()
        self.sums += torch.stack([loss.detach().double() * n, correct.double()])
        self.count += n

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def read(self, env: dist_utils.DistEnv, step: int) -> dict[str, float]:
        """``{"loss": loss·n, "acc": correct, "n": n}`` summed over all processes since the last read; starts a
        new window."""
        values = torch.cat([self.sums, self.sums.new_tensor([float(self.count)])])
        loss_sum, correct, n = dist_utils.all_reduce_sum(values, env).tolist()
        self.sums.zero_()
        self.count, self.first_step, self.start = 0, step + 1, time.perf_counter()
        return {"loss": loss_sum, "acc": correct, "n": n}


def record_analysis(model: nn.Module, head: dict[str, Any], device: torch.device, log: MetricsLog,
                    layer_log: MetricsLog, tb: TensorBoardLog, x: Tensor | None = None, y: Tensor | None = None,
                    loss_fn: LossFn | None = None) -> None:
    """Record :func:`bioprop.metrics.training_metrics` of ``model`` (with a batch ``x``, ``y`` and ``loss_fn``
    also the gradient metrics), with the time it took: the per-layer values go to ``layer_log``
    (``metrics_layers.jsonl``), their summary (mean/min/max over layers) to ``log``.

    Args:
        head: the record's first fields (``kind``, ``epoch``, ``step``).
    """
    start = time.perf_counter()
    values = metrics.training_metrics(model, x, y, loss_fn)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    values = metrics.jsonable(values)
    layer_log.write({**head, "metrics": values})
    log.write({**head, "time_s": seconds, "summary": metrics.summarize_metrics(values)})
    tb.record({**head, "metrics": values})
