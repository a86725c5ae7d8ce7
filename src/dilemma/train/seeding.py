"""Seeds and RNG state: what makes a resumed run continue exactly as an uninterrupted one."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(token_generator: torch.Generator) -> dict:
    """Python, numpy, torch, this process's CUDA and the token sampler's states, as checkpoint values."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's uint32 keys as int64: torch.save handles uint32 tensors only from torch 2.6 on
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],  # this process's GPU
        "tokens": token_generator.get_state(),
    }


def set_rng_state(state: dict, token_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    token_generator.set_state(state["tokens"])
