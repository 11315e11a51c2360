"""nokland2016 Fig. 3: a t-SNE of the last hidden layer of 3x400 tanh nets trained with different rules."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .figures import grid, pyplot

__all__ = ["TsneFeatures", "hidden_features", "train_tsne_features", "tsne_figure"]


@dataclass
class TsneFeatures:
    """The last hidden layer of a trained net on held-out data.

    Attributes:
        features: ``(n, width)``.
        labels: ``(n,)`` class indices.
        test_error: the net's test error in %.
    """

    features: np.ndarray
    labels: np.ndarray
    test_error: float = math.nan


def hidden_features(model: Any, x: Any, batch_size: int = 1024) -> Any:
    """The input of the model's output layer (its last linear/conv layer) for every sample of ``x``.

    Args:
        model: a classifier; evaluated in eval mode without gradients (its mode is restored).
        x: ``(N, ...)`` inputs.

    Returns:
        ``(N, features)`` tensor.
    """
    import torch

    from ..metrics import model_weight_layers
    layers = list(model_weight_layers(model))
    if not layers:
        raise ValueError("the model has no linear/conv layer whose input could be read")
    captured: list[torch.Tensor] = []
    handle = layers[-1][1].register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                model(x[start:start + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat([c.reshape(c.shape[0], -1) for c in captured])


def train_tsne_features(dataset: str = "digits", rules: Sequence[str] = ("backprop", "dfa"), *, epochs: int = 20,
                        depth: int = 3, width: int = 400, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                        root: str | Path | None = None, max_points: int = 2000) -> dict[str, TsneFeatures]:
    """Train a ``depth``×``width`` tanh MLP with each rule and read its last hidden layer on the test set.

    nokland2016 (Fig. 3) shows these features for a 3x400 tanh net on MNIST trained with BP and with DFA.
    Training uses RMSprop (as nokland2016) on softmax cross-entropy; on ``"digits"`` both nets train in a few
    seconds.

    Args:
        dataset: a name from ``bioprop.data.list_datasets()`` whose test split fits in memory, e.g. ``"digits"``
            or ``"mnist"``.
        rules: the rules to train with.
        epochs, depth, width, batch_size, lr, seed: the training setup.
        root: data root (default ``$BIOPROP_DATA`` or ``~/.cache/bioprop``).
        max_points: at most this many test samples (the first ones) are embedded.

    Returns:
        ``{rule: TsneFeatures}``.

    Raises:
        ValueError: unknown data set or rule. ``bioprop.data.DatasetNotFoundError`` if the data is missing.
    """
    import torch

    from ..data import load_dataset

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        data = load_dataset(dataset, split, root=root)
        mean = torch.tensor(data.mean).view(1, -1, 1, 1)
        std = torch.tensor(data.std).view(1, -1, 1, 1)
        return (data.images.float() / 255.0 - mean) / std, data.labels, data  # (N, C, H, W), (N,)

    x_train, y_train, train = tensors("train")
    x_test, y_test, _ = tensors("test")
    x_test, y_test = x_test[:max_points], y_test[:max_points]
    out: dict[str, TsneFeatures] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 64 through 400 units: one thread is fastest, and immune to contention
    try:
        for rule in rules:
            out[rule] = _train_one(rule, x_train, y_train, x_test, y_test, train.num_classes, epochs=epochs,
                                   depth=depth, width=width, batch_size=batch_size, lr=lr, seed=seed)
    finally:
        torch.set_num_threads(threads)
    return out


def _train_one(rule: str, x_train: Any, y_train: Any, x_test: Any, y_test: Any, num_classes: int, *, epochs: int,
               depth: int, width: int, batch_size: int, lr: float, seed: int) -> TsneFeatures:
    import torch
    import torch.nn.functional as F

    from ..convert import convert
    from ..models import create_model

    torch.manual_seed(seed)
    model = create_model("mlp", num_classes, x_train.shape[1], x_train.shape[-1], depth=depth, width=width,
                         activation="tanh")
    model = convert(model, rule, seed=seed)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(x_train.shape[0], generator=order).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train[index]), y_train[index]).backward()
            optimizer.step()
    features = hidden_features(model, x_test)
    model.eval()
    with torch.no_grad():
        error = 100.0 * float((model(x_test).argmax(1) != y_test).double().mean())
    return TsneFeatures(features.numpy(), y_test.numpy(), error)


def tsne_figure(features: Mapping[str, TsneFeatures] | None = None, *, seed: int = 0, perplexity: float = 30.0,
                **train_options: Any) -> Any:
    """Scatter plots of a t-SNE embedding of hidden features, one panel per rule (nokland2016 Fig. 3).

    Args:
        features: ``{rule: TsneFeatures}``; None trains the nets with :func:`train_tsne_features`
            (``train_options`` are passed on, e.g. ``dataset="mnist"``).
        seed: seed of the t-SNE.
        perplexity: t-SNE perplexity (capped below the number of points).

    Returns:
        A matplotlib Figure.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    plt = pyplot()
    if features is None:
        features = train_tsne_features(seed=seed, **train_options)
    if not features:
        raise ValueError("tsne_figure needs features of at least one net")
    fig, axes = grid(plt, len(features), width=4.6, height=4.2)
    for ax, (rule, entry) in zip(axes, features.items()):
        n = entry.features.shape[0]
        tsne = TSNE(n_components=2, perplexity=min(perplexity, max(2.0, (n - 1) / 3)), init="pca",
                    random_state=seed)
        with threadpool_limits(1):  # a few thousand points take seconds on one thread; more threads only contend
            embedding = tsne.fit_transform(entry.features.astype(np.float32))
        classes = np.unique(entry.labels)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for i, label in enumerate(classes):
            mask = entry.labels == label
            ax.scatter(embedding[mask, 0], embedding[mask, 1], s=5, color=cmap(i % cmap.N), label=str(label))
        suffix = f" (test error {entry.test_error:.1f}%)" if math.isfinite(entry.test_error) else ""
        ax.set(title=f"{rule}{suffix}", xlabel="t-SNE 1 (no unit)", ylabel="t-SNE 2 (no unit)", xticks=[], yticks=[])
    axes[-1].legend(title="class", fontsize=7, markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("t-SNE of the last hidden layer (nokland2016 Fig. 3)")
    fig.tight_layout()
    return fig
