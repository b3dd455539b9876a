"""Float64 references for the K-FAC family, from the papers' definitions, one sample at a time.

Deliberately naive and independent of ``adacov.optim.kronecker``: convolution patches are cut out by
explicit loops, per-sample gradients come from one autograd call per sample's own loss, Kronecker
products are formed explicitly and solved with NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class SingleLayerBatch:
    """One layer's batch: ``a`` ``[N, T, i]`` (inputs with a bias column), ``delta`` ``[N, T, o]`` (each sample's
    own loss gradient with respect to the layer's outputs), per-sample gradient matrices ``dW`` ``[N, o, i]``
    and the batch-mean gradient ``grad`` ``[o, i]``."""

    a: np.ndarray
    delta: np.ndarray
    dW: np.ndarray
    grad: np.ndarray


def conv_patches(x: np.ndarray, conv: nn.Conv2d) -> np.ndarray:
    """``[N, T, C kh kw]``: each output position's input window, channel-major, by explicit loops."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    patches = np.zeros((n, out_h * out_w, c * kh * kw))
    for s in range(n):
        for oy in range(out_h):
            for ox in range(out_w):
                window = [padded[s, ch, oy * sh + ky * dh, ox * sw + kx * dw] for ch in range(c) for ky in range(kh) for kx in range(kw)]
                patches[s, oy * out_w + ox] = window
    return patches


def single_layer_batch(layer: nn.Module, head, x: torch.Tensor, y: torch.Tensor) -> SingleLayerBatch:
    """Per-sample quantities of ``loss_n = cross_entropy(head(layer(x_n)), y_n)`` for a Linear or Conv2d ``layer``."""
    deltas, grads = [], []
    for s in range(x.shape[0]):
        layer.zero_grad()
        out = layer(x[s : s + 1])
        out.retain_grad()
        nn.functional.cross_entropy(head(out), y[s : s + 1]).backward()
        o = out.shape[1]
        deltas.append(out.grad.reshape(o, -1).T.numpy().copy())  # [T, o]
        grads.append(np.concatenate([layer.weight.grad.reshape(o, -1).numpy(), layer.bias.grad.numpy()[:, None]], 1))
    xn = x.numpy()
    a = conv_patches(xn, layer) if isinstance(layer, nn.Conv2d) else xn.reshape(xn.shape[0], 1, -1)
    a = np.concatenate([a, np.ones(a.shape[:2] + (1,))], -1)
    dW = np.stack(grads)
    return SingleLayerBatch(a=a, delta=np.stack(deltas), dW=dW, grad=dW.mean(0))


def kfac_factors(batch: SingleLayerBatch) -> tuple[np.ndarray, np.ndarray]:
    """``A = (1/(N T)) sum a a^T``, ``G = (1/N) sum_{n,t} delta delta^T`` (KFC: Grosse & Martens 2016)."""
    n, t = batch.a.shape[:2]
    A = sum(np.outer(v, v) for v in batch.a.reshape(n * t, -1)) / (n * t)
    G = sum(np.outer(v, v) for v in batch.delta.reshape(n * t, -1)) / n
    return A, G


def tkfac_terms(batch: SingleLayerBatch) -> tuple[np.ndarray, np.ndarray, float]:
    """``Phi = E[tr(Gamma_n) Lambda_n]``, ``Psi = E[tr(Lambda_n) Gamma_n]``, ``tr F = E ||dW_n||^2``."""
    n, t = batch.a.shape[:2]
    lambdas = [sum(np.outer(v, v) for v in batch.a[s]) / t for s in range(n)]
    gammas = [sum(np.outer(v, v) for v in batch.delta[s]) for s in range(n)]
    phi = sum(np.trace(g) * l for l, g in zip(lambdas, gammas)) / n
    psi = sum(np.trace(l) * g for l, g in zip(lambdas, gammas)) / n
    return phi, psi, float(np.mean([np.sum(d**2) for d in batch.dW]))


def factored_damping(A: np.ndarray, G: np.ndarray, damping: float) -> tuple[float, float]:
    """Martens & Grosse 2015, sec. 6.3: ``pi = sqrt((tr A / dim A) / (tr G / dim G))``."""
    pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
    return pi * np.sqrt(damping), np.sqrt(damping) / pi


def kronecker_solve(A: np.ndarray, G: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """``D`` with ``(A kron G) vec(D) = vec(grad)``, ``vec`` stacking columns of the ``[o, i]`` matrices."""
    vec = grad.reshape(-1, order="F")
    return np.linalg.solve(np.kron(A, G), vec).reshape(grad.shape, order="F")


def eigenbasis_direction(A: np.ndarray, G: np.ndarray, dW: np.ndarray, grad: np.ndarray, damping: float) -> np.ndarray:
    """EKFAC with exact moments: ``Q_G [(Q_G^T grad Q_A) / (S + damping)] Q_A^T``, ``S = E_n (Q_G^T dW_n Q_A)^2``."""
    QA, QG = np.linalg.eigh(A)[1], np.linalg.eigh(G)[1]
    S = np.mean([(QG.T @ d @ QA) ** 2 for d in dW], axis=0)
    return QG @ ((QG.T @ grad @ QA) / (S + damping)) @ QA.T


def truncated_damping(A: np.ndarray, G: np.ndarray, damping: float, min_damping: float) -> tuple[float, float]:
    """The low-rank K-FACs' rule at full rank: ``lambda_X = max(damping max eig(X), floor_X)``, the floors K-FAC's
    factored damping of ``min_damping`` (none when it is 0)."""
    relative = damping * np.linalg.eigvalsh(A).max(), damping * np.linalg.eigvalsh(G).max()
    if min_damping == 0:
        return relative
    floor_a, floor_g = factored_damping(A, G, min_damping)
    return max(relative[0], floor_a), max(relative[1], floor_g)


def explicit_average(batches: list[np.ndarray], decay: float) -> np.ndarray:
    """``X_k = decay X_{k-1} + C_k C_k^T`` from ``X_0 = 0``, each ``C_k C_k^T`` formed explicitly."""
    total = np.zeros((batches[0].shape[0],) * 2)
    for columns in batches:
        total = decay * total + sum(np.outer(c, c) for c in columns.T)
    return total


def seng_direction(batch: SingleLayerBatch, damping: float) -> np.ndarray:
    """``(U^T U + lambda I)^-1 g`` with ``U`` ``[N, o i]`` holding ``vec(dW_n) / sqrt(N)``, solved as a dense system."""
    n = batch.dW.shape[0]
    U = np.stack([d.reshape(-1) for d in batch.dW]) / np.sqrt(n)
    F = U.T @ U + damping * np.eye(U.shape[1])
    return np.linalg.solve(F, batch.grad.reshape(-1)).reshape(batch.grad.shape)


def whitened_sgd(weights: np.ndarray, inputs: np.ndarray, targets: np.ndarray, whitening: np.ndarray, lr: float, steps: int) -> np.ndarray:
    """SGD on a linear layer fed explicitly whitened inputs ``x_hat = P [x; 1]``: weights ``V = W P^-1`` ``[o, i + 1]``,
    the loss ``cross_entropy(V x_hat, y)`` (mean over the batch), ``V <- V - lr grad_V``; returns ``V P``."""
    x_hat = torch.from_numpy(np.concatenate([inputs, np.ones((len(inputs), 1))], 1) @ whitening.T)
    V = torch.from_numpy(weights @ np.linalg.inv(whitening)).requires_grad_()
    for _ in range(steps):
        V.grad = None
        nn.functional.cross_entropy(x_hat @ V.T, torch.from_numpy(targets)).backward()
        with torch.no_grad():
            V -= lr * V.grad
    return V.detach().numpy() @ whitening
