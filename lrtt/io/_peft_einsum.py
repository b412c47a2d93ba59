"""PEFT LoRA files of google-tunix NNX trees (Llama 3, Qwen 2/3, Gemma, Gemma 3) and the gemma
package's params: their einsum kernels under the Hugging Face module names of the checkpoint
:func:`lrtt.models.save_tunix` / :func:`lrtt.models.save_gemma` write, a fused kernel as one
LoRA per module (save only: :func:`lrtt.load_peft` refuses these trees)."""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np

from lrtt import _families
from lrtt._targets import Target
from lrtt.io import _hf_names as names
from lrtt.io._peft_format import _SAVER, KEY_PREFIX, _alpha


def _einsum_tensors(method: Any, low_rank: dict[str, Any], trained: dict[str, Any], family: str,
                    targets: dict[str, Target], leaves: dict[str, Any]):
    """``(tensors, {module: rank}, {module: lora_alpha}, candidate modules)`` of an adapter on a
    google-tunix NNX tree or gemma-package params, under the Hugging Face names
    :func:`lrtt.models.save_tunix` / :func:`lrtt.models.save_gemma` write.

    Each kernel is read as the ``(in, out)`` matrix of its family layout (``q_proj/w (D, N, H)``
    ``'in out out'``: in = D, out = N·H in row-major order, the rows of PyTorch's ``q_proj.weight
    (N·H, D)``; ``o_proj/w (N, H, D)`` ``'in in out'``: in = N·H), so ``lora_A = Aᵀ: (r, in)``,
    ``lora_B = Bᵀ: (out, r)``. A fused kernel (Gemma's ``kv_einsum (2, K, D, H)``: out = (2, K, H))
    is one LoRA per part: the shared ``A``, and ``B``'s column block of that part (the gemma
    package's ``gating_einsum (2, F, D)``: out = (2, F), gate then up).
    """
    found = _families.by_name(family)
    saver = f"lrtt.models.{_SAVER[family]}"
    if trained:
        raise ValueError(
            f"cannot write trainable leaves {sorted(trained)[:3]} of {found.stack} as PEFT modules_to_save "
            "(lrtt maps only their linear kernels to PyTorch modules). Save the LoRA factors alone (method "
            f"without `trainable`), or export the merged model with {saver}.")
    shapes = {p: tuple(v.shape) for p, v in leaves.items()}
    candidates = {m for p in leaves for m in (names.einsum_modules(p) or ())}
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, Any] = {}
    all_zero = True
    for path in sorted(low_rank):
        entry, target = low_rank[path], targets[path]
        modules = names.einsum_modules(path)
        if modules is None:
            if re.search(r"(^|/)mlp/(gate|up|down)_proj$", path):
                why = ("it is a tunix Qwen 3 mixture-of-experts kernel (E, in, out): lrtt writes no per-expert PEFT "
                       "modules. Target the attention projections (targets='attention')")
            else:
                why = ("only the attention projections, the MLP kernels and lm_head have PyTorch Linear modules "
                       "(PEFT adapts those). Target those (targets='qv', 'attention' or 'all-linear')")
            raise ValueError(f"cannot write the LoRA entry at {path!r} in PEFT's format: {why}, or export the "
                             f"merged model with {saver}.")
        expected = found.layout_of(path, shapes[path], shapes) or ("in out" if len(shapes[path]) == 2 else None)
        if expected is None and re.search(r"(^|/)mlp/gating_einsum$", path):
            # (2, F, D) or (2, D, F), not decidable from the shapes (F == D): either reading puts gate, up first
            expected = str(target.layout) if str(target.layout) in ("out out in", "out in out") else "out out in"
        if str(target.layout) != expected:
            raise ValueError(
                f"cannot write the LoRA entry at {path!r} in PEFT's format: the adapter reads the kernel "
                f"{shapes[path]} as layout {str(target.layout)!r}, but the PyTorch weight of "
                f"{list(modules)} is its (in, out) matrix under {expected!r}"
                + (" (a 'layer' axis makes one adapter per head or per slice, not one per module)" if target.stack
                   else "")
                + f". Train with the family's layout (drop `layouts` for {path!r}), or export the merged model "
                f"with {saver}.")
        a, b = (np.asarray(m, np.float32) for m in entry.factor_matrices())
        rank = a.shape[-1]
        if a.shape != (target.n_in, rank) or b.shape != (rank, target.n_out) or target.n_out % len(modules):
            raise ValueError(
                f"the factors at {path!r} have shapes A {a.shape}, B {b.shape} but the kernel is a "
                f"({target.n_in}, {target.n_out}) matrix: the adapter was made for another model.")
        width = target.n_out // len(modules)
        for j, module in enumerate(modules):
            tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[:, j * width:(j + 1) * width].T)
            ranks[module] = rank
            alphas[module] = _alpha(method, path, rank, entry.scale)
        all_zero = all_zero and not (np.any(a) and np.any(b))
    if all_zero:
        warnings.warn("every LoRA update of the adapter is zero (B = 0): was it trained?", stacklevel=3)
    return tensors, ranks, alphas, candidates
