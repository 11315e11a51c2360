"""Training modifiers: the Batch Manhattan optimizer and weight constraints applied after each step.

Examples::

    >>> import torch, bioprop
    >>> from bioprop.optim import BatchManhattan, ConstantNorm, FixedSign, apply_constraints, manhattan_param_groups
    >>> net = bioprop.convert(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
    ...                       "usf")
    >>> opt = BatchManhattan(manhattan_param_groups(net, plain_last_layer=True), lr=1e-3, momentum=0.9)
    >>> constraints = [FixedSign(net), ConstantNorm(net)]
    >>> net(torch.randn(16, 4)).square().mean().backward(); opt.step(); apply_constraints(constraints)
"""
from .constraints import (CONSTRAINTS, ConstantNorm, Constraint, FixedSign, apply_constraints, create_constraint,
                          describe_constraints, list_constraints, resolve_constraint_name)
from .manhattan import BatchManhattan, manhattan_param_groups

__all__ = ["BatchManhattan", "manhattan_param_groups", "Constraint", "ConstantNorm", "FixedSign",
           "apply_constraints", "create_constraint", "list_constraints", "resolve_constraint_name",
           "describe_constraints", "CONSTRAINTS"]
