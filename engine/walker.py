"""The one block walker: calibration activations through a model, one decoder block at a time.

Every step that needs a model's activations (importance statistics, calibrated GGUF blocks, pruning scores,
depth ranking) walks them with ``BlockWalk``. The model is either loaded (a transformers model) or the
untouched source read lazily (``engine.lazy.LazyModel``): then only an empty skeleton exists (parameters on
the meta device), each block's weights are read from the files when its turn comes, used and released, and
the memory of the walk is one block plus the calibration hidden states, whatever the model's size::

    walk = BlockWalk(ctx.weights(), sequences, cancelled=ctx.cancel.is_set)
    for block in walk:                              # block i's weights materialised (lazy) or as loaded
        with recording_channel_stats(block.linears()) as stats:
            block.forward()                         # every batch through the block; its outputs feed block i+1
        ...                                         # use the statistics and block.module's weights
    for h in walk.final_hidden():                   # the final norm's output per batch (the head's input)
        ...

A transform streams the same way (``ctx.transform_walk``): it changes ``block.module``'s weights, ``block.keep``
writes the changed ones to a scratch file, and the model the next steps see is the source with those files in
place of its blocks (``LazyModel.with_tensors``): nothing but one block is ever held.

A walk sees exactly the activations a full forward sees: block i gets the keyword arguments (mask, rotary
embeddings) the model itself passes to block i, captured in one pass in which every block is a pass-through.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .calibration import block_input, block_output, decoder_layers
from .errors import EdgeTailorError, RunCancelled
from .memory import trim_heap


class _StopForward(Exception):
    pass


class FusedNamesError(EdgeTailorError):
    """The files name a family's weights differently from its modules (fused experts): no lazy walk."""


def skeleton(config, trust_remote_code: bool = False):
    """The model's modules with every parameter on the meta device (no memory) and its buffers real (rotary
    frequencies, embedding scales are computed at construction)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model.eval()


def set_parameter(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    setattr(target, leaf, torch.nn.Parameter(value, requires_grad=False))


def is_experts(module: torch.nn.Module) -> bool:
    """transformers' stacked experts: ``gate_up_proj`` [experts, 2 x width, hidden] and ``down_proj``."""
    up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.ndim == down.ndim == 3


@dataclass
class Block:
    """Decoder block ``index`` of a walk, its weights in memory while the walk is on it."""

    index: int
    prefix: str                     # its parameters' names start with this: "model.layers.3."
    module: torch.nn.Module
    walk: "BlockWalk"

    def linears(self) -> dict[str, torch.nn.Linear]:
        """The block's linear layers by their qualified name in the model."""
        return {self.prefix + n: m for n, m in self.module.named_modules() if isinstance(m, torch.nn.Linear)}

    def experts(self) -> dict[str, torch.nn.Module]:
        """The block's stacked experts (a mixture of experts: ``gate_up_proj`` and ``down_proj``, one matrix per
        expert) by qualified name; none in a dense block."""
        return {self.prefix + n: m for n, m in self.module.named_modules() if is_experts(m)}

    def keep(self, modules: dict[str, torch.nn.Module]) -> None:
        """The transform changed ``modules`` (qualified names, as ``linears()`` gives them): a lazy walk writes
        their weights to its store before the block is released (a loaded model was changed in place)."""
        store = self.walk.store
        if store is None:
            if self.walk.lazy:
                raise EdgeTailorError("A lazy walk was asked to keep a change but has no store to write it to.",
                                      "This is a bug in the step; please report it.")
            return
        store.write(f"block-{self.index:05d}", {f"{name}.{p}": t for name, m in modules.items()
                                                for p, t in m.named_parameters(recurse=False)})

    def forward(self, advance: bool = True) -> None:
        """Every batch through the block (hooks on its modules see them); the outputs become the next block's
        inputs (``advance=False``: only the hooks see the run, e.g. before the block is changed). Checks for
        cancel between batches."""
        walk = self.walk
        with torch.inference_mode():
            for b, h in enumerate(walk.hidden):
                walk.check_cancelled()
                out = block_output(self.module(h, **walk.kwargs[self.index][b])).detach()
                if advance:
                    walk.hidden[b] = out
                del h, out


class BlockWalk:
    """The calibration sequences walked through ``model`` (loaded, or a ``LazyModel``) block by block."""

    def __init__(self, model, sequences: torch.Tensor | None, batch_size: int = 4,
                 dtype: torch.dtype = torch.float32, cancelled: Callable[[], bool] | None = None,
                 progress: Callable[[float, str], None] | None = None, store=None):
        """``sequences`` None: the blocks' weights only (no activations). ``store``: an ``engine.lazy.TensorStore``
        that ``Block.keep`` writes changed weights to (a transform streamed over a lazy model)."""
        self.source = model
        self.store = store
        self.lazy = bool(getattr(model, "is_lazy", False))
        self.dtype = dtype
        self.cancelled = cancelled
        self.progress = progress
        self.model = skeleton(model.config) if self.lazy else model
        self.layers = decoder_layers(self.model)
        self._names = {id(m): name + "." for name, m in self.model.named_modules()}
        self.materialised_bytes = 0        # weights held now (lazy walks)
        self.peak_materialised_bytes = 0   # the most held at once
        if self.lazy:
            self._check_names()
        self.model.eval()
        self.hidden, self.kwargs = self._capture(sequences, batch_size) if sequences is not None else ([], [])

    def __len__(self) -> int:
        return len(self.layers)

    def result(self):
        """The model as a transform walk left it: the lazy model with the kept blocks in place, or None when a
        loaded model was changed in place."""
        return self.store.model() if self.store is not None else None

    def check_cancelled(self) -> None:
        if self.cancelled and self.cancelled():
            raise RunCancelled()

    def _check_names(self) -> None:
        state, prefix = self.source.state_dict(), self._name(self.layers[0], "model.layers.0.")
        missing = [prefix + n for n, _ in self.layers[0].named_parameters() if prefix + n not in state]
        if missing:
            raise FusedNamesError(f"The model's files name its weights differently from its modules ({missing[0]}).",
                                  "Load the model whole for this step (its family stores fused tensors).")

    def _name(self, module: torch.nn.Module, fallback: str) -> str:
        """The module's qualified name in the model, with a trailing dot (the prefix of its parameters)."""
        return self._names.get(id(module), fallback)

    # --- weights --------------------------------------------------------------------------------
    def _materialise(self, module: torch.nn.Module, prefix: str) -> None:
        if not self.lazy:
            return
        state = self.source.state_dict()
        for name, _ in list(module.named_parameters()):
            value = state[prefix + name].load().to(self.dtype)
            set_parameter(module, name, value)
            self.materialised_bytes += value.numel() * value.element_size()
        self.peak_materialised_bytes = max(self.peak_materialised_bytes, self.materialised_bytes)

    def _release(self, module: torch.nn.Module) -> None:
        if not self.lazy:
            return
        for name, p in list(module.named_parameters()):
            set_parameter(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        self.materialised_bytes = 0
        trim_heap()

    def _embedding_rows(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the embedding rows of the tokens the sequences use, the sequences as indices into those rows): the
        skeleton's embedding holds only those rows, read a slice of the table at a time."""
        embed = self.model.get_input_embeddings()
        name = self._name(embed, "model.embed_tokens.") + "weight"
        table = self.source.state_dict()[name]
        used, index = torch.unique(sequences, return_inverse=True)
        rows = torch.empty(len(used), table.shape[1], dtype=self.dtype)
        step = max(1, (1 << 22) // table.shape[1])
        for a in range(0, table.shape[0], step):
            sel = (used >= a) & (used < a + step)
            if sel.any():
                rows[sel] = table.rows(a, min(a + step, table.shape[0]))[used[sel] - a].to(self.dtype)
        return rows, index

    # --- the walk -------------------------------------------------------------------------------
    def _capture(self, sequences: torch.Tensor, batch_size: int):
        """Block 0's input per batch, and the keyword arguments the model gives each block per batch."""
        base = getattr(self.model, "model", self.model)
        kwargs: list[list[dict]] = [[] for _ in self.layers]
        hidden: list[torch.Tensor] = []
        last = len(self.layers) - 1
        embed, held = self.model.get_input_embeddings(), None
        if self.lazy:
            rows, sequences = self._embedding_rows(sequences)
            held = embed.weight
            embed.weight = torch.nn.Parameter(rows, requires_grad=False)

        def passthrough(i):
            def fn(*args, **kw):
                h = block_input(args, kw)
                if i == 0:
                    hidden.append(h.detach())
                kwargs[i].append({k: v for k, v in kw.items() if k != "hidden_states"})
                if i == last:
                    raise _StopForward()
                return h
            return fn

        for i, layer in enumerate(self.layers):
            layer.forward = passthrough(i)
        try:
            with torch.inference_mode():
                for a in range(0, len(sequences), batch_size):
                    self.check_cancelled()
                    try:
                        base(input_ids=sequences[a:a + batch_size], use_cache=False)
                    except _StopForward:
                        pass
        finally:
            for layer in self.layers:
                del layer.forward
            if held is not None:
                embed.weight = held
        return hidden, kwargs

    @contextlib.contextmanager
    def holding(self, module: torch.nn.Module):
        """Within the block, ``module``'s weights are in memory (read from the files for a lazy walk)."""
        self._materialise(module, self._name(module, ""))
        try:
            yield module
        finally:
            self._release(module)

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[Block]:
        """Decoder block ``index`` with its weights in memory (in any order: a backward pass walks back)."""
        layer = self.layers[index]
        with self.holding(layer):
            yield Block(index, self._name(layer, f"model.layers.{index}."), layer, self)

    def __iter__(self) -> Iterator[Block]:
        t0 = time.perf_counter()
        n = len(self.layers)
        for i in range(n):
            self.check_cancelled()
            with self.block(i) as block:
                yield block
            if self.progress:
                left = (time.perf_counter() - t0) / (i + 1) * (n - i - 1)
                self.progress((i + 1) / n, f"block {i + 1}/{n}, about {left:.0f} s left")

    def final_norm(self) -> torch.nn.Module:
        norm = getattr(getattr(self.model, "model", self.model), "norm", None)
        if not isinstance(norm, torch.nn.Module):
            raise EdgeTailorError(f"{type(self.model).__name__} has no final norm at model.norm.",
                                  "This step needs a Llama-style decoder.")
        return norm

    def final_hidden(self) -> Iterator[torch.Tensor]:
        """The final norm's output for each batch (what the output head reads), after the last block."""
        with self.holding(self.final_norm()) as norm, torch.inference_mode():
            for h in self.hidden:
                yield norm(h)
