"""Calibration statistics: what a model's activations look like on calibration text.

Pruning ranks weights and structures by these statistics; calibrated quantizers weight their errors by
them. Everything here runs the model in torch with forward hooks, under ``torch.inference_mode``::

    seqs = token_sequences(tokenizer, ctx.calibration_text(), seq_len=256, max_sequences=32)
    stats = linear_input_stats(model, seqs)          # {"model.layers.0.self_attn.q_proj": ChannelStats, ...}
    stats["model.layers.0.mlp.down_proj"].l2_norm     # ||X_j||_2 per input channel (Wanda's scale)
    stats["model.layers.0.mlp.down_proj"].second_moment   # E[x_j^2] per input channel (imatrix-style)
    influence = block_influence(model, seqs)          # per decoder block: 1 - cos(input, output) (ShortGPT)

Never pass evaluation text (e.g. wikitext) here: that would bias every figure measured on it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .errors import EdgeTailorError, RunCancelled


def token_sequences(tokenizer, text: str, seq_len: int, max_sequences: int | None = None,
                    stride: int | None = None) -> torch.Tensor:
    """The text tokenized once and cut into sequences of ``seq_len`` tokens, shape [n, seq_len].

    BOS (when the tokenizer uses one) starts every sequence, as in evaluation. ``stride`` < ``seq_len``
    makes overlapping sequences (more of them from a short text); default: non-overlapping.
    """
    from .evaluate import uses_bos

    if seq_len < 8:
        raise EdgeTailorError(f"A calibration sequence of {seq_len} tokens is too short.", "Use 64 tokens or more.")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = uses_bos(tokenizer)
    body = seq_len - (1 if bos is not None else 0)
    stride = stride or body
    starts = list(range(0, max(len(ids) - body, 0) + 1, stride)) if len(ids) >= body else []
    if not starts:
        raise EdgeTailorError(f"The calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}.",
                              "Use a longer calibration text or a shorter sequence length.")
    if max_sequences:
        starts = starts[:max_sequences]
    rows = [([bos] if bos is not None else []) + ids[s:s + body] for s in starts]
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one linear layer's inputs, accumulated over every token."""

    sum_sq: torch.Tensor     # sum of x_j^2, float64 [in_features]
    sum_abs: torch.Tensor    # sum of |x_j|, float64 [in_features]
    count: int               # tokens seen

    @property
    def l2_norm(self) -> torch.Tensor:
        """||X_j||_2 over all tokens (Wanda's per-channel scale)."""
        return self.sum_sq.sqrt()

    @property
    def second_moment(self) -> torch.Tensor:
        """E[x_j^2] (the diagonal of X^T X / n, as llama.cpp's imatrix keeps)."""
        return self.sum_sq / max(self.count, 1)


def linear_modules(model, name_filter: Callable[[str], bool] | None = None) -> dict[str, torch.nn.Linear]:
    """The model's linear layers by qualified name (the output head excluded), optionally filtered."""
    out = {}
    for name, mod in model.named_modules():
        if (isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")
                and (name_filter is None or name_filter(name))):
            out[name] = mod
    return out


def run_batches(model, sequences: torch.Tensor, batch_size: int = 4,
                progress: Callable[[float, str], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> None:
    """Forward every sequence through the model (hooks do the work); checks for cancel between batches."""
    was_training = model.training
    model.eval()
    n = len(sequences)
    try:
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                if cancelled and cancelled():
                    raise RunCancelled()
                model(input_ids=sequences[i:i + batch_size], use_cache=False)
                if progress:
                    progress(min(i + batch_size, n) / n, f"calibration {min(i + batch_size, n)}/{n}")
    finally:
        model.train(was_training)


@contextlib.contextmanager
def input_hooks(handles: Iterable):
    handles = list(handles)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def recording_channel_stats(mods: dict[str, torch.nn.Module]):
    """Within the block, every forward of the given modules adds its input to the yielded statistics."""
    stats = {name: ChannelStats(torch.zeros(m.in_features, dtype=torch.float64),
                                torch.zeros(m.in_features, dtype=torch.float64), 0) for name, m in mods.items()}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = stats[name]
            s.sum_sq += (x * x).sum(0)
            s.sum_abs += x.abs().sum(0)
            s.count += x.shape[0]
        return fn

    with input_hooks(m.register_forward_pre_hook(hook(n)) for n, m in mods.items()):
        yield stats


def linear_input_stats(model, sequences: torch.Tensor, name_filter: Callable[[str], bool] | None = None,
                       batch_size: int = 4, progress=None, cancelled=None) -> dict[str, ChannelStats]:
    """Per-input-channel sum of squares and of absolute values of every decoder block's linear inputs (the
    model walked one block at a time, ``engine.walker``)."""
    from .walker import BlockWalk

    stats: dict[str, ChannelStats] = {}
    for block in BlockWalk(model, sequences, batch_size, cancelled=cancelled, progress=progress):
        mods = {n: m for n, m in block.linears().items() if name_filter is None or name_filter(n)}
        with recording_channel_stats(mods) as found:
            block.forward()
        stats.update(found)
    return stats


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks of a Llama-family causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise EdgeTailorError(f"{type(model).__name__} has no model.layers list of decoder blocks.",
                              "This technique needs a Llama-family model (llama, mistral, qwen2, qwen3).")
    return layers


def block_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def block_influence(model, sequences: torch.Tensor, batch_size: int = 4, progress=None,
                    cancelled=None) -> list[float]:
    """ShortGPT's Block Influence of every decoder block: mean over tokens of 1 - cos(input, output).

    A block whose output is nearly its input (low influence) changes the residual stream least.
    """
    from .walker import BlockWalk

    influence = []
    for block in BlockWalk(model, sequences, batch_size, cancelled=cancelled, progress=progress):
        before = list(block.walk.hidden)
        block.forward()
        total = sum(float((1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).sum())
                    for x, y in zip(before, block.walk.hidden))
        influence.append(total / max(sum(x.shape[0] * x.shape[1] for x in before), 1))
    return influence


def final_logprobs(model, sequences: torch.Tensor, rows: int = 64, cancelled=None) -> torch.Tensor:
    """The model's next-token log-probabilities at every position of ``sequences`` [n, L] -> [n * L, vocab],
    one decoder block at a time (a ``LazyModel`` reads each block's weights from its files)."""
    from .walker import BlockWalk

    walk = BlockWalk(model, sequences, batch_size=len(sequences), cancelled=cancelled)
    for block in walk:
        block.forward()
    out = []
    with walk.holding(walk.model.get_output_embeddings()) as head, torch.inference_mode():
        for h in walk.final_hidden():
            flat = h.reshape(-1, h.shape[-1])
            for a in range(0, len(flat), rows):
                logits = final_logits(model.config, head(flat[a:a + rows]).float())
                out.append(torch.log_softmax(logits, -1))
    return torch.cat(out)


def final_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What a family's causal-LM head does after its matrix (as its transformers forward does): Granite divides by
    ``logits_scaling``, Gemma 2/3 cap with ``final_logit_softcapping``."""
    text = getattr(config, "text_config", None) or config
    scaling = getattr(text, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def depth_kl(model, sequences: torch.Tensor, drops: list[list[int]], cancelled=None) -> list[float]:
    """Mean KL(model || model without the blocks of each ``drops`` entry) over the tokens of ``sequences``:
    what removing those blocks costs, measured (a walk per entry, each block read once)."""
    ref = final_logprobs(model, sequences, cancelled=cancelled)
    out = []
    for drop in drops:
        lp = final_logprobs(model.without_blocks(drop), sequences, cancelled=cancelled)
        out.append(float((ref.exp() * (ref - lp)).sum(-1).mean()))
    return out


@contextlib.contextmanager
def skipping_block(model, index: int):
    """Within the block, decoder block ``index`` passes its input through unchanged (as if removed)."""
    layer = decoder_layers(model)[index]

    def fn(module, args, kwargs, output):
        x = block_input(args, kwargs)
        return (x,) + tuple(output[1:]) if isinstance(output, tuple) else x

    with input_hooks([layer.register_forward_hook(fn, with_kwargs=True)]):
        yield


def mean_loss(model, sequences: torch.Tensor, batch_size: int = 4, cancelled=None) -> float:
    """Mean next-token cross-entropy (nats/token) of the model on the sequences."""
    total, n = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(sequences), batch_size):
            if cancelled and cancelled():
                raise RunCancelled()
            ids = sequences[i:i + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += float(loss)
            n += ids[:, 1:].numel()
    return total / max(n, 1)
