"""Probes that score frozen features: weighted kNN, logistic regression, and BatchNorm + linear.

Each probe takes (N, D) feature arrays and (N,) integer labels per split, as ``tasks/features.py``
writes them, and returns plain floats (``top1``, ``top5`` when there are more than five classes),
so a stage can put the result straight into its manifest and MLflow.

- ``knn_classify`` / ``knn_accuracy``: cosine-similarity kNN with exp(sim / T) weighted votes, the
  protocol of Wu et al. 2018 (InstDisc) as used by DINO.
- ``logistic_regression_probe``: L-BFGS logistic regression on standardised features with the
  regularisation picked on a validation split, the CLIP paper's linear probe.
- ``bn_linear_probe``: a parameter-free BatchNorm then a linear layer, trained by SGD, the MAE
  paper's linear probe (BN puts features of any scale on the footing one learning rate suits).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

log = logging.getLogger("patchflow.probes")

__all__ = [
    "DEFAULT_CS", "check_labels", "top_k_accuracy", "knn_class_scores", "knn_classify",
    "knn_accuracy", "logistic_regression_probe", "bn_linear_probe",
]

ArrayLike = np.ndarray | torch.Tensor

# Inverse regularisation strengths for the logistic probe: 8 log-spaced values over 1e-3 .. 1e2.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 2, 8))



def check_labels(labels: ArrayLike, split: str, min_classes: int = 2) -> None:
    """Fail early, naming the split, on labels a probe cannot learn or be scored on.

    Args:
        labels: (N,) integer class labels; the loader writes -1 for a sample without a class.
        split: the split's name ("train", "val", "test"), used in the message.
        min_classes: fewest distinct classes the split must hold; 2 for a split a probe is fit on
            (one class leaves nothing to separate), 1 for a split it is only scored on.

    Raises:
        ValueError: empty or non-integer labels, any negative (missing) label, or too few classes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"{split} split: expected a non-empty 1-D label array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{split} split: labels must be integers, got dtype {labels.dtype}")
    missing = int((labels < 0).sum())
    if missing:
        raise ValueError(
            f"{split} split: {missing} of {labels.size} samples have no label (negative, e.g. -1); "
            "probes need a class for every sample"
        )
    classes = np.unique(labels)
    if classes.size < min_classes:
        raise ValueError(
            f"{split} split: only {classes.size} class(es) {classes.tolist()} present, "
            f"need at least {min_classes} to fit or score a probe"
        )


def top_k_accuracy(scores: ArrayLike, labels: ArrayLike, k: int) -> float:
    """Fraction of rows whose true class is among the ``k`` highest scores.

    Args:
        scores: (N, C) class scores (logits, probabilities or votes); column c is class c.
        labels: (N,) true classes in [0, C).
        k: how many top classes count as a hit; k >= C makes every row a hit.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} are not (N, C) and (N,)")
    k = min(k, scores.shape[1])
    # argpartition finds the top k without sorting all C columns.
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (N, k)
    return float((top == labels[:, None]).any(axis=1).mean())


def _accuracies(scores: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    result = {"top1": top_k_accuracy(scores, labels, 1)}
    if np.asarray(scores).shape[1] > 5:  # top-5 of five or fewer classes is always 1.0
        result["top5"] = top_k_accuracy(scores, labels, 5)
    return result


def _num_classes(*label_arrays: ArrayLike) -> int:
    return int(max(np.asarray(labels).max() for labels in label_arrays)) + 1


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch, BLAS and OpenMP on one thread for the block, then restore the thread counts.

    The linear probes are thousands of tiny ops (a 256 x D batch); with more threads each op pays a
    barrier, and on a shared 2-core host a descheduled worker stalls every op (measured 10-40x
    slower than one thread). kNN is left alone: its big matmuls do gain from threads.
    """
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(torch_threads)


def _features(x: ArrayLike, device: str = "cpu") -> torch.Tensor:
    return torch.as_tensor(x if torch.is_tensor(x) else np.asarray(x), dtype=torch.float32, device=device)



@torch.no_grad()
def knn_class_scores(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    query_feats: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Per-class weighted votes of each query's k nearest training features (cosine similarity).

    Each neighbour votes for its class with weight exp(sim / T); a small T lets the nearest
    neighbours dominate, a large T approaches a plain majority vote.

    Args:
        train_feats: (M, D) reference features; train_labels: (M,) their classes.
        query_feats: (Q, D) features to classify.
        k: neighbours per query (clamped to M).
        temperature: T in the vote weights; must be > 0.
        num_classes: width of the score matrix; default max(train_labels) + 1.
        batch_size: queries per similarity matmul, bounding memory at batch_size x M floats.

    Returns:
        (Q, num_classes) float32 votes, each row scaled so its nearest neighbour weighs 1.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    check_labels(train_labels, "train", min_classes=1)
    train = F.normalize(_features(train_feats), dim=1)  # (M, D)
    queries = _features(query_feats)  # (Q, D)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)  # (M,)
    if train.shape[1] != queries.shape[1] or train.shape[0] != labels.shape[0]:
        raise ValueError(
            f"train {tuple(train.shape)}, labels {tuple(labels.shape)}, query {tuple(queries.shape)} do not match"
        )
    num_classes = num_classes or _num_classes(train_labels)
    if int(labels.max()) >= num_classes:
        raise ValueError(f"train labels reach {int(labels.max())} but num_classes is {num_classes}")
    k = min(k, train.shape[0])
    chunks = []
    for start in range(0, queries.shape[0], batch_size):
        query = F.normalize(queries[start : start + batch_size], dim=1)  # (B, D)
        top_sim, top_index = (query @ train.T).topk(k, dim=1)  # (B, k)
        # Shift by each row's best similarity before exp: same ranking, no overflow for tiny T.
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (B, k)
        votes = torch.zeros(query.shape[0], num_classes).scatter_add_(1, labels[top_index], weights)
        chunks.append(votes)  # (B, C)
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, num_classes), np.float32)


def knn_classify(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    query_feats: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Predicted class (Q,) int64 of each query: the argmax of ``knn_class_scores`` (same Args).

    Use ``knn_class_scores`` directly for top-5 or for the votes themselves.
    """
    scores = knn_class_scores(
        train_feats, train_labels, query_feats, k, temperature, num_classes, batch_size
    )
    return scores.argmax(axis=1).astype(np.int64)


def knn_accuracy(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    query_feats: ArrayLike,
    query_labels: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> dict[str, float]:
    """kNN top-1 (and top-5 when there are more than five classes) of labelled queries.

    Args:
        train_feats, train_labels, query_feats, k, temperature, batch_size: as ``knn_class_scores``.
        query_labels: (Q,) true classes of the queries.
    """
    check_labels(train_labels, "train")
    check_labels(query_labels, "query", min_classes=1)
    num_classes = _num_classes(train_labels, query_labels)
    scores = knn_class_scores(
        train_feats, train_labels, query_feats, k, temperature, num_classes, batch_size
    )
    return _accuracies(scores, query_labels)



def _check_splits(train_y: ArrayLike, val_y: ArrayLike, test_y: ArrayLike) -> int:
    check_labels(train_y, "train")
    check_labels(val_y, "val", min_classes=1)
    check_labels(test_y, "test", min_classes=1)
    return _num_classes(train_y, val_y, test_y)


def logistic_regression_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    val_x: ArrayLike,
    val_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    Cs: tuple[float, ...] = DEFAULT_CS,
    max_iter: int = 1000,
    seed: int = 0,
    refit_on_train_val: bool = False,
) -> dict[str, float]:
    """CLIP-style linear probe: L-BFGS logistic regression, C chosen on val, scored on test.

    Features are standardised with a scaler fit on train only (and applied unchanged to val and
    test). C is swept from strongest to weakest regularisation with warm starts, each fit on train
    and scored on val; ties go to the smaller C. By default the train-only fit that won the sweep
    is the final model (refit on train, in effect): val stays a pure model-selection split and the
    reported ``val_top1`` is that model's. ``refit_on_train_val=True`` refits from scratch on
    train + val with the best C (val's labels then shape the test model).

    Args:
        train_x, val_x, test_x: (N, D) features per split; train_y, val_y, test_y: (N,) classes.
        Cs: inverse L2 strengths to try (default 8 log-spaced values over 1e-3 .. 1e2).
        max_iter: L-BFGS iteration cap per fit.
        seed: ``random_state`` of the solver.
        refit_on_train_val: refit on train + val with the best C instead of keeping the train fit.

    Returns:
        ``{"top1", "top5" (more than five classes), "best_C", "val_top1"}`` with test accuracies.
    """
    if not Cs:
        raise ValueError("Cs is empty: give at least one regularisation strength")
    num_classes = _check_splits(train_y, val_y, test_y)
    scaler = StandardScaler().fit(np.asarray(train_x, dtype=np.float64))
    train_s, val_s, test_s = (
        scaler.transform(np.asarray(x, dtype=np.float64)) for x in (train_x, val_x, test_x)
    )
    train_y, val_y, test_y = (np.asarray(y) for y in (train_y, val_y, test_y))

    # Warm starts make the sweep cheap: each weaker-C optimum starts from the previous one.
    model = LogisticRegression(solver="lbfgs", max_iter=max_iter, random_state=seed, warm_start=True)
    best_C, best_val, best_model = Cs[0], -1.0, model
    unconverged: list[float] = []
    with _single_threaded(), warnings.catch_warnings(record=True) as caught:
        # One summary line instead of sklearn's multi-line warning per fit that hit max_iter.
        warnings.simplefilter("always", ConvergenceWarning)
        for C in sorted(Cs):
            seen = len(caught)
            model.set_params(C=C).fit(train_s, train_y)
            if any(issubclass(w.category, ConvergenceWarning) for w in caught[seen:]):
                unconverged.append(C)
            val_top1 = float(model.score(val_s, val_y))
            if val_top1 > best_val:
                best_C, best_val, best_model = C, val_top1, copy.deepcopy(model)
        if refit_on_train_val:
            best_model = LogisticRegression(solver="lbfgs", C=best_C, max_iter=max_iter, random_state=seed)
            best_model.fit(np.concatenate([train_s, val_s]), np.concatenate([train_y, val_y]))
    for other in (w for w in caught if not issubclass(w.category, ConvergenceWarning)):
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if unconverged:
        log.info("logistic regression: %d of %d fits stopped at max_iter=%d (C=%s); each warm-starts the next, "
                 "and C is chosen on val either way", len(unconverged), len(Cs), max_iter,
                 ", ".join(f"{c:g}" for c in unconverged))
    # Columns of predict_proba follow the classes seen in fitting; widen to all classes for top-k.
    scores = np.zeros((test_s.shape[0], num_classes))
    scores[:, best_model.classes_] = best_model.predict_proba(test_s)
    return {**_accuracies(scores, test_y), "best_C": float(best_C), "val_top1": best_val}


def _bn_linear_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01, generator=generator)  # MAE's linear-probe init
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head)


@torch.no_grad()
def _probe_scores(head: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    head.eval()
    chunks = [head(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]  # (B, C) each
    return torch.cat(chunks).cpu().numpy()


def _train_epoch(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    head.train()
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    for step in range(max(x.shape[0] // batch_size, 1)):
        index = order[step * batch_size : (step + 1) * batch_size]  # (B,)
        loss = F.cross_entropy(head(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()  # per step, so the cosine is smooth even over few epochs


def bn_linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    val_x: ArrayLike,
    val_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """MAE-style linear probe: BatchNorm1d(affine=False) then Linear, trained on frozen features.

    SGD with momentum 0.9 and a per-step cosine schedule from ``lr`` to 0 over ``epochs``. Val
    top-1 is measured after every epoch; the weights (and BN statistics) of the best epoch are kept
    and scored on test, so the epoch count is chosen on val, never on test.

    Args:
        train_x, val_x, test_x: (N, D) features per split; train_y, val_y, test_y: (N,) classes.
        epochs: passes over train; batch_size: samples per step (a last partial batch is dropped,
            since a BN batch of one has no statistics).
        lr: peak learning rate; weight_decay: L2 on the linear weights.
        seed: seeds the head's init and the shuffling (the global RNG is untouched).
        device: where features and head live during training.

    Returns:
        ``{"top1", "top5" (more than five classes), "val_top1", "best_epoch"}``, test accuracies.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
    num_classes = _check_splits(train_y, val_y, test_y)
    generator = torch.Generator().manual_seed(seed)
    x, val, test = (_features(a, device) for a in (train_x, val_x, test_x))
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long, device=device)
    head = _bn_linear_head(x.shape[1], num_classes, generator).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(x.shape[0] // batch_size, 1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)

    best_val, best_epoch, best_state = -1.0, 0, {}
    threads = _single_threaded() if torch.device(device).type == "cpu" else contextlib.nullcontext()
    with threads:
        for epoch in range(1, epochs + 1):
            _train_epoch(head, optimizer, schedule, x, y, batch_size, generator)
            val_top1 = top_k_accuracy(_probe_scores(head, val, batch_size), np.asarray(val_y), 1)
            if val_top1 > best_val:
                best_val, best_epoch, best_state = val_top1, epoch, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    test_scores = _probe_scores(head, test, batch_size)
    accuracies = _accuracies(test_scores, np.asarray(test_y))
    return {**accuracies, "val_top1": best_val, "best_epoch": best_epoch}
