"""Pure-torch stand-in for the CPU build of ``sgl_kernel`` (CPU serving only).

SGLang's CPU engine imports ``sgl_kernel``, whose CPU build is not published on PyPI. The CPU
path only ever calls ``assign_req_to_token_pool_cpu``; it is implemented here in plain torch.
Any other name raises NotImplementedError when called, so a new code path fails loudly instead
of computing garbage. GPU images use the official SGLang image and never see this module.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__version__ = "0.0.0+ets-cpu-shim"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's newly allocated KV slots into its row of the token pool."""
    offset = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist(), strict=True):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def __getattr__(name: str) -> Callable[..., Any]:
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError(f"sgl_kernel CPU shim: {name} is not implemented")

    _missing.__name__ = name
    return _missing
