"""Early exit: exit heads at intermediate depths; a token leaves at the first head that is confident enough.

Heads. An exit head after block L is ``final_norm(W · rms(h_L))`` followed by the model's own output head
(shared, not copied). W (hidden x hidden) starts as the least-squares map from the normalized residual
stream after block L to the normalized final one on calibration text, then a few steps distil the final
layer's next-token distribution into it (KL). Only the heads' own weights are trained.

Exit rule. A token exits at the first head whose largest softmax probability is >= ``threshold``
(softmax response, as in CALM); its logits are that head's. A threshold of 1.0 or more disables exits.

KV cache (state propagation, as CALM). The blocks a token skipped still need its keys and values for
later tokens: they are computed from the exited hidden state (the block's input norm, k/v projections
and RoPE only; no attention, no MLP). ``EarlyExitModel.decode_step`` does this with a real KV cache;
``EarlyExitModel.forward`` computes the same thing for a whole sequence at once (block by block, exited
positions keep their frozen state, which is exactly what the later blocks' k/v see in decoding), so
evaluation over long windows is as fast as a normal forward pass and gives the decode loop's logits.

Exports. GGUF and ONNX graphs of the standard runtimes have no exits: the heads are saved as a torch
artifact (``*-exit-heads.safetensors``) beside the model, which exports as usual (full depth, no exits).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..context import RunContext
from ..errors import EdgeTailorError, RunCancelled
from ..registry import register_step
from ..runs import Variant
from ..runtimes import EarlyExitRuntime, decode_tokens_per_second


def _rms(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)


class ExitHead(nn.Module):
    def __init__(self, final_norm: nn.Module, hidden: int):
        super().__init__()
        self.norm = copy.deepcopy(final_norm)
        self.proj = nn.Linear(hidden, hidden, bias=False, dtype=next(final_norm.parameters()).dtype)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(hidden))

    def forward(self, h: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.proj(_rms(h))), head_weight)


class EarlyExitModel:
    """A Llama-family causal LM with exit heads after some blocks (``heads``: blocks done -> head)."""

    def __init__(self, model, heads: dict[int, ExitHead]):
        from ..calibration import decoder_layers

        self.model = model
        self.inner = model.model
        self.layers = decoder_layers(model)
        self.heads = dict(sorted(heads.items()))
        self.head_weight = model.get_output_embeddings().weight

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def _final(self, h):
        return F.linear(self.inner.norm(h), self.head_weight)

    def _positions(self, h, start: int):
        pos = torch.arange(start, start + h.shape[1])[None, :]
        return pos, self.inner.rotary_emb(h, position_ids=pos)

    def _mask(self, h, pos):
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.model.config, inputs_embeds=h, attention_mask=None,
                                  past_key_values=None, position_ids=pos)

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Residual stream after 0..n blocks for a batch [b, t] (full model, no exits)."""
        h = self.inner.embed_tokens(ids)
        pos, pe = self._positions(h, 0)
        mask = self._mask(h, pos)
        out = [h]
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            out.append(h)
        return out

    @torch.inference_mode()
    def forward(self, ids, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [t, vocab], blocks run per token [t]) for one sequence, as ``decode_step`` would give."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        h = self.inner.embed_tokens(ids)
        pos, pe = self._positions(h, 0)
        mask = self._mask(h, pos)
        t = ids.shape[1]
        active = torch.ones(t, dtype=torch.bool)
        exit_at = torch.full((t,), self.n_layers, dtype=torch.long)
        logits = None
        for l, layer in enumerate(self.layers):
            new = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            h = torch.where(active[None, :, None], new, h)       # exited positions keep their frozen state
            head = self.heads.get(l + 1)
            if head is not None and threshold < 1.0 and bool(active.any()):
                idx = active.nonzero().squeeze(1)
                hl = head(h[0, idx], self.head_weight)
                leave = F.softmax(hl.float(), -1).amax(-1) >= threshold
                if logits is None:
                    logits = torch.empty(t, hl.shape[-1], dtype=hl.dtype)
                logits[idx[leave]] = hl[leave]
                exit_at[idx[leave]] = l + 1
                active[idx[leave]] = False
        final_idx = active.nonzero().squeeze(1)
        final = self._final(h[0, final_idx])
        if logits is None:
            logits = torch.empty(t, final.shape[-1], dtype=final.dtype)
        logits[final_idx] = final
        return logits, exit_at

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _append_kv(self, layer, h, pe, cache, layer_idx: int) -> None:
        """Keys and values of a skipped block, from the exited hidden state (CALM state propagation)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = pe
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        cache.update(k, v, layer_idx)

    @torch.inference_mode()
    def decode_step(self, token: int, cache, position: int, threshold: float) -> tuple[torch.Tensor, int]:
        """Logits [vocab] for one new token with a KV cache, and the blocks it ran."""
        h = self.inner.embed_tokens(torch.tensor([[int(token)]]))
        pos, pe = self._positions(h, position)
        out, exited = None, None
        for l, layer in enumerate(self.layers):
            if exited is None:
                h = layer(h, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
                          position_embeddings=pe)
                head = self.heads.get(l + 1)
                if head is not None and threshold < 1.0:
                    hl = head(h[0, -1:], self.head_weight)[0]
                    if float(F.softmax(hl.float(), -1).max()) >= threshold:
                        out, exited = hl, l + 1
            else:
                self._append_kv(layer, h, pe, cache, layer.self_attn.layer_idx)
        if out is None:
            out, exited = self._final(h[0, -1:])[0], self.n_layers
        return out, exited



def fit_heads(model, sequences: torch.Tensor, exit_layers: list[int], distill_steps: int = 30, lr: float = 1e-3,
              positions_per_step: int = 256, progress=None, cancelled=None) -> dict[int, ExitHead]:
    """Least-squares init of each head's map, then KL distillation from the final layer's distribution."""
    model.eval()
    probe = EarlyExitModel(model, {})
    states: dict[int, list] = {l: [] for l in exit_layers}
    finals = []
    for i in range(len(sequences)):
        if cancelled and cancelled():
            raise RunCancelled()
        hs = probe.hidden_states(sequences[i:i + 1])
        for l in exit_layers:
            states[l].append(hs[l][0].clone())
        finals.append(hs[-1][0].clone())
    final = torch.cat(finals)
    y = _rms(final).double()
    w_head = probe.head_weight.detach()
    heads = {}
    g = torch.Generator().manual_seed(0)
    for j, l in enumerate(exit_layers):
        x = _rms(torch.cat(states[l])).double()
        gram = x.T @ x
        gram += 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        head = ExitHead(model.model.norm, x.shape[1])
        with torch.no_grad():
            head.proj.weight.copy_(torch.linalg.solve(gram, x.T @ y).T.to(head.proj.weight.dtype))
        if distill_steps:
            xs = torch.cat(states[l])
            opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
            for step in range(distill_steps):
                if cancelled and cancelled():
                    raise RunCancelled()
                pick = torch.randint(len(xs), (positions_per_step,), generator=g)
                with torch.no_grad():
                    target = F.log_softmax(F.linear(model.model.norm(final[pick]), w_head).float(), -1)
                out = F.log_softmax(head(xs[pick], w_head).float(), -1)
                loss = F.kl_div(out, target, log_target=True, reduction="batchmean")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if progress:
                    progress((j + (step + 1) / distill_steps) / len(exit_layers),
                             f"exit head after block {l}: KL {loss.item():.3f}")
        head.requires_grad_(False)
        heads[l] = head.eval()
    return heads


def save_heads(heads: dict[int, ExitHead], path, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"exit.{l}.{k}": v.detach().contiguous() for l, h in heads.items() for k, v in h.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "edgetailor-exit-heads",
                                            "exit_layers": json.dumps(sorted(heads)), **{k: json.dumps(v) for k, v in meta.items()}})


def load_heads(model, path) -> dict[int, ExitHead]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "edgetailor-exit-heads":
            raise EdgeTailorError(f"{path} is not an EdgeTailor exit-heads file.", "Pick the *-exit-heads.safetensors of an early_exit.heads run.")
        heads = {}
        for l in json.loads(meta["exit_layers"]):
            head = ExitHead(model.model.norm, model.config.hidden_size)
            head.load_state_dict({k: f.get_tensor(f"exit.{l}.{k}") for k in head.state_dict()})
            heads[int(l)] = head.requires_grad_(False).eval()
    return heads


def decode_speed(ee: EarlyExitModel, prompt: list[int], new_tokens: int, threshold: float, repeats: int) -> dict:
    rt = EarlyExitRuntime(ee, threshold)
    speed = decode_tokens_per_second(rt, prompt, new_tokens, repeats)
    return {**speed, "decode_mean_blocks": round(sum(rt.blocks_run) / len(rt.blocks_run), 3)}


@dataclass
class EarlyExitConfig:
    depths: list[float] = field(default_factory=lambda: [0.5, 0.75],
                                metadata={"help": "exit heads after these fractions of the blocks"})
    thresholds: list[float] = field(default_factory=lambda: [0.9, 0.8, 0.6],
                                    metadata={"help": "confidence thresholds to evaluate (max softmax probability)"})
    distill_steps: int = field(default=30, metadata={"help": "KL distillation steps per head after the least-squares fit"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the heads' distillation"})
    calibration_sequences: int = field(default=16, metadata={"help": "calibration sequences to fit the heads"})
    calibration_length: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    windows: int | None = field(default=None, metadata={"help": "evaluation windows (default: job option eval_windows)"})
    ctx: int | None = field(default=None, metadata={"help": "tokens per window (default: job option eval_ctx)"})
    decode_tokens: int = field(default=32, metadata={"help": "tokens generated to time decoding (0 = skip)"})
    decode_repeats: int = field(default=3, metadata={"help": "timed generations per threshold (median reported)"})

    def __post_init__(self):
        if not self.depths or not all(0.0 < d < 1.0 for d in self.depths):
            raise ValueError("depths must be fractions strictly between 0 and 1")
        if not self.thresholds or not all(0.0 < t <= 1.0 for t in self.thresholds):
            raise ValueError("thresholds must be in (0, 1]")
        if self.distill_steps < 0 or self.decode_tokens < 0 or self.decode_repeats < 1:
            raise ValueError("distill_steps and decode_tokens must be >= 0, decode_repeats >= 1")


def exit_layers_for(n_layers: int, depths: list[float]) -> list[int]:
    layers = sorted({min(max(1, round(d * n_layers)), n_layers - 1) for d in depths})
    if not layers:
        raise EdgeTailorError(f"The model has {n_layers} blocks: too few for an exit head.", "Use a deeper model.")
    return layers


@register_step("early_exit.heads", EarlyExitConfig, kind="transform",
               summary="Exit heads at intermediate depths; reports tokens leaving early, quality and decode speed "
                       "at each confidence threshold",
               exports="not expressible in standard GGUF/ONNX graphs: the heads are saved as a torch safetensors "
                       "artifact beside the model; later export steps write the full-depth model as usual")
def early_exit_heads(ctx: RunContext, cfg: EarlyExitConfig) -> None:
    from ..calibration import decoder_layers, token_sequences
    from ..evaluate import ReferenceLogprobs, evaluate, make_windows
    from .evaluate import ensure_baseline, reference_folder, variant_metrics

    model = ctx.model
    threads = ctx.options.resolved_threads()
    torch.set_num_threads(threads)
    layers = exit_layers_for(len(decoder_layers(model)), cfg.depths)
    seqs = token_sequences(ctx.tokenizer, ctx.calibration_text(), cfg.calibration_length, cfg.calibration_sequences)
    heads = fit_heads(model, seqs, layers, cfg.distill_steps, cfg.lr,
                      progress=lambda f, m: ctx.progress(0.3 * f, m), cancelled=ctx.cancel.is_set)
    base_name = ctx.current_variant_name()
    heads_file = f"{ctx.source.display_name}-{base_name}-exit-heads.safetensors"
    with ctx.artifact(heads_file) as tmp:
        save_heads(heads, tmp, {"thresholds": cfg.thresholds, "rule": "max softmax probability >= threshold"})
    ee = EarlyExitModel(model, heads)

    n_ctx = cfg.ctx or ctx.options.eval_ctx
    windows = make_windows(ctx.tokenizer, ctx.eval_text(), n_ctx, cfg.windows or ctx.options.eval_windows)
    base = ensure_baseline(ctx, windows, span=(0.3, 0.3))
    ref = ReferenceLogprobs(reference_folder(ctx))
    prompt = windows[0][:32]
    rows = []
    todo = [1.0] + [t for t in sorted(set(cfg.thresholds), reverse=True) if t < 1.0]
    for k, threshold in enumerate(todo):
        ctx.check_cancelled()
        rt = EarlyExitRuntime(ee, threshold)
        res = evaluate(rt, windows, reference=ref, cancelled=ctx.cancel.is_set,
                       on_window=lambda i, n, ppl, k=k: ctx.progress(0.3 + 0.7 * (k + i / n) / len(todo),
                                                                     f"threshold {todo[k]}: {i}/{n}, ppl {ppl:.3f}"))
        metrics = {**variant_metrics(res, base["metrics"]["perplexity"]), "exit_shares": rt.exit_shares(),
                   "exited_share": round(sum(rt.exit_shares().values()), 5), "mean_blocks": round(rt.mean_blocks(), 3),
                   "blocks": ee.n_layers}
        if cfg.decode_tokens:
            metrics.update(decode_speed(ee, prompt, cfg.decode_tokens, threshold, cfg.decode_repeats))
            if rows:
                metrics["decode_speedup"] = round(metrics["decode_tps"] / rows[0]["decode_tps"], 4)
        name = f"{base_name}-exit{threshold:g}"
        ctx.add_variant(Variant(name=name, format="torch-early-exit", path=None,
                                params={"threshold": threshold, "exit_layers": layers, "heads": heads_file},
                                metrics=metrics, parent=base_name, steps=list(ctx.applied)))
        rows.append({"threshold": threshold, **metrics})
        ctx.log(f"threshold {threshold:g}: {100 * metrics['exited_share']:.1f}% of tokens exit early "
                f"({', '.join(f'{100 * v:.1f}% after block {l}' for l, v in metrics['exit_shares'].items())}), "
                f"perplexity {res.perplexity:.3f}, KL {res.kl:.4f}"
                + (f", {metrics['decode_tps']:.1f} tokens/s" if cfg.decode_tokens else ""))
    ctx.report(**{"exit_layers": layers, "heads_file": heads_file,
                             "head_parameters": sum(p.numel() for h in heads.values() for p in h.parameters()),
                             "rows": rows, "kv_scheme": "state propagation (skipped blocks' k/v from the exited state)"})
    ctx.progress(1.0, "early exit measured")
