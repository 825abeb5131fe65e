"""A model's weights read from its safetensors files on demand, in their stored dtype.

``LazyModel(folder)`` offers what the writers read of a transformers model — ``config`` and ``state_dict()`` —
without loading anything: ``state_dict()`` maps each name to a ``LazyTensor`` whose shape and dtype come from
the file header. A writer reads a tensor when its turn comes, whole (``load()``) or a range of rows at a time
(``rows(a, b)``), each read through a memory map that is closed right after, so the pages it touched are not
kept in the process. Nothing is ever converted to fp32 whole: an export-only recipe holds one tensor's
output (and one chunk of rows of its input) at a time. ``LazyModel.loaded_bytes`` counts what was read, for
tests and pre-flight.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


#: the largest header a safetensors file may have (the format's own limit)
MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> dict:
    """The tensors a safetensors file holds (name -> dtype, shape, data_offsets), checked against the file's size:
    a file that is empty, cut short or not safetensors at all raises ``EdgeTailorError`` with the fix."""
    from .errors import EdgeTailorError

    path = Path(path)
    size = path.stat().st_size
    fix = "Download the model's .safetensors files again (an interrupted download leaves a short or empty file)."
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        end = 0
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            if not (isinstance(info["shape"], list) and info["dtype"] in DTYPE_BYTES and 0 <= lo <= hi):
                raise ValueError(f"tensor {name} is malformed")
            end = max(end, hi)
        if 8 + n + end > size:
            raise ValueError(f"the tensors need {8 + n + end} bytes, the file has {size}")
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise EdgeTailorError(f"{path} is not a valid safetensors file ({exc}).", fix) from exc
    return header


@dataclass
class LazyTensor:
    file: Path
    name: str
    shape: tuple
    dtype: str                  # safetensors dtype name (BF16, F16, F32, ...)
    owner: "LazyModel"
    is_lazy = True

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel() * DTYPE_BYTES.get(self.dtype, 4)

    @property
    def files(self) -> set[Path]:
        """The files it is read from."""
        return {self.file}

    def load(self):
        """The whole tensor, in its stored dtype (a copy out of the file)."""
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as f:
            t = f.get_tensor(self.name)
        self.owner.loaded_bytes += t.numel() * t.element_size()
        return t

    def rows(self, start: int, stop: int):
        """Rows ``start:stop`` of the tensor (its first dimension), in its stored dtype."""
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as f:
            t = f.get_slice(self.name)[start:stop]
        self.owner.loaded_bytes += t.numel() * t.element_size()
        return t

    def detach(self):       # what exporters call on a parameter: here, the read
        return self.load()


@dataclass
class StackedTensor:
    """A module's weight that the files keep in pieces (a mixture of experts: one tensor per expert, and gate and up
    apart where transformers fuses ``gate_up_proj``): ``groups`` holds each source's file tensors in expert order;
    the weight is each group stacked on a new first dimension, the groups joined on the second. Read an expert at a
    time (``rows``), never more than asked."""
    name: str
    groups: tuple                  # per source pattern: the experts' LazyTensors, in order
    owner: "LazyModel"
    is_lazy = True

    @property
    def shape(self) -> tuple:
        first = self.groups[0][0].shape
        return (len(self.groups[0]), sum(g[0].shape[0] for g in self.groups), *first[1:])

    @property
    def dtype(self) -> str:
        return self.groups[0][0].dtype

    ndim = LazyTensor.ndim
    numel = LazyTensor.numel
    nbytes = LazyTensor.nbytes

    @property
    def files(self) -> set[Path]:
        return {t.file for g in self.groups for t in g}

    def rows(self, start: int, stop: int):
        """Experts ``start:stop`` (the first dimension), in the stored dtype."""
        import torch

        parts = [torch.stack([g[e].load() for e in range(start, stop)]) for g in self.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def expert(self, e: int, lo: int, hi: int):
        """Rows ``lo:hi`` of expert ``e``'s matrix (the second dimension), reading only the file tensors they are in
        (gate or up alone, for one half of ``gate_up_proj``)."""
        import torch

        parts, row = [], 0
        for g in self.groups:
            n = g[e].shape[0]
            if row < hi and lo < row + n:
                whole = g[e].load()
                parts.append(whole[max(lo - row, 0):min(hi - row, n)])
            row += n
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def load(self):
        return self.rows(0, len(self.groups[0]))

    def detach(self):
        return self.load()


def _module_view(state: dict, model_type: str, owner: "LazyModel") -> dict:
    """The files' tensors under the names the model's modules use, where transformers' own checkpoint conversion
    (``transformers.conversion_mapping``) renames them or merges experts: file tensors that no conversion touches
    keep their names. Only renames and expert merges (``MergeModulelist`` on dim 0, then ``Concatenate`` on dim 1)
    are read; a family that needs more keeps its file names (and the walk says the names differ)."""
    import re

    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        rules = get_checkpoint_conversion_mapping(model_type) or []
    except (ImportError, AttributeError, KeyError):        # another transformers: the files' names as they are
        return state
    renames = [(r.source_patterns, r.target_patterns) for r in rules if type(r).__name__ == "WeightRenaming"]
    merges = [r for r in rules if type(r).__name__ == "WeightConverter"]
    if not merges or any([type(o).__name__ for o in m.operations] not in (["MergeModulelist"],
                         ["MergeModulelist", "Concatenate"]) for m in merges):
        return state
    patterns = [(re.compile(re.escape(p).replace(r"\*", r"(\d+)")), k, m.target_patterns[0])
                for m in merges for k, p in enumerate(m.source_patterns)]
    out, groups = {}, {}
    for name, t in state.items():
        for sources, targets in renames:
            for a, b in zip(sources, targets):
                name = name.replace(a, b)
        hit = next(((found, k, target) for rx, k, target in patterns if (found := rx.search(name))), None)
        if hit is None:
            out[name] = t
            continue
        found, k, target = hit
        merged = name[:found.start()] + target + name[found.end():]
        groups.setdefault(merged, {}).setdefault(k, {})[int(found.group(1))] = t
        out.setdefault(merged, None)
    for merged, by_source in groups.items():
        out[merged] = StackedTensor(merged, tuple(tuple(g[e] for e in sorted(g)) for _, g in sorted(by_source.items())),
                                    owner)
    return out


class LazyModel:
    """The untouched source model, as a config and a state dict of ``LazyTensor`` s (nothing loaded)."""

    is_lazy = True

    def __init__(self, folder: Path, trust_remote_code: bool = False):
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        self.loaded_bytes = 0
        self.changed: frozenset[str] = frozenset()   # names a streamed transform rewrote (in scratch files)
        self._state: dict[str, LazyTensor] = {}
        for f in sorted(self.folder.glob("*.safetensors")):
            for name, info in read_header(f).items():
                self._state[name] = LazyTensor(f, name, tuple(info["shape"]), info["dtype"], self)
        self._state = _module_view(self._state, self.config.model_type, self)
        if getattr(self.config, "tie_word_embeddings", False) and "lm_head.weight" not in self._state \
                and "model.embed_tokens.weight" in self._state:
            self._state["lm_head.weight"] = self._state["model.embed_tokens.weight"]
        order = self._module_order(trust_remote_code)
        self._state = {**{k: self._state[k] for k in order if k in self._state}, **self._state}

    def _module_order(self, trust_remote_code: bool) -> list[str]:
        """The state-dict order of the model's modules (an empty skeleton on the meta device: no memory), so a
        file written from the lazy model is byte for byte the one written from the loaded model."""
        import torch
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(self.config, trust_remote_code=trust_remote_code)
        except Exception:           # an unknown class: keep the files' order
            return []
        return list(skeleton.state_dict())

    def state_dict(self) -> dict[str, LazyTensor]:
        return dict(self._state)

    def parameter_count(self) -> int:
        unique = {id(t): t for t in self._state.values()}       # a tied head is the embedding once
        return sum(t.numel() for t in unique.values())

    def without_blocks(self, drop) -> "LazyModel":
        """The same files seen as the model without decoder blocks ``drop`` (the others renumbered in order, the
        config's per-layer lists carried along): nothing is read or copied."""
        import copy
        import re

        from .architectures import keep_layers

        n = int(self.config.num_hidden_layers)
        keep = [i for i in range(n) if i not in set(drop)]
        renumber = {old: new for new, old in enumerate(keep)}
        layer = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
        out = copy.copy(self)
        out.config = copy.deepcopy(self.config)
        keep_layers(out.config, keep)
        out._state = {}
        for name, t in self._state.items():
            m = layer.match(name)
            if m is None:
                out._state[name] = t
            elif int(m.group(1)) in renumber:
                out._state[f"model.layers.{renumber[int(m.group(1))]}.{m.group(2)}"] = t
        out.changed = frozenset(k for k, t in out._state.items() if t.name != k or k in self.changed)
        return out

    def with_tensors(self, tensors: dict[str, "LazyTensor"], config=None) -> "LazyModel":
        """The same model with ``tensors`` (a transform's output, in scratch files) in place of its own; the rest
        is still read from where it was. ``config``: the new model's, when the transform changed shapes. Nothing is
        read or copied."""
        import copy

        unknown = sorted(set(tensors) - set(self._state))
        if unknown:
            raise KeyError(f"not a weight of the model: {unknown[0]}")
        out = copy.copy(self)
        out.config = config if config is not None else self.config
        out._state = {k: tensors.get(k, t) for k, t in self._state.items()}
        tied = [k for k, t in self._state.items()
                if k not in tensors and t.name in tensors and t is self._state.get(t.name)]
        for k in tied:                     # a tied head follows its embedding
            out._state[k] = tensors[self._state[k].name]
        out.changed = self.changed | frozenset(tensors) | frozenset(tied)
        return out

    def materialise(self, dtype=None):
        """The model in torch (for the steps that must hold it whole): an empty skeleton of this config, every
        parameter read from the files into ``dtype`` (fp32 by default), checked against the skeleton's shape."""
        import torch

        from .walker import set_parameter, skeleton

        dtype = dtype or torch.float32
        model = skeleton(self.config)
        for name, p in list(model.named_parameters()):
            t = self._state[name]
            if tuple(t.shape) != tuple(p.shape):
                raise AssertionError(f"{name}: {tuple(t.shape)} does not fit {tuple(p.shape)}")
            set_parameter(model, name, t.load().to(dtype))
        if getattr(self.config, "tie_word_embeddings", False):
            model.tie_weights()
        return model.eval()


class TensorStore:
    """Where a streamed transform puts what it changed: one safetensors file per decoder block in a scratch folder,
    each tensor in the narrowest of its source dtype and fp32 that holds it exactly (pruning's zeros keep a bf16
    source in bf16; rescaled weights stay fp32, as the loaded model would hold them)."""

    def __init__(self, folder: Path, source: LazyModel):
        self.folder = Path(folder)
        self.source = source
        self.tensors: dict[str, LazyTensor] = {}
        self.written_bytes = 0

    def write(self, key: str, tensors: dict) -> None:
        import torch
        from safetensors.torch import save_file

        from .atomic import atomic_path

        state = self.source.state_dict()
        out = {}
        for name, t in tensors.items():
            narrow = _torch_dtype(state[name].dtype)
            t = t.detach().float()
            out[name] = t.to(narrow) if narrow != torch.float32 and _exact_in(t, narrow) else t
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in out.items()}, str(tmp))
        for name, t in out.items():
            self.tensors[name] = LazyTensor(path, name, tuple(t.shape), _dtype_name(t.dtype), self.source)
            self.written_bytes += t.numel() * t.element_size()

    def model(self, config=None) -> LazyModel:
        """The source with everything written so far in place (``config``: the new one, when shapes changed)."""
        return self.source.with_tensors(self.tensors, config)


#: elements compared at a time when checking that a tensor survives a narrower dtype (64 MB of float32)
EXACT_CHUNK = 1 << 24


def _exact_in(t, dtype) -> bool:
    """Whether ``t`` (float32) is held exactly by ``dtype``, checked a slice at a time: a whole copy of a stacked
    experts tensor in each dtype would be 2.4 GB beside a Qwen3-30B-A3B block (measured: AWQ's peak 6.3 GB)."""
    import torch

    flat = t.reshape(-1)
    return all(torch.equal(flat[a:a + EXACT_CHUNK].to(dtype).float(), flat[a:a + EXACT_CHUNK])
               for a in range(0, flat.numel(), EXACT_CHUNK))


def _torch_dtype(name: str):
    import torch

    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(name, torch.float32)


def _dtype_name(dtype) -> str:
    import torch

    return {torch.float16: "F16", torch.bfloat16: "BF16"}.get(dtype, "F32")


def can_read_lazily(folder: Path) -> bool:
    return any(Path(folder).glob("*.safetensors"))
