"""Independent float64 references written from the papers' equations, one block at a time.

Deliberately naive: NumPy/SciPy, explicit loops over kernels, explicit matrices, ``inv(sqrtm(.))``
instead of an eigendecomposition, so that they share no code path with the optimizers under test.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import inv, sqrtm


class ReferenceAdaCov:
    """AdaCov, paper eq. 2-3 and section 3.2, for a list of float64 arrays."""

    def __init__(self, shapes, lr, betas=(0.9, 0.999), eps=1e-8, cov_eps=1e-5, offdiag_warmup=390.0, weight_decay=0.0):
        self.lr, (self.b1, self.b2), self.eps, self.cov_eps = lr, betas, eps, cov_eps
        self.offdiag_warmup = offdiag_warmup
        self.wd, self.t = weight_decay, 0
        self.m = [np.zeros(s) for s in shapes]
        self.second = []
        for s in shapes:
            d = int(np.prod(s[2:])) if len(s) >= 3 else 1
            self.second.append(np.zeros((s[0], s[1], d, d)) if d > 1 else np.zeros(s))

    def step(self, params, grads):
        """Return the updated parameters (new arrays)."""
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        s = 1.0 - 10.0 ** (-t / self.offdiag_warmup)
        out = []
        for i, (theta, g) in enumerate(zip(params, grads)):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            m_hat = self.m[i] / (1 - b1**t)
            if self.second[i].ndim == 4 and theta.ndim >= 3:
                update = np.zeros_like(theta)
                C = self.second[i]
                for o in range(theta.shape[0]):
                    for j in range(theta.shape[1]):
                        gv = g[o, j].reshape(-1)
                        C[o, j] = b2 * C[o, j] + (1 - b2) * np.outer(gv, gv)
                        C_hat = C[o, j] / (1 - b2**t)
                        C_s = s * C_hat + (1 - s) * np.diag(np.diag(C_hat))
                        P = inv(sqrtm(C_s + self.cov_eps**2 * np.eye(len(gv))).real)
                        update[o, j] = (P @ m_hat[o, j].reshape(-1)).reshape(theta.shape[2:])
            else:
                eps = self.cov_eps if theta.ndim >= 3 else self.eps
                self.second[i] = b2 * self.second[i] + (1 - b2) * g * g
                update = m_hat / np.sqrt(self.second[i] / (1 - b2**t) + eps**2)
            out.append(theta * (1 - self.lr * self.wd) - self.lr * update)
        return out


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


class ReferenceMBF:
    """MBF's rule (issue 4, item 2) block by block, with ``np.linalg.solve`` on explicit matrices.

    ``spec`` lists ``(kind, indices)`` over the parameter list: ``("conv", [w])``, ``("rows", [w, b])``,
    ``("shared_rows", [w, b])`` or ``("adam", [p])``.
    """

    def __init__(self, params, spec, lr, betas=(0.9, 0.999), damping=3e-3, eps=1e-8, weight_decay=0.0,
                 curvature_every=1, inverse_every=1):
        self.spec, self.lr, (self.b1, self.b2) = spec, lr, betas
        self.damping, self.eps, self.wd = damping, eps, weight_decay
        self.T1, self.T2, self.t, self.k = curvature_every, inverse_every, 0, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.F, self.A = {}, {}

    def _vectors(self, kind, idx, arrays):
        """The blocks' sub-vectors: rows of a [blocks, size] matrix."""
        if kind == "conv":
            w = arrays[idx[0]]
            return w.reshape(w.shape[0] * w.shape[1], -1)
        w = arrays[idx[0]]
        return np.concatenate([w, arrays[idx[1]][:, None]], 1) if len(idx) > 1 else w

    def step(self, params, grads):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        curvature_due = (t - 1) % self.T1 == 0
        factor_due = (t - 1) % self.T2 == 0
        if curvature_due:
            self.k += 1
        out = [p * (1 - self.lr * self.wd) for p in params]
        for i, g in enumerate(grads):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
        for n, (kind, idx) in enumerate(self.spec):
            if kind == "adam":
                i = idx[0]
                self.v[i] = b2 * self.v[i] + (1 - b2) * grads[i] ** 2
                m_hat, v_hat = self.m[i] / (1 - b1**t), self.v[i] / (1 - b2**t)
                out[i] = out[i] - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
                continue
            G = self._vectors(kind, idx, grads)
            M_hat = self._vectors(kind, idx, self.m) / (1 - b1**t)
            size = G.shape[1]
            if kind == "shared_rows":
                if curvature_due:
                    mean_outer = sum(np.outer(row, row) for row in G) / G.shape[0]
                    self.F[n] = b2 * self.F.get(n, np.zeros((size, size))) + (1 - b2) * mean_outer
                if factor_due:
                    self.A[n] = self.F[n] / (1 - b2**self.k) + self.damping * np.eye(size)
                D = np.stack([np.linalg.solve(self.A[n], row) for row in M_hat])
            else:
                if curvature_due:
                    F = self.F.get(n, np.zeros((G.shape[0], size, size)))
                    self.F[n] = np.stack([b2 * F[j] + (1 - b2) * np.outer(G[j], G[j]) for j in range(G.shape[0])])
                if factor_due:
                    self.A[n] = np.stack([f / (1 - b2**self.k) + self.damping * np.eye(size) for f in self.F[n]])
                D = np.stack([np.linalg.solve(self.A[n][j], M_hat[j]) for j in range(G.shape[0])])
            w = idx[0]
            if kind == "conv":
                out[w] = out[w] - self.lr * D.reshape(params[w].shape)
            else:
                out[w] = out[w] - self.lr * D[:, : params[w].shape[1]]
                if len(idx) > 1:
                    out[idx[1]] = out[idx[1]] - self.lr * D[:, -1]
        return out


class ReferenceFastAdaCov(ReferenceAdaCov):
    """AdaCov's fast mode (issue 23), kernel by kernel with explicit matrices.

    Each kernel keeps ``Q`` from ``eigh(C_s)`` of its last decomposition and ``lambda_D = diag(Q^T diag(C) Q) /
    (1 - b2^t)`` as it was then. Every kernel is decomposed at its first step and through the first ``warmup`` steps; after that, step
    ``t`` checks the kernels ``c B // every <= b < (c + 1) B // every`` of each tensor of ``B`` kernels,
    ``c = (t - warmup - 1) mod every``, and decomposes those whose basis has drifted: the off-diagonal
    Frobenius norm of ``A_ij / sqrt(A_ii A_jj)``, ``A = Q^T C_s Q / (1 - b2^t) + cov_eps^2 I``, above
    ``threshold`` (0: all of them). The step is ``Q (Q^T m_hat) / sqrt(lambda + cov_eps^2)`` with ``lambda = s
    diag(Q^T C Q) / (1 - b2^t) + (1 - s) lambda_D``, ``diag(Q^T C Q)`` computed here from the full matrices.
    ``self.decomposed`` counts the kernels decomposed at each step.
    """

    def __init__(self, shapes, every, warmup, threshold=0.0, **kw):
        super().__init__(shapes, **kw)
        self.every, self.refresh_warmup, self.threshold = every, warmup, threshold
        self.Q, self.lam_D, self.decomposed = {}, {}, []

    def _drift(self, Q, C_s, bc):
        A = Q.T @ C_s @ Q * bc + self.cov_eps**2 * np.eye(len(Q))
        normalized = A / np.sqrt(np.outer(np.diag(A), np.diag(A)))
        return np.sqrt(np.sum(normalized**2) - np.sum(np.diag(normalized) ** 2))

    def step(self, params, grads):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        s, bc = 1.0 - 10.0 ** (-t / self.offdiag_warmup), 1.0 / (1 - b2**t)
        decomposed = 0
        out = []
        for i, (theta, g) in enumerate(zip(params, grads)):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            m_hat = self.m[i] / (1 - b1**t)
            if theta.ndim < 3 or np.prod(theta.shape[2:]) == 1:
                eps = self.cov_eps if theta.ndim >= 3 else self.eps
                self.second[i] = b2 * self.second[i] + (1 - b2) * g * g
                update = m_hat / np.sqrt(self.second[i] / (1 - b2**t) + eps**2)
                out.append(theta * (1 - self.lr * self.wd) - self.lr * update)
                continue
            update = np.zeros_like(theta)
            blocks = theta.shape[0] * theta.shape[1]
            c = (t - self.refresh_warmup - 1) % self.every
            checked = range(c * blocks // self.every, (c + 1) * blocks // self.every)
            for o in range(theta.shape[0]):
                for j in range(theta.shape[1]):
                    b = o * theta.shape[1] + j
                    gv = g[o, j].reshape(-1)
                    C = self.second[i][o, j] = b2 * self.second[i][o, j] + (1 - b2) * np.outer(gv, gv)
                    C_s = s * C + (1 - s) * np.diag(np.diag(C))
                    key = (i, o, j)
                    if key not in self.Q or t <= self.refresh_warmup or (b in checked and self._drift(self.Q[key], C_s, bc) > self.threshold):
                        self.Q[key] = np.linalg.eigh(C_s)[1]
                        self.lam_D[key] = np.einsum("ki,k,ki->i", self.Q[key], np.diag(C), self.Q[key]) * bc
                        decomposed += 1
                    Q = self.Q[key]
                    lam = s * np.einsum("ki,kl,li->i", Q, C, Q) * bc + (1 - s) * self.lam_D[key]
                    y = (Q.T @ m_hat[o, j].reshape(-1)) / np.sqrt(np.maximum(lam, 0) + self.cov_eps**2)
                    update[o, j] = (Q @ y).reshape(theta.shape[2:])
            out.append(theta * (1 - self.lr * self.wd) - self.lr * update)
        self.decomposed.append(decomposed)
        return out


class ReferenceEAdam:
    """EAdam (Yuan & Gao 2020, Algorithm 1): Adam with ``eps`` added to ``v`` inside the average."""

    def __init__(self, shapes, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.t = lr, betas, eps, weight_decay, 0
        self.m = [np.zeros(s) for s in shapes]
        self.v = [np.zeros(s) for s in shapes]

    def step(self, params, grads):
        self.t += 1
        out = []
        for i, (theta, g) in enumerate(zip(params, grads)):
            g = g + self.wd * theta
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g**2 + self.eps
            m_hat, v_hat = self.m[i] / (1 - self.b1**self.t), self.v[i] / (1 - self.b2**self.t)
            out.append(theta - self.lr * m_hat / np.sqrt(v_hat))
        return out
