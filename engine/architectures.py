"""Which decoder architectures EdgeTailor supports, and how each maps onto GGUF.

One table, read by the pre-flight check (what the user is told), the GGUF exporter (how tensors are
named and permuted) and the techniques (which need the Llama-style module layout).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Techniques verified on every family: they change weight values only and export through either GGUF writer.
VALUE_TECHNIQUES = ("prune.magnitude", "prune.wanda")
# Steps that measure or export and work on any supported family.
FAMILY_AGNOSTIC = ("export", "evaluate", "benchmark")
# Steps whose blocks go into EdgeTailor's own GGUF writer (the block walker is tested against a full forward on
# each family the own writer covers).
OWN_WRITER_STEPS = ("imatrix", "quant.gguf_calibrated", "fit")
# Techniques that take a decoder block whole or its linear layers as plain matrices, whatever a family names them
# (remove blocks, factor, cluster, train), and AWQ with each family's layout (``steps.awq.awq_groups``): verified on
# every family of the own writer (tests/test_families.py: the file equals the changed model, removing blocks equals
# skipping them, folded scales keep the function, cut MLP channels are zeroed ones, a tied block computes in its own
# place). Width pruning's head and hidden cuts and exit heads assume the Llama block and stay with the Llama-like
# families.
BLOCK_TECHNIQUES = ("prune.depth", "lowrank.svd", "cluster.kmeans", "distill", "finetune.lora", "awq.scale",
                    "prune.width",     # MLP channels only (``steps.prune.structured.mlp_layout``); heads and hidden: Llama's
                    "share.layers")    # a block in the next one's place (``steps.share.twin``)
OWN_WRITER_TECHNIQUES = VALUE_TECHNIQUES + OWN_WRITER_STEPS + BLOCK_TECHNIQUES


@dataclass(frozen=True)
class ArchSpec:
    model_type: str            # Hugging Face config.model_type
    gguf_arch: str             # llama.cpp's general.architecture
    permute_qk: bool = False   # HF rotate-half rope -> llama.cpp interleaved rope for this arch
    qk_norm: bool = False      # per-head RMSNorm on q and k (qwen3)
    qkv_bias: bool = False     # biases on q/k/v projections (qwen2)
    # "edgetailor": the project's own writer (exporters/gguf.py), into which the calibrated quantizer writes
    # its blocks; "llama.cpp": llama.cpp's converter (exporters/hf_converter.py), which knows the family.
    gguf_writer: str = "llama.cpp"
    # the own writer: config scalars written as GGUF keys (config key, gguf-py GGUFWriter method), as llama.cpp's
    # converter writes them for the family (Granite's multipliers)
    gguf_scalars: tuple[tuple[str, str], ...] = ()
    gguf_norm_shift: float = 0.0        # the own writer: added to every norm weight (Gemma's RMSNorm scales by 1 + w)
    gguf_layer_types: bool = False      # the own writer: per-block local/global attention and its rope base as keys
    gguf_space_prefix: bool | None = None   # the own writer, SentencePiece vocabularies: add_space_prefix if said
    # Who writes the ONNX graph: "edgetailor" (exporters/onnx.py, every int4 method), "genai-builder"
    # (onnxruntime-genai's model builder, which knows the family), or "" (nobody yet: onnx_note says why).
    onnx: str = ""
    onnx_note: str = "neither EdgeTailor's ONNX graph nor onnxruntime-genai's model builder covers it yet"
    # None: every technique; else the transform/calibration steps verified on this family (the others say why not).
    techniques: tuple[str, ...] | None = VALUE_TECHNIQUES
    moe: bool = False
    features: tuple[str, ...] = ()   # what the family brings, as the user reads it
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def exporters(self) -> tuple[str, ...]:
        return ("gguf", "onnx") if self.onnx else ("gguf",)

    @property
    def own_gguf_writer(self) -> bool:
        return self.gguf_writer == "edgetailor"

    def technique(self, step: str, kind: str) -> str:
        """"yes", or why ``step`` does not apply to this family."""
        if step in FAMILY_AGNOSTIC or self.techniques is None or step in self.techniques:
            return "yes"
        if kind == "measure" and step not in ("imatrix",):
            return "yes"
        where = [s.model_type for s in ARCHITECTURES.values() if s.techniques is None or step in s.techniques]
        why = (MOE_NOT_YET.get(step, "this step does not handle its expert layers yet") if self.moe else
               "it assumes the Llama block layout (q/k/v/o, gate/up/down, pre-norms) and is verified on "
               f"{', '.join(where)} only so far")
        return f"not for {self.model_type} yet: {why}"


#: why a step does not apply to a mixture of experts, where there is more to say than that it has not been done
MOE_NOT_YET = {
    "lowrank.svd": "this step does not handle its expert layers yet (and a product of factors would not shrink the "
                   "file: llama.cpp holds each expert as one plain matrix)",
    "cluster.kmeans": "this step does not handle its expert layers yet (its palette file keeps one codebook per 2-D "
                      "tensor)",
}


# Mixtures of experts: importance statistics per expert (llama.cpp's imatrix for ``ffn_*_exps``) and calibrated
# blocks in llama.cpp's type mixes or a measured mix (each expert weighted and priced by its own tokens), AWQ's
# scales (the experts' inputs scaled together with the router's, each expert's down projection by its own:
# ``steps.awq.ExpertGroup``) besides the value techniques.
MOE_TECHNIQUES = VALUE_TECHNIQUES + ("imatrix", "quant.gguf_calibrated", "fit", "awq.scale",
                                     "prune.depth",   # whole blocks, experts and router with them
                                     "prune.width")   # each expert's MLP channels (``structured.expert_width``)
_LLAMA_LIKE = dict(gguf_writer="edgetailor", onnx="edgetailor", onnx_note="", techniques=None)
_BUILDER = dict(onnx="genai-builder", onnx_note="")
_SWA_NOTE = ("onnxruntime-genai's builder writes its sliding-window layers for a preallocated KV cache, which "
             "EdgeTailor's ONNX runtime does not give yet (and the 0.18 builder fails on transformers 5's Gemma 3 config)")
ARCHITECTURES: dict[str, ArchSpec] = {s.model_type: s for s in (
    ArchSpec("llama", "llama", permute_qk=True, **_LLAMA_LIKE),
    ArchSpec("mistral", "llama", permute_qk=True, notes="written as GGUF arch 'llama'",
             features=("sliding window (llama.cpp attends to the whole context)",), **_LLAMA_LIKE),
    ArchSpec("qwen2", "qwen2", qkv_bias=True, features=("q/k/v biases",), **_LLAMA_LIKE),
    ArchSpec("qwen3", "qwen3", qk_norm=True, features=("QK norms",), **_LLAMA_LIKE),
    ArchSpec("gemma", "gemma", **_BUILDER, gguf_writer="edgetailor", gguf_norm_shift=1.0, gguf_space_prefix=False,
             techniques=OWN_WRITER_TECHNIQUES, features=("embedding scaling", "norm offset (1 + w)", "tied head", "GeLU")),
    ArchSpec("gemma2", "gemma2", onnx_note=_SWA_NOTE, gguf_writer="edgetailor", gguf_norm_shift=1.0, gguf_layer_types=True,
             gguf_space_prefix=False, techniques=OWN_WRITER_TECHNIQUES,
             gguf_scalars=(("attn_logit_softcapping", "add_attn_logit_softcapping"),
                           ("final_logit_softcapping", "add_final_logit_softcapping")), features=("logit soft-capping", "attention soft-capping", "local/global layers",
                                            "sliding window", "query pre-attention scaling", "post-norms")),
    ArchSpec("gemma3_text", "gemma3", onnx_note=_SWA_NOTE, gguf_writer="edgetailor", qk_norm=True, gguf_norm_shift=1.0,
             gguf_layer_types=True, gguf_space_prefix=False, techniques=OWN_WRITER_TECHNIQUES,
             gguf_scalars=(("final_logit_softcapping", "add_final_logit_softcapping"),), features=("local/global layers", "sliding window", "two rope bases",
                                                 "QK norms", "embedding scaling", "norm offset")),
    ArchSpec("phi3", "phi3", **_BUILDER, gguf_writer="edgetailor", techniques=OWN_WRITER_TECHNIQUES,
             features=("fused QKV", "fused gate-up", "partial rotary", "long-rope scaling")),
    ArchSpec("granite", "granite", **_BUILDER, gguf_writer="edgetailor", permute_qk=True,
             techniques=OWN_WRITER_TECHNIQUES,
             gguf_scalars=(("attention_multiplier", "add_attention_scale"), ("embedding_multiplier", "add_embedding_scale"),
                           ("residual_multiplier", "add_residual_scale"), ("logits_scaling", "add_logit_scale")),
             features=("embedding, residual, attention and logit multipliers",)),
    ArchSpec("olmo2", "olmo2", gguf_writer="edgetailor", gguf_layer_types=True, techniques=OWN_WRITER_TECHNIQUES,
             features=("QK norms over all heads", "post-norms")),
    ArchSpec("smollm3", "smollm3", gguf_writer="edgetailor", permute_qk=True, techniques=OWN_WRITER_TECHNIQUES,
             onnx_note="onnxruntime-genai 0.18's builder fails on its NoPE layers (KeyError 'position_ids')", features=("NoPE layers",)),
    ArchSpec("starcoder2", "starcoder2", gguf_writer="edgetailor", techniques=OWN_WRITER_TECHNIQUES,
             features=("biases", "LayerNorm", "GeLU MLP")),
    ArchSpec("stablelm", "stablelm", gguf_writer="edgetailor", techniques=OWN_WRITER_TECHNIQUES,
             features=("partial rotary", "LayerNorm", "q/k/v biases")),
    ArchSpec("qwen3_moe", "qwen3moe", qk_norm=True, moe=True, gguf_writer="edgetailor", techniques=MOE_TECHNIQUES,
             features=("mixture of experts (top-k routing)", "QK norms")),
    ArchSpec("mixtral", "llama", permute_qk=True, moe=True, gguf_writer="edgetailor", techniques=MOE_TECHNIQUES,
             notes="written as GGUF arch 'llama'",
             features=("mixture of experts (top-2 routing)",)),
)}


def _gemma3_scale_problem(cfg) -> str:
    dims = ModelDims.of(cfg)
    scalar = getattr(cfg, "query_pre_attn_scalar", None) or dims.head_dim
    llama_cpp = dims.hidden / dims.heads if dims.layers == 62 else dims.head_dim
    if abs(float(scalar) - llama_cpp) < 1e-6:
        return ""
    return (f"its queries are scaled by 1/sqrt({scalar:g}); llama.cpp's Gemma 3 graph scales this size's by "
            f"1/sqrt({llama_cpp:g})")


def _qwen3_moe_problem(cfg) -> str:
    """llama.cpp's Qwen3-MoE graph: every block a mixture of experts whose top-k weights are normalised."""
    dense = list(getattr(cfg, "mlp_only_layers", None) or [])
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    if dense or step != 1:
        return (f"some of its blocks are dense (mlp_only_layers {dense}, decoder_sparse_step {step}); llama.cpp's "
                "Qwen3-MoE graph makes every block a mixture of experts")
    if not getattr(cfg, "norm_topk_prob", True):
        return "its router's top-k weights are not normalised (norm_topk_prob false); llama.cpp's Qwen3-MoE graph normalises them"
    return ""


def expert_count(cfg) -> int:
    """Experts per mixture-of-experts block (Mixtral's ``num_local_experts``, Qwen's ``num_experts``); 0 if dense."""
    return int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0)


def arch_spec(model_type: str) -> ArchSpec | None:
    return ARCHITECTURES.get(model_type)


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def gguf_writer_for(cfg) -> str:
    """Which writer a model's GGUF file needs: the own writer covers plain Llama/Qwen blocks; a llama model with
    attention or MLP biases goes through llama.cpp's converter (the own writer has no bias permutation)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    spec = arch_spec(get("model_type"))
    if spec is None:
        return ""
    if spec.own_gguf_writer and get("model_type") in ("llama", "mistral") and (get("attention_bias") or get("mlp_bias")):
        return "llama.cpp"
    return spec.gguf_writer


#: llama.cpp's SmolLM3 graph leaves rotary out of every 4th block (``n_no_rope_layer_step``, fixed in its code)
SMOLLM3_NOPE_STEP = 4


def gguf_layout_problem(cfg) -> str:
    """Why no llama.cpp file of this model can compute what it computes ("" if one can): SmolLM3's blocks without
    rotary must be where llama.cpp's graph puts them; Gemma 3's queries are scaled as llama.cpp's graph scales
    them (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-block 27B); Qwen3-MoE's blocks are all experts,
    their weights normalised."""
    if getattr(cfg, "model_type", "") == "gemma3_text":
        return _gemma3_scale_problem(cfg)
    if getattr(cfg, "model_type", "") == "qwen3_moe":
        return _qwen3_moe_problem(cfg)
    if getattr(cfg, "model_type", "") != "smollm3":
        return ""
    uses_rope = [bool(x) for x in (getattr(cfg, "no_rope_layers", None) or [])]
    llama_cpp = [(i + 1) % SMOLLM3_NOPE_STEP != 0 for i in range(len(uses_rope))]
    if uses_rope == llama_cpp:
        return ""
    return (f"its blocks without rotary positions are {[i for i, r in enumerate(uses_rope) if not r]}; llama.cpp's "
            f"SmolLM3 graph leaves rotary out of every {SMOLLM3_NOPE_STEP}th block only")


PER_LAYER_LISTS = ("layer_types", "no_rope_layers")    # config lists with one entry per decoder block


def keep_layers(cfg, keep: list[int]) -> None:
    """Give a transformers config ``len(keep)`` blocks, the i-th like the source's block ``keep[i]``: per-layer
    lists (Gemma 3's local/global ``layer_types``, SmolLM3's ``no_rope_layers``) are carried along first, so the
    config stays valid."""
    for name in PER_LAYER_LISTS:
        values = getattr(cfg, name, None)
        if isinstance(values, list) and values:
            setattr(cfg, name, [values[i % len(values)] for i in keep])
    cfg.num_hidden_layers = len(keep)


def count_parameters(cfg: dict) -> dict:
    """Parameter count of a Llama-family config, without loading weights.

    Returns total, embedding (input embeddings + untied output head) and non-embedding counts.
    """
    dims = ModelDims.of(cfg)
    h, inter, layers, heads, kv, hd, vocab, tied = (dims.hidden, dims.intermediate, dims.layers, dims.heads,
                                                    dims.kv_heads, dims.head_dim, dims.vocab, dims.tied)
    attn = h * heads * hd * 2 + h * kv * hd * 2
    if cfg.get("attention_bias") or cfg.get("model_type") == "qwen2":
        attn += heads * hd + 2 * kv * hd
    if cfg.get("model_type") in ("qwen3", "qwen3_moe"):
        attn += 2 * hd
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    # a mixture of experts: every expert's three projections and the router (Qwen3-MoE's experts are narrower)
    mlp = experts * (3 * h * int(cfg.get("moe_intermediate_size") or inter) + h) if experts else 3 * h * inter
    per_layer = attn + mlp + 2 * h
    embedding = vocab * h * (1 if tied else 2)
    non_embedding = layers * per_layer + h
    return {"total": embedding + non_embedding, "embedding": embedding, "non_embedding": non_embedding}


@dataclass(frozen=True)
class ModelDims:
    """A decoder's dimensions, read once from its config: every module that needs heads, head size or widths
    reads them here (a transformers config, or its JSON as a dict; a multimodal config's ``text_config``)."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    context: int
    rms_eps: float

    @classmethod
    def of(cls, cfg) -> "ModelDims":
        d = cfg if isinstance(cfg, dict) else (cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg)))
        text = d.get("text_config") if isinstance(d.get("text_config"), dict) else {}
        d = {**text, **{k: v for k, v in d.items() if v is not None}}
        hidden = int(d.get("hidden_size") or 0)
        heads = int(d.get("num_attention_heads") or 1)
        return cls(model_type=str(d.get("model_type", "")), hidden=hidden,
                   intermediate=int(d.get("intermediate_size") or 4 * hidden),
                   layers=int(d.get("num_hidden_layers") or 1), heads=heads,
                   kv_heads=int(d.get("num_key_value_heads") or heads),
                   head_dim=int(d.get("head_dim") or hidden // heads), vocab=int(d.get("vocab_size") or 0),
                   tied=bool(d.get("tie_word_embeddings", False)),
                   context=int(d.get("max_position_embeddings") or 0), rms_eps=float(d.get("rms_norm_eps") or 1e-6))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def gguf_tensor_names(cfg):
    """llama.cpp's tensor-name map for the model's family (gguf-py's ``TensorNameMap``): HF name -> GGUF name."""
    import gguf

    spec = arch_spec(cfg.model_type)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.gguf_arch)
    return gguf.get_tensor_name_map(arch, int(cfg.num_hidden_layers))
