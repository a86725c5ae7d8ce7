"""Online linear probe: a linear classifier trained during pretraining on detached features.

It reads the class embedding of the student's first view exactly as the step computed it (sparse
and corrupted when DILEMMA is on), so it costs no extra forward and never touches the backbone's
gradients; its running accuracy on the training batches is a cheap progress signal, not a
substitute for ``dilemma eval linear`` (frozen, dense, held-out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OnlineProbe(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, lr: float = 1e-3):
        super().__init__()
        self.norm = nn.BatchNorm1d(embed_dim, affine=False)
        self.linear = nn.Linear(embed_dim, num_classes)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)
        self.correct, self.seen = 0, 0

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One update on detached ``features``; accuracy is counted before the update."""
        logits = self.linear(self.norm(features.detach().float()))
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.correct = self.correct + (logits.argmax(1) == labels).sum()  # a tensor: no device sync per step
        self.seen += labels.numel()

    def window_accuracy(self) -> float | None:
        """Percent correct since the last call (None if nothing was seen)."""
        accuracy = 100.0 * float(self.correct) / self.seen if self.seen else None
        self.correct, self.seen = 0, 0
        return accuracy

    def full_state(self) -> dict:
        return {"model": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_full_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
