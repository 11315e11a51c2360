"""Batch Manhattan (liao2016): gradient descent on the sign of the mini-batch gradient."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._select import Selector, as_selector, check_all_used, last_weight_layer, matches, named_trainable

__all__ = ["BatchManhattan", "manhattan_param_groups"]


class BatchManhattan(Optimizer):
    r"""Batch Manhattan (liao2016): each weight moves by the sign of its mini-batch gradient.

    Per parameter ``W`` with gradient ``g``, as in xiao2018's reference code:

    .. math::
        d = \operatorname{sign}(g) + \lambda W, \qquad
        \text{buf} \leftarrow \mu\,\text{buf} + d, \qquad
        W \leftarrow W - \eta\,\text{buf}

    with ``buf`` starting at 0 (so the first step uses ``d``). Entries whose gradient is exactly 0 get
    ``sign(0) = 0``. A param group with ``manhattan=False`` uses ``d = g + λW`` instead, which is exactly
    :class:`torch.optim.SGD` with the same ``momentum`` and ``weight_decay`` (dampening 0, no Nesterov), e.g. to
    keep the output layer on plain SGD (see :func:`manhattan_param_groups`).

    The update is the same sequence of elementwise ops as SGD's plus the sign: on CUDA a handful of
    ``torch._foreach_*`` kernels per param group, elsewhere one short loop per tensor (faster on CPU), chosen as
    :class:`torch.optim.SGD` chooses by default.

    lr schedulers, param groups and ``state_dict``/``load_state_dict`` (state key ``momentum_buffer``, as in
    SGD) work as for any ``torch.optim`` optimizer.

    Args:
        params: parameters or param groups; a group may set ``lr``, ``momentum``, ``weight_decay`` and
            ``manhattan``.
        lr: learning rate η (the step length of every entry when ``momentum=0`` and ``weight_decay=0``).
        momentum: momentum factor μ ≥ 0.
        weight_decay: weight decay λ ≥ 0, added to ``sign(g)`` (not to ``g``) as in xiao2018.
        manhattan: default for groups that do not set it; False gives plain SGD.
        foreach: True for the multi-tensor kernels, False for a loop over tensors, None (default) for
            multi-tensor kernels when every parameter of the group is on a CUDA device.

    Examples::

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = BatchManhattan(manhattan_param_groups(net, plain_last_layer=True), lr=1e-3, momentum=0.9)
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, manhattan: bool = True, foreach: bool | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, manhattan=manhattan, foreach=foreach)
        _check_group(defaults, "BatchManhattan")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1], f"BatchManhattan param group {len(self.param_groups) - 1}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Raises:
            ValueError: for a sparse gradient (not supported).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise ValueError("BatchManhattan does not support sparse gradients; use dense parameters")
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            options = dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                           manhattan=group["manhattan"])
            foreach = group.get("foreach")
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            if foreach:
                _multi_tensor_update(params, grads, bufs, **options)
            else:
                for i, (p, g) in enumerate(zip(params, grads)):
                    bufs[i] = _single_tensor_update(p, g, bufs[i], **options)
            if group["momentum"] != 0:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
        return loss


def _multi_tensor_update(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], *, lr: float,
                         momentum: float, weight_decay: float, manhattan: bool) -> None:
    """One BM/SGD step on lists of tensors with ``torch._foreach_*`` kernels; puts the new momentum buffers into
    ``bufs`` when momentum is on."""
    if manhattan:
        # sign(g) is a fresh tensor that becomes the new momentum buffer: μ·buf and λW are added into it in place,
        # so the step reads and writes memory as often as SGD's (the caching allocator makes the swap free).
        direction = torch._foreach_sign(grads)
        if momentum != 0:
            old = [i for i, buf in enumerate(bufs) if buf is not None]  # buf starts at 0: nothing to add
            if old:
                torch._foreach_add_([direction[i] for i in old], [bufs[i] for i in old], alpha=momentum)
        if weight_decay != 0:
            torch._foreach_add_(direction, params, alpha=weight_decay)
        if momentum != 0:
            bufs[:] = direction
    else:
        # torch.optim.SGD's own sequence of ops, so plain groups match it bit for bit
        direction = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else list(grads)
        if momentum != 0:
            old = [i for i, buf in enumerate(bufs) if buf is not None]
            if old:
                olds = [bufs[i] for i in old]
                torch._foreach_mul_(olds, momentum)
                torch._foreach_add_(olds, [direction[i] for i in old])
            for i, buf in enumerate(bufs):
                if buf is None:
                    bufs[i] = torch.clone(direction[i]).detach()
            direction = bufs  # type: ignore[assignment]
    torch._foreach_add_(params, direction, alpha=-lr)


def _single_tensor_update(param: Tensor, grad: Tensor, buf: Tensor | None, *, lr: float, momentum: float,
                          weight_decay: float, manhattan: bool) -> Tensor | None:
    """The same step for one tensor; returns the momentum buffer. The buffer is updated in place (a fresh buffer
    per step would cost page faults on the CPU)."""
    if manhattan:
        direction = torch.sign(grad)
        if weight_decay != 0:
            direction.add_(param, alpha=weight_decay)
    else:
        direction = grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad
    if momentum != 0:
        if buf is None:
            buf = direction if manhattan else torch.clone(direction).detach()
        elif manhattan:
            torch.add(direction, buf, alpha=momentum, out=buf)  # one pass: buf = d + μ·buf
        else:
            buf.mul_(momentum).add_(direction)  # SGD's ops, bit for bit
        direction = buf
    param.add_(direction, alpha=-lr)
    return buf


def _check_group(group: dict[str, Any], where: str) -> None:
    for key in ("lr", "momentum", "weight_decay"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{where}: {key} must be a number >= 0, got {value!r}")
    if group.get("foreach") not in (None, True, False):
        raise ValueError(f"{where}: foreach must be None, True or False, got {group['foreach']!r}")
    if not isinstance(group["manhattan"], bool):
        raise ValueError(f"{where}: manhattan must be True (sign step) or False (plain SGD), "
                         f"got {group['manhattan']!r}")


def manhattan_param_groups(model: nn.Module, plain: Selector = (), *, plain_last_layer: bool = False,
                           **group_options: Any) -> list[dict[str, Any]]:
    """Param groups for :class:`BatchManhattan`: sign steps everywhere except the parameters chosen as plain SGD.

    Args:
        model: the model (DDP / ``torch.compile`` wrappers are looked through).
        plain: layer or parameter names, ``fnmatch`` patterns or module types whose parameters take plain SGD
            steps, e.g. ``("fc",)``, ``"head.*"`` or ``nn.BatchNorm2d``.
        plain_last_layer: also put the output layer (the last linear/conv layer in registration order, the one
            ``convert(..., last_layer=...)`` treats as the output) on plain SGD, as xiao2018's code allows.
        **group_options: extra options for both groups, e.g. ``weight_decay=1e-4``.

    Returns:
        ``[{"params": [...], "manhattan": True, ...}, {"params": [...], "manhattan": False, ...}]``, leaving
        out an empty group. Only parameters with ``requires_grad`` are included.

    Raises:
        ValueError: when an item of ``plain`` matches nothing (listing the names that exist), or the model
            has no trainable parameter.
    """
    items = as_selector(plain, "plain")
    if "manhattan" in group_options or "params" in group_options:
        raise ValueError("manhattan_param_groups sets 'params' and 'manhattan' itself; pass other group options")
    if plain_last_layer:
        items.append(last_weight_layer(model))
    entries = list(named_trainable(model))
    if not entries:
        raise ValueError("the model has no parameter with requires_grad=True")
    check_all_used(items, [(name, module) for name, module, _ in entries], "plain", "trainable parameters")
    sign_params = [p for name, module, p in entries if not matches(name, module, items)]
    plain_params = [p for name, module, p in entries if matches(name, module, items)]
    groups = [{"params": sign_params, "manhattan": True, **group_options},
              {"params": plain_params, "manhattan": False, **group_options}]
    return [g for g in groups if g["params"]]
