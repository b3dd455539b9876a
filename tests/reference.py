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
        self.warmup, self.wd, self.t = offdiag_warmup, weight_decay, 0
        self.m = [np.zeros(s) for s in shapes]
        self.second = []
        for s in shapes:
            d = int(np.prod(s[2:])) if len(s) >= 3 else 1
            self.second.append(np.zeros((s[0], s[1], d, d)) if d > 1 else np.zeros(s))

    def step(self, params, grads):
        """Return the updated parameters (new arrays)."""
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        s = 1.0 - 10.0 ** (-t / self.warmup)
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
