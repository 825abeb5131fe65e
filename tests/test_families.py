"""Model families: each tiny random model exports to a GGUF that computes what torch computes, tokenizes alike,
survives a transform, and a file that is not the model is stopped before it is kept."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from family_models import FAMILIES
from test_gguf_export import TEST_STRINGS

# the odd scale is a file that must be stopped; long-rope Phi is here for its GGUF keys (onnxruntime-genai 0.18's
# builder reads rope_scaling["type"], which transformers 5 configs no longer carry)
FAMILY_LIST = [f for f in FAMILIES if f not in ("gemma2_odd_scale", "phi3_longrope")]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PRUNED = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
          "starcoder2": [*ATTENTION, "c_fc", "c_proj"],
          "qwen3_moe": ATTENTION, "mixtral": ATTENTION}     # experts are not nn.Linear in transformers 5
def _run(folder: Path, steps: list[dict]):
    from edgetailor.engine.job import JobSpec, run_job

    return run_job(JobSpec(recipe={"name": "family", "steps": steps}, source=str(folder), options={"threads": 2}))


def _awq_then_f16(folder: Path, grid: int):
    """imatrix (with X^T X), awq.scale and an F16 export run on the files: (the run, the AWQ step's report)."""
    record = _run(folder, [{"step": "imatrix", "params": {"hessians": True, "max_sequences": 4, "seq_len": 64}},
                           {"step": "awq.scale", "params": {"grid": grid}},
                           {"step": "export", "params": {"format": "gguf", "types": ["F16"]}}])
    assert record.manifest["status"] == "succeeded", record.manifest.get("error")
    return record, next(s["report"] for s in record.manifest["steps"] if s["name"] == "awq.scale")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_LIST)
def test_family_exports_exactly_tokenizes_alike_and_survives_a_transform(family, family_model):
    from edgetailor.engine.architectures import arch_spec
    from edgetailor.engine.runtimes import LlamaCppRuntime
    from edgetailor.engine.verification import tolerance_for
    from transformers import AutoTokenizer

    folder = family_model(family)
    onnx = bool(arch_spec(json.loads((folder / "config.json").read_text())["model_type"]).onnx)
    record = _run(folder, [
        {"step": "export", "params": {"format": "gguf", "types": ["F16"]}},            # the source read lazily
        *([{"step": "export", "params": {"format": "onnx", "types": ["fp32"]}}] if onnx else []),
        {"step": "prune.magnitude", "params": {"sparsity": 0.3, "modules": PRUNED.get(family, ATTENTION + [
            "gate_proj", "up_proj", "down_proj"])}},
        {"step": "export", "params": {"format": "gguf", "types": ["F16", "Q4_K_M"]}},  # the pruned model, saved
        {"step": "evaluate", "params": {"windows": 1, "ctx": 64}},
    ])
    m = record.manifest
    assert m["status"] == "succeeded", m.get("error")
    variants = {v["name"]: v for v in m["variants"]}
    for name in ("base-F16", "mag30-F16"):
        assert variants[name]["metrics"]["verify_kl"] < 1e-4, (name, variants[name]["metrics"])
        assert variants[name]["metrics"]["verify_top1"] >= 0.95
    q4 = variants["mag30-Q4_K_M"]["metrics"]
    assert q4["verify_kl"] <= tolerance_for("gguf", "Q4_K_M").max_kl and q4["perplexity"] > 1
    assert variants["mag30-F16"]["metrics"]["kl"] is not None          # evaluated against the untouched baseline
    step = next(s for s in m["steps"] if s["name"] == "prune.magnitude")
    assert 0.25 < step["report"]["sparsity"] < 0.35

    if onnx:
        assert variants["base-fp32"]["metrics"]["verify_kl"] < 1e-5
        _onnx_logits_match_torch(folder, record.folder / variants["base-fp32"]["path"])

    tok = AutoTokenizer.from_pretrained(folder)
    with LlamaCppRuntime(record.folder / variants["base-F16"]["path"], n_ctx=128, threads=1) as rt:
        for s in TEST_STRINGS:
            assert rt.tokenize(s) == tok(s, add_special_tokens=False)["input_ids"], (family, s)


def _onnx_logits_match_torch(folder: Path, onnx_folder: Path) -> None:
    import numpy as np
    import torch
    from edgetailor.engine.runtimes import open_runtime
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = list(range(3, 40))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    with open_runtime("onnx", onnx_folder, n_ctx=64, threads=1) as rt:
        got = rt.logits(ids)
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()


@pytest.mark.slow
def test_a_file_that_is_not_the_model_is_stopped_with_the_numbers(family_model):
    """Gemma 2 with a query scale llama.cpp does not read: the file loads, its logits are finite, and it is wrong."""
    folder = family_model("gemma2_odd_scale")
    record = _run(folder, [{"step": "export", "params": {"format": "gguf", "types": ["F16"]}}])
    m = record.manifest
    assert m["status"] == "failed"
    assert m["error"]["type"] == "WrongFileError" and "KL" in m["error"]["problem"] and "bound" in m["error"]["problem"]
    assert not m["variants"] and not list((record.folder / "artifacts").glob("*.gguf"))


def test_verification_bounds_grow_with_the_rounding():
    from edgetailor.engine.verification import tolerance_for

    order = ["F32", "F16", "Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"]
    kls = [tolerance_for("gguf", t).max_kl for t in order]
    assert kls == sorted(kls) and kls[1] <= 0.02 and tolerance_for("onnx", "fp32").max_kl == kls[0]
    assert tolerance_for("onnx", "int4").max_kl == tolerance_for("gguf", "Q4_0").max_kl


def test_top1_agreement_is_judged_on_the_positions_the_source_decides():
    """A 4-bit file of a random model (flat distributions: argmax flips with no real change) passes on its KL; a
    file that changes the source's decided choices fails, though its KL is within the bound."""
    import numpy as np
    from edgetailor.engine.errors import EdgeTailorError
    from edgetailor.engine.verification import compare, log_softmax, verify_against_source

    rng = np.random.default_rng(0)
    windows = [list(range(64)), list(range(64, 128))]

    class Runtime:
        def __init__(self, logits):
            self.rows = iter(logits)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def logits(self, ids):
            return next(self.rows)

    def check(ref_logits, file_logits):
        reference = [log_softmax(x) for x in ref_logits]
        return verify_against_source("onnx", "int4", None, reference, windows,
                                     open_runtime=lambda *a, **k: Runtime(file_logits))

    flat = [rng.normal(0, 0.3, (64, 1000)) for _ in windows]                 # no position decided
    noisy = [x + rng.normal(0, 0.5, x.shape) for x in flat]                  # KL ~0.1, argmax mostly flipped
    found = check(flat, noisy)
    assert found["passed"] and found["decided"] < 16 and found["top1"] < 0.3
    sharp = [x + 4 * np.eye(1000)[rng.integers(0, 1000, 64)] for x in flat]  # the source decides every position
    swapped = [x + 4 * np.eye(1000)[rng.integers(0, 1000, 64)] - 4 * (x - f > 2) for x, f in zip(sharp, flat)]
    found = compare([log_softmax(x) for x in sharp], Runtime(swapped), windows)
    assert 0.1 < found["kl"] < 1.0 and found["decided"] == 128 and found["top1_decided"] < 0.3
    with pytest.raises(EdgeTailorError, match="top-1"):
        check(sharp, swapped)


def _fake_model(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _cli(*args, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetailor.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=300)


def test_unsupported_family_has_its_own_exit_code_and_names_what_is_supported(tmp_path):
    folder = _fake_model(tmp_path / "m", {"model_type": "rwkv7", "architectures": ["Rwkv7ForCausalLM"],
                                          "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100})
    r = _cli("inspect", str(folder), home=tmp_path / "home")
    assert r.returncode == 4, r.stderr + r.stdout
    assert "not supported yet: 'rwkv7'" in r.stdout and "gemma3_text" in r.stdout and "Free memory" not in r.stdout
    assert "Traceback" not in r.stderr


def test_a_technique_that_does_not_apply_is_refused_before_the_model_loads(tmp_path, family_model):
    """Exit heads, and width pruning of attention heads, are not verified on Gemma 2: the run stops at
    pre-flight, with the reason (its MLP channels may go)."""
    for step, params, words in (("early_exit.heads", {}, "not for gemma2 yet"),
                                ("prune.width", {"heads_keep": 0.5}, "attention heads and hidden channels is not for gemma2")):
        r = _cli("compress", str(family_model("gemma2")), "--recipe", str(_recipe(tmp_path, step, params)),
                 home=tmp_path / "home")
        assert r.returncode == 4, r.stderr
        assert step in r.stderr and words in r.stderr and "Traceback" not in r.stderr
        assert "Loading" not in r.stderr
    from edgetailor.engine.steps.prune.structured import WidthPruneConfig, width_axes_problem

    heads, mlp = WidthPruneConfig(heads_keep=0.5), WidthPruneConfig(mlp_keep=0.5)
    assert width_axes_problem("llama", heads) == width_axes_problem("gemma2", mlp) == "" != width_axes_problem("phi3", heads)


def _recipe(tmp_path: Path, step: str, params: dict | None = None) -> Path:
    p = tmp_path / "recipe.json"
    p.write_text(json.dumps({"name": "r", "steps": [{"step": step, "params": params or {}}, {"step": "export"}]}))
    return p


def test_preflight_lists_family_features_techniques_and_the_sliding_window_caveat(tmp_path):
    from edgetailor.engine import preflight, resolve

    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 100, "max_position_embeddings": 8192}
    moe = resolve(str(_fake_model(tmp_path / "moe", {**base, "model_type": "qwen3_moe", "num_experts": 4})))
    rep = preflight(moe)
    assert rep.supported and rep.exporters["gguf"] == "yes" and rep.exporters["onnx"].startswith("not for qwen3_moe")
    assert rep.techniques["prune.magnitude"] == rep.techniques["prune.width"] == rep.techniques["awq.scale"] == "yes"
    assert "expert" in rep.techniques["lowrank.svd"]
    assert any("experts" in f for f in rep.features)
    sw = resolve(str(_fake_model(tmp_path / "sc", {**base, "model_type": "starcoder2", "sliding_window": 4096})))
    assert any("sliding window of 4096" in w for w in preflight(sw).warnings)


@pytest.mark.slow
def test_biased_llama_onnx_matches_torch(family_model):
    """The own ONNX graph carries attention and MLP biases (the GGUF side goes through llama.cpp's converter)."""
    folder = family_model("llama_bias")
    record = _run(folder, [{"step": "export", "params": {"format": "onnx", "types": ["fp32"]}}])
    assert record.manifest["status"] == "succeeded", record.manifest.get("error")
    variant = record.manifest["variants"][0]
    assert variant["metrics"]["verify_kl"] < 1e-5
    _onnx_logits_match_torch(folder, record.folder / variant["path"])


@pytest.mark.slow
def test_a_local_global_family_is_benchmarked_and_projected(family_model):
    """Gemma 3 (per-layer local/global attention): the benchmark's one-layer probes keep the config valid."""
    record = _run(family_model("gemma3_text"), [
        {"step": "export", "params": {"format": "gguf", "types": ["Q8_0"]}},
        {"step": "benchmark", "params": {"prompt_tokens": 24, "gen_tokens": 8, "repeats": 2, "n_ctx": 64,
                                         "baseline": False}}])
    assert record.manifest["status"] == "succeeded", record.manifest.get("error")
    m = record.variant("base-Q8_0")["metrics"]
    assert m["decode_tps"] > 0 and m["predicted_memory_bytes"] > 0 and m["projected_decode_tps"] > 0


def test_biased_llama_refuses_the_steps_of_the_own_writer_before_loading(tmp_path):
    from edgetailor.engine import preflight, resolve

    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 100, "attention_bias": True}
    rep = preflight(resolve(str(_fake_model(tmp_path / "b", cfg))))
    assert rep.techniques["prune.width"] == "yes" and "biases" in rep.techniques["quant.gguf_calibrated"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["granite", "smollm3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "starcoder2",
                                    "stablelm"])
def test_granite_smollm3_gemma3_and_phi3_take_calibrated_blocks_from_the_own_writer(family, family_model):
    """Granite (its multipliers as llama.cpp's keys), SmolLM3 (every 4th block without rotary), Gemma 3 (norms
    shifted by one, QK norms, local/global blocks) and Phi-3 (fused QKV and gate-up, partial rotary) are written
    by EdgeTailor's own GGUF writer: tensor by tensor from the files, no converter and no intermediate file, so
    the calibrated quantizer's blocks go in, and the file computes what the model computes."""
    import gguf
    from edgetailor.engine.verification import tolerance_for

    folder = family_model(family)
    record = _run(folder, [
        {"step": "export", "params": {"format": "gguf", "types": ["F16"]}},
        {"step": "quant.gguf_calibrated", "params": {"types": ["Q4_K_M"], "mix": "measured", "max_sequences": 4,
                                                      "seq_len": 64}}])
    m = record.manifest
    assert m["status"] == "succeeded", m.get("error")
    f16, q4 = m["variants"]
    assert f16["metrics"]["verify_kl"] < 1e-4 and f16["metrics"]["verify_top1"] >= 0.95
    assert "converter" not in json.dumps(f16["params"]) and "intermediate" not in json.dumps(f16["params"])
    assert q4["metrics"]["verify_kl"] <= tolerance_for("gguf", "Q4_K_M").max_kl    # checked, as every file
    reader = gguf.GGUFReader(record.folder / q4["path"])
    assert reader.fields["general.architecture"].contents() == {"gemma3_text": "gemma3"}.get(family, family)
    if family == "granite":
        keys = {k for k in reader.fields if k.startswith("granite.")}
        assert {"granite.embedding_scale", "granite.residual_scale", "granite.attention.scale",
                "granite.logit_scale"} <= keys


OWN_WRITER_FAMILIES = ["granite", "smollm3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "starcoder2", "stablelm"]
#: each family's names for its blocks' linear layers (Phi-3 fuses q/k/v and gate/up; StarCoder2's MLP is c_fc/c_proj)
LINEAR_NAMES = {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, "starcoder2": {*ATTENTION, "c_fc", "c_proj"}}


@pytest.mark.parametrize("family", OWN_WRITER_FAMILIES)
def test_blocks_are_removed_factored_clustered_and_trained_on_every_own_writer_family(family, family_model):
    """A block removed and the linear layers factored and clustered (the source read lazily, one block at a time),
    then LoRA adapters on every linear layer whatever the family calls it and a distillation (trained): each does
    what its report says on the family's own layers, and the file of the result computes what the model computes."""
    from edgetailor.engine.steps.lowrank import LINEAR_NAMES as FACTORABLE

    folder = family_model(family)
    config = json.loads((folder / "config.json").read_text())
    record = _run(folder, [
        {"step": "prune.depth", "params": {"blocks": 1, "calibration_sequences": 4, "seq_len": 64}},
        {"step": "lowrank.svd", "params": {"keep": 0.5, "factored": False, "calibration_sequences": 4,
                                           "calibration_length": 64}},
        {"step": "cluster.kmeans", "params": {"clusters": 16, "write_palette": False}},
        {"step": "finetune.lora", "params": {"steps": 2, "max_minutes": 0, "seq_len": 64, "rank": 4}},
        {"step": "distill", "params": {"steps": 2, "max_minutes": 0, "seq_len": 64}},
        {"step": "export", "params": {"format": "gguf", "types": ["F16"]}},
    ])
    m = record.manifest
    assert m["status"] == "succeeded", m.get("error")
    report = {s["name"]: s.get("report", {}) for s in m["steps"]}
    assert report["prune.depth"]["num_hidden_layers"] == config["num_hidden_layers"] - 1
    names = LINEAR_NAMES.get(family, {*ATTENTION, "gate_proj", "up_proj", "down_proj"})
    factored = {n.rsplit(".", 1)[-1] for n in report["lowrank.svd"]["ranks"]}
    assert factored == names & set(FACTORABLE) and report["lowrank.svd"]["linear_params_after"] < \
        report["lowrank.svd"]["linear_params_before"]
    assert report["cluster.kmeans"]["max_distinct_values"] <= 16
    assert report["finetune.lora"]["steps"] == report["distill"]["steps"] == 2
    assert set(report["finetune.lora"]["target_modules"]) == names          # every linear layer, as the family names it
    (v,) = m["variants"]
    assert v["metrics"]["verify_kl"] < 1e-4 and v["metrics"]["verify_top1"] >= 0.95, v["metrics"]


@pytest.mark.parametrize("family", OWN_WRITER_FAMILIES)
def test_a_tied_block_computes_in_its_own_place(family, family_model):
    """Layer sharing: the last block tied to the one before it computes what a model whose last block holds a copy of
    the weights before it computes - in its own place: SmolLM3's rotary-free last block stays rotary-free (before,
    the twin took its source's rotary), Gemma 3's global one keeps its mask and rotary; the selection runs each block
    with the arguments the model gives the next (before, its hand-built Llama rotary failed on Gemma 3)."""
    import torch
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.steps.share import substitution_errors, tie

    src = resolve_folder(family_model(family))
    model, copied = load_model(src).model, load_model(src).model
    n = model.config.num_hidden_layers
    with torch.no_grad():
        for mine, theirs in zip(copied.model.layers[n - 1].parameters(), copied.model.layers[n - 2].parameters()):
            mine.copy_(theirs)
    before = sum(p.numel() for p in model.parameters())
    tie(model, n - 2)
    assert sum(p.numel() for p in model.parameters()) < before
    ids = torch.arange(3, 67)[None, :]
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, copied(ids).logits, atol=1e-5)
    errors = substitution_errors(load_model(src).model, ids)
    assert len(errors) == n - 1 and all(e > 0 for e in errors)


@pytest.mark.parametrize("family", ["gemma3_text", "smollm3", "phi3"])
def test_layer_sharing_runs_and_exports_on_the_families(family, family_model):
    record = _run(family_model(family), [
        {"step": "share.layers", "params": {"pairs": 1, "heal_steps": 2, "calibration_sequences": 8,
                                            "calibration_length": 64}},
        {"step": "export", "params": {"format": "gguf", "types": ["F16"]}}])
    m = record.manifest
    assert m["status"] == "succeeded", m.get("error")
    report = {s["name"]: s.get("report", {}) for s in m["steps"]}["share.layers"]
    assert report["parameters_after"] < report["parameters_before"]
    (v,) = m["variants"]
    assert v["metrics"]["verify_kl"] < 1e-4 and v["metrics"]["verify_top1"] >= 0.95, v["metrics"]


@pytest.mark.parametrize("family", OWN_WRITER_FAMILIES + ["qwen3_moe", "mixtral"])
def test_a_model_without_blocks_computes_what_the_model_skipping_them_computes(family, family_model):
    """Read lazily without block 1, or rebuilt without it in memory: the logits of the source with that block passing
    its input through (per-block lists such as Gemma 3's local/global layers or SmolLM3's rotary-free blocks carried
    along)."""
    import torch
    from edgetailor.engine.calibration import final_logprobs, skipping_block
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve
    from edgetailor.engine.steps.prune.structured import remove_blocks

    folder = family_model(family)
    model = load_model(resolve(str(folder))).model
    ids = torch.arange(3, 67).reshape(2, 32)
    with skipping_block(model, 1), torch.no_grad():
        want = torch.log_softmax(model(input_ids=ids).logits.float(), -1).reshape(-1, model.config.vocab_size)
    lazy = final_logprobs(LazyModel(folder).without_blocks([1]), ids)
    with torch.no_grad():
        rebuilt = torch.log_softmax(remove_blocks(model, [1])(input_ids=ids).logits.float(), -1).reshape(lazy.shape)
    assert (lazy - want).abs().max() < 1e-4 and (rebuilt - want).abs().max() < 1e-4


@pytest.mark.parametrize("family", OWN_WRITER_FAMILIES)
def test_awq_scales_fold_where_each_familys_inputs_are_made_and_keep_the_function(family, family_model):
    """Any positive scales folded into every group of every block (Gemma's 1 + w norms and its MLP's own pre-norm,
    Phi-3's fused layers and the up half of gate_up, LayerNorm biases, OLMo 2's up -> down only): the model
    computes what it computed; then the step itself, after imatrix, writes a file that computes the scaled model."""
    import torch
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve
    from edgetailor.engine.steps.awq import awq_groups, fold_scales, norm_shift

    folder = family_model(family)
    model = load_model(resolve(str(folder))).model
    ids = torch.arange(3, 67).reshape(2, 32)
    groups = awq_groups(model.config)
    assert groups and ("attn_in" in groups) == (family != "olmo2")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        gen = torch.Generator().manual_seed(0)
        for layer in model.model.layers:
            for group in groups.values():
                width = layer.get_submodule(group.linears[0]).in_features
                fold_scales(layer, group, torch.exp(0.5 * torch.randn(width, generator=gen)), norm_shift(model.config))
        got = model(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max(), (got - want).abs().max()
    record, report = _awq_then_f16(folder, grid=4)
    m = record.manifest
    assert report["groups"] == len(groups) * json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert m["variants"][0]["metrics"]["verify_kl"] < 1e-4


@pytest.mark.parametrize("family", OWN_WRITER_FAMILIES)
def test_cut_mlp_channels_are_the_channels_zeroed_on_every_own_writer_family(family, family_model):
    """Width pruning of MLP channels, whatever the family's MLP (gate/up/down, Phi-3's fused gate_up, StarCoder2's
    c_fc/c_proj): the smaller model computes what the source computes with those channels' down-projection
    columns zeroed; as a step on the lazily read files, its file computes the smaller model."""
    import copy

    import torch
    from edgetailor.engine.calibration import linear_input_stats
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve
    from edgetailor.engine.steps.prune.structured import WidthPruneConfig, apply_slices, mlp_layout, width_slices

    folder = family_model(family)
    model = load_model(resolve(str(folder))).model
    ids = torch.arange(3, 67).reshape(2, 32)
    reads = mlp_layout(model.config).reads
    stats = linear_input_stats(model, ids, lambda n: n.endswith(reads.rsplit(".", 1)[-1]))
    slices, changes = width_slices(model, stats, WidthPruneConfig(mlp_keep=0.5, round_to=0))
    inter = model.config.intermediate_size
    assert changes == {"intermediate_size": inter // 2}
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(zeroed.model.layers):
            (_, kept), = slices[f"model.layers.{i}.{reads}.weight"]
            gone = torch.ones(inter, dtype=torch.bool)
            gone[kept] = False
            layer.get_submodule(reads).weight[:, gone] = 0
        want, got = zeroed(input_ids=ids).logits, apply_slices(model, slices, changes)(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    record = _run(folder, [{"step": "prune.width", "params": {"mlp_keep": 0.5, "round_to": 0, "calibration_sequences": 4,
                                                              "seq_len": 64}},
                           {"step": "export", "params": {"format": "gguf", "types": ["F16"]}}])
    m = record.manifest
    assert m["status"] == "succeeded", m.get("error")
    assert next(s["report"] for s in m["steps"] if s["name"] == "prune.width")["intermediate_size"] == inter // 2
    assert m["variants"][0]["metrics"]["verify_kl"] < 1e-4


def test_the_planner_and_calibrated_steps_apply_to_the_own_writers_families_only(tmp_path):
    from edgetailor.engine import preflight, resolve

    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "vocab_size": 100, "max_position_embeddings": 8192}
    for family in ("granite", "smollm3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "starcoder2", "stablelm"):
        rep = preflight(resolve(str(_fake_model(tmp_path / family, {**base, "model_type": family}))))
        assert all(rep.techniques[s] == "yes" for s in ("fit", "quant.gguf_calibrated", "imatrix", "prune.depth",
                                                        "lowrank.svd", "cluster.kmeans", "distill", "finetune.lora",
                                                        "awq.scale", "prune.width", "share.layers"))
        assert rep.techniques["early_exit.heads"].startswith(f"not for {family} yet"), rep.techniques
    moe = preflight(resolve(str(_fake_model(tmp_path / "m", {**base, "model_type": "mixtral", "num_local_experts": 4}))))
    assert moe.techniques["imatrix"] == moe.techniques["quant.gguf_calibrated"] == moe.techniques["fit"] == "yes"
    assert moe.techniques["prune.depth"] == moe.techniques["prune.width"] == moe.techniques["awq.scale"] == "yes"
    assert moe.techniques["lowrank.svd"].startswith("not for mixtral yet: this step does not handle its expert layers")


def test_a_smollm3_whose_rotary_free_blocks_llama_cpp_cannot_place_is_refused_with_the_reason(family_model, tmp_path):
    """llama.cpp's SmolLM3 graph leaves rotary out of every 4th block: a model with them elsewhere (a depth-pruned
    one, say) would load and compute something else, so no GGUF file is written."""
    from edgetailor.exporters.gguf import write_gguf
    from edgetailor.engine.errors import EdgeTailorError
    from edgetailor.engine.modeling import load_model

    lm = load_model(resolve_folder(family_model("smollm3")))
    lm.model.config.no_rope_layers = [1, 0, 1, 1]
    with pytest.raises(EdgeTailorError) as err:
        write_gguf(lm.model, lm.tokenizer, family_model("smollm3"), tmp_path / "x.gguf", "F16")
    assert "[1]" in err.value.problem and "every 4th block" in err.value.problem
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("change, words", [({"mlp_only_layers": [2]}, "dense"), ({"decoder_sparse_step": 2}, "dense"),
                                           ({"norm_topk_prob": False}, "not normalised")])
def test_a_qwen3_moe_llama_cpps_graph_would_compute_otherwise_is_refused_with_the_reason(change, words, family_model,
                                                                                          tmp_path):
    """llama.cpp's Qwen3-MoE graph makes every block experts and normalises the router's top-k weights: a model with
    dense blocks or raw top-k weights would load and compute something else, so no file is written."""
    from edgetailor.engine.errors import EdgeTailorError
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_model
    from edgetailor.exporters.gguf import write_gguf

    folder = family_model("qwen3_moe")
    lazy = LazyModel(folder)
    for key, value in change.items():
        setattr(lazy.config, key, value)
    with pytest.raises(EdgeTailorError) as err:
        write_gguf(lazy, load_model(resolve_folder(folder)).tokenizer, folder, tmp_path / "x.gguf", "F16")
    assert words in err.value.problem and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_importance_matrix_holds_each_experts_own_tokens(family, family_model, tmp_path):
    """llama.cpp's imatrix for ``ffn_*_exps``: per expert the sums of x^2 of the tokens the router sent it, and its
    own count. Checked against the loaded model's own router on a full forward; walked lazily from the files."""
    import gguf
    import numpy as np
    import torch
    from edgetailor.engine.imatrix import collect, save_llama_imatrix
    from edgetailor.engine.lazy import LazyModel
    from transformers import AutoModelForCausalLM

    folder = family_model(family)
    lazy = LazyModel(folder)
    seqs = torch.randint(3, 500, (3, 24), generator=torch.Generator().manual_seed(0))
    save_llama_imatrix(collect(lazy, seqs, hessians=False), lazy, tmp_path / "imatrix.gguf")
    saved = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "imatrix.gguf").tensors}

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    layer, seen = model.model.layers[1], {}
    handle = layer.mlp.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(seqs)
        chosen = layer.mlp.gate(seen["x"])[2]
    handle.remove()
    experts, k = chosen.max().item() + 1, chosen.shape[1]
    want = np.stack([(seen["x"][(chosen == e).any(-1)].double() ** 2).sum(0).numpy() for e in range(experts)])
    for part in ("gate", "up"):
        np.testing.assert_allclose(saved[f"blk.1.ffn_{part}_exps.weight.in_sum2"][:experts], want, rtol=1e-4)
    counts = saved["blk.1.ffn_down_exps.weight.counts"]           # [experts, 1], as llama-imatrix writes it
    assert counts.shape == (saved["blk.1.ffn_down_exps.weight.in_sum2"].shape[0], 1) and counts.sum() == seqs.numel() * k
    assert saved["blk.1.ffn_down_exps.weight.in_sum2"].shape[1] == model.config.to_dict().get(
        "moe_intermediate_size", model.config.intermediate_size)
    assert "blk.1.attn_q.weight.in_sum2" in saved        # (the router, which llama.cpp keeps in F32, has none)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_takes_calibrated_expert_blocks_weighted_by_each_experts_tokens(family, family_model):
    """Calibrated Q4_K_M (llama.cpp's types) from the files: every expert's matrix encoded by EdgeTailor, weighted
    by the tokens the router sent it (not llama.cpp's unweighted encoding); the file checked against the model."""
    import gguf
    import numpy as np
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.verification import tolerance_for
    from edgetailor.exporters.ggml_quant import encoded_experts

    folder = family_model(family)
    record = _run(folder, [{"step": "quant.gguf_calibrated", "params": {"types": ["Q4_K_M"], "max_sequences": 4,
                                                                         "seq_len": 64}}])
    m = record.manifest
    assert m["status"] == "succeeded", m.get("error")
    variant = m["variants"][-1]
    assert variant["metrics"]["verify_kl"] <= tolerance_for("gguf", "Q4_K_M").max_kl
    reader = gguf.GGUFReader(record.folder / variant["path"])
    ours = {t.name: np.asarray(t.data) for t in reader.tensors if "_exps." in t.name}
    types = {t.name: t.tensor_type.name for t in reader.tensors if "_exps." in t.name}
    plain = encoded_experts(LazyModel(folder), types, 1)
    assert len(ours) == 3 * 4 and ours.keys() == plain.keys()
    assert all(ours[n].shape == plain[n].shape for n in ours)
    assert sum(not np.array_equal(ours[n], plain[n].load()) for n in ours) >= len(ours) - 1   # weighted blocks


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_measured_mix_prices_each_expert_by_its_own_tokens(family, family_model):
    """A measured mix on a mixture of experts: the sensitivity pass runs the experts as transformers does (same
    output) and records each expert's inputs over its own tokens and the loss's gradient at its outputs; a stacked
    experts tensor costs its experts' sum (an expert the text never chose, nothing); the router stays F32; a file of
    a size target is written, within 2% of it, and checked against the model."""
    import gguf
    import torch
    from edgetailor.engine.calibration import token_sequences
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_model, load_tokenizer
    from edgetailor.engine.sensitivity import measure_sensitivity, recording_experts
    from edgetailor.engine.text import read_text
    from edgetailor.engine.walker import is_experts
    from edgetailor.exporters.gguf_calibrated import expert_sources, tensor_sources
    from edgetailor.exporters.gguf_plan import price_experts, price_types
    from edgetailor.engine.verification import tolerance_for

    folder = family_model(family)
    src = resolve_folder(folder)
    experts = next(m for m in load_model(src).model.modules() if is_experts(m))
    h, idx = torch.randn(40, experts.gate_up_proj.shape[2]), torch.randint(0, experts.gate_up_proj.shape[0], (40, 2))
    w, seen = torch.rand(40, 2), []
    assert torch.equal(recording_experts(experts, lambda *a: seen.append(a[0]))(h, idx, w), experts(h, idx, w))
    assert "0.down_proj" in seen
    model = LazyModel(folder)
    sens = measure_sensitivity(model, token_sequences(load_tokenizer(src), read_text(None), 64, 4))
    found = expert_sources(model)
    assert len(found) == 3 * model.config.num_hidden_layers
    prices = price_types(tensor_sources(model), sens, experts=found)
    name = next(n for n in found if n.startswith("blk.0.ffn_down"))
    src0 = found[name]
    shares = [sens.output_grad_sq.get(src0.key(e), torch.zeros(1)).sum().item() * sens.input_sq.get(src0.key(e), torch.zeros(1)).sum().item()
              for e in range(src0.shape[0])]
    assert sum(s > 0 for s in shares) >= 2 and all(c > 0 for _, _, c in prices.every[name] if _ != "Q8_0")
    busiest = max(range(len(shares)), key=shares.__getitem__)
    del sens.input_sq[src0.key(busiest)]                       # as if the text had never chosen it
    without = price_experts({name: src0}, sens, 64)[name]
    assert all(w[2] < o[2] for w, o in zip(without, prices.every[name]))
    assert all(o == [("F32", o[0][1], 0.0)] for n, o in prices.every.items() if "ffn_gate_inp" in n)
    # MB, between the smallest and the largest file of these types (the BPE vocabulary at width 64: no k-quants)
    target = {"qwen3_moe": 6.0, "mixtral": 0.45}[family]
    record = _run(folder, [{"step": "quant.gguf_calibrated", "params": {"target_mb": target, "max_sequences": 4,
                                                                         "seq_len": 64}}])
    m = record.manifest
    assert m["status"] == "succeeded", m.get("error")
    variant = m["variants"][-1]
    assert variant["metrics"]["verify_kl"] <= tolerance_for("gguf", "Q2_K").max_kl, variant["metrics"]
    path = record.folder / variant["path"]
    assert abs(path.stat().st_size / (target * 1e6) - 1) < 0.02, path.stat().st_size
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if "_exps." in t.name}
    assert kinds and kinds <= {"Q2_K", "Q3_K", "IQ4_NL", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"}


def test_the_planner_fits_a_mixture_of_experts_and_predicts_what_a_token_reads(family_model, tmp_path):
    """`fit` on a Qwen3-MoE: its files planned with each expert tensor priced, built with calibrated expert blocks,
    checked and recommended; the planner's picture of a file is what llama.cpp's file holds, a token reading k of E
    experts (resident: all of them), as ``gguf_info`` reads it from the file."""
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.planner import Predictor
    from edgetailor.engine.projection import gguf_info
    from edgetailor.exporters.gguf_calibrated import expert_sources, tensor_sources
    from edgetailor.exporters.gguf_plan import price_types
    from types import SimpleNamespace

    import gguf

    folder = family_model("qwen3_moe")
    fit = {"context": 256, "kv_types": ["f16"], "candidates": 1, "rounds": 1, "trials": 16, "max_sequences": 4,
           "seq_len": 128, "prompt_tokens": 32, "gen_tokens": 8, "repeats": 1, "decode_model": False}
    record = _run(folder, [{"step": "fit", "params": fit}])
    m = record.manifest
    assert m["status"] == "succeeded", m.get("error")
    plan = json.loads((record.artifacts_dir / "plan.json").read_text())
    assert plan["recommendation"]["variant"] and {0, 1} <= {p["drop_blocks"] for p in plan["rounds"][0]["points"]}
    built = next(v for v in m["variants"] if v["name"] == plan["recommendation"]["variant"])
    path = record.folder / built["path"]
    model = LazyModel(folder)
    dense, experts = tensor_sources(model), expert_sources(model)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors
             if t.name in dense or t.name in experts}
    prices = price_types(dense, SimpleNamespace(output_grad_sq={}, input_sq={}), experts=experts)
    norms = sum(t.n_bytes for t in gguf.GGUFReader(path).tensors if t.name not in types)     # what gguf_info adds
    planner = Predictor(prices, {**dense, **experts}, model.config, norms, 1, None, None, 256, 1, None)
    mine, file = planner.weights_info(types), gguf_info(path, 1)
    assert mine.bytes_per_token == pytest.approx(file.bytes_per_token, rel=0.01)
    assert mine.matmul_params == pytest.approx(file.matmul_params, rel=0.01)
    exps = sum(t.n_bytes for t in gguf.GGUFReader(path).tensors if "_exps." in t.name)
    k_of_e = model.config.num_experts_per_tok / model.config.num_experts
    assert file.resident_bytes - file.repacked_bytes - file.bytes_per_token == pytest.approx((1 - k_of_e) * exps, rel=0.02)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_loses_its_least_influential_block_and_its_calibrated_file_is_checked(family, family_model):
    """``prune.depth`` on a mixture of experts (read lazily, one block at a time): the block goes with its router
    and experts, the rest keep theirs, and the calibrated file of what is left (expert blocks weighted by their own
    tokens) computes what the pruned model computes."""
    import gguf
    from edgetailor.engine.verification import tolerance_for

    folder = family_model(family)
    config = json.loads((folder / "config.json").read_text())
    record = _run(folder, [
        {"step": "prune.depth", "params": {"blocks": 1, "calibration_sequences": 4, "seq_len": 64}},
        {"step": "quant.gguf_calibrated", "params": {"types": ["Q4_K_M"], "seq_len": 64, "max_sequences": 4}},
    ])
    m = record.manifest
    assert m["status"] == "succeeded", m.get("error")
    report = {s["name"]: s.get("report", {}) for s in m["steps"]}
    assert report["prune.depth"]["num_hidden_layers"] == config["num_hidden_layers"] - 1
    (v,) = m["variants"][-1:]
    tensors = gguf.GGUFReader(record.folder / v["path"]).tensors
    blocks = {int(t.name.split(".")[1]) for t in tensors if t.name.startswith("blk.")}
    assert blocks == set(range(config["num_hidden_layers"] - 1))
    assert {int(t.name.split(".")[1]) for t in tensors if "_exps." in t.name} == blocks
    assert v["metrics"]["verify_kl"] <= tolerance_for("gguf", "Q4_K_M").max_kl, v["metrics"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_config_counts_its_experts_parameters(family, family_model):
    """What the pruning steps report as parameters before and after: a mixture of experts counted with every
    expert and its router, as the model holds them."""
    from edgetailor.engine.architectures import count_parameters
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve

    folder = family_model(family)
    model = load_model(resolve(str(folder))).model
    embedding = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    held = sum(p.numel() for p in model.parameters() if id(p) not in embedding)
    assert count_parameters(json.loads((folder / "config.json").read_text()))["non_embedding"] == held


def test_a_phi_vocabulary_without_phi3s_special_tokens_loads_from_a_folder_named_phi3(family_model, tmp_path):
    """llama.cpp looks up Phi-3's special tokens when ``general.name`` says phi3 and fails to load a vocabulary without
    them (Phi-4-mini's, the demo's): the name is written without "phi3" then, and the file loads."""
    import shutil

    import gguf
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.runtimes import LlamaCppRuntime
    from edgetailor.exporters.gguf import write_gguf

    folder = shutil.copytree(family_model("phi3"), tmp_path / "phi3-mini-custom")
    write_gguf(LazyModel(folder), load_model(resolve_folder(folder)).tokenizer, folder, tmp_path / "p.gguf", "F16")
    assert gguf.GGUFReader(tmp_path / "p.gguf").fields["general.name"].contents() == "phi-mini-custom"
    with LlamaCppRuntime(tmp_path / "p.gguf", n_ctx=64, threads=1) as rt:
        assert rt.logits(list(range(3, 12))).shape[0] == 9


def resolve_folder(folder: Path):
    from edgetailor.engine import resolve

    return resolve(str(folder))


def test_a_gemma3_without_some_blocks_keeps_its_own_local_and_global_blocks_in_the_file(family_model, tmp_path):
    """The own writer states each block's kind (llama.cpp's default is every 6th global): with its first block
    removed, the tiny Gemma 3's global block is the 5th of 5, and the file computes what the pruned model does
    past the sliding window."""
    import numpy as np
    import torch
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.runtimes import LlamaCppRuntime
    from edgetailor.engine.steps.prune.structured import remove_blocks
    from edgetailor.exporters.gguf import write_gguf

    folder = family_model("gemma3_text")
    lm = load_model(resolve_folder(folder))
    lazy = LazyModel(folder).without_blocks([0])
    assert lazy.config.layer_types[-1] == "full_attention" and lazy.config.sliding_window < 48
    write_gguf(lazy, lm.tokenizer, folder, tmp_path / "p.gguf", "F32")
    pruned = remove_blocks(lm.model, [0]).eval()
    ids = list(range(3, 51))                                          # 48 tokens: three windows of 16
    with torch.no_grad():
        want = torch.log_softmax(pruned(torch.tensor([ids])).logits[0].float(), -1).numpy()
    with LlamaCppRuntime(tmp_path / "p.gguf", n_ctx=64, threads=2) as rt:
        got = rt.logits(ids)
    got = got - np.log(np.exp(got - got.max(-1, keepdims=True)).sum(-1, keepdims=True)) - got.max(-1, keepdims=True)
    kl = (np.exp(want) * (want - got)).sum(-1)
    # measured: KL ~1e-5 both sides of the window (llama.cpp's float32 Gemma 3 is 0.03 off in log-probs whole or
    # pruned); llama.cpp's default pattern (all five blocks local) gives 0.009 before position 16, 0.11 after it
    assert kl[:16].mean() < 1e-3 and kl[16:].mean() < 1e-3, (kl[:16].mean(), kl[16:].mean())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["granite", "smollm3", "gemma", "gemma2", "gemma3_text", "phi3", "phi3_longrope",
                                    "olmo2", "qwen3_moe", "mixtral", "starcoder2", "stablelm"])
def test_the_own_writer_writes_the_tensors_and_keys_llama_cpps_converter_writes(family, family_model, tmp_path):
    """Both writers on the same model in F32: every tensor the same, bit for bit (norm shifts and q/k row orders
    included), and every key the converter writes that llama.cpp reads for the family the same."""
    import gguf
    import numpy as np
    from edgetailor.engine.modeling import load_model
    from edgetailor.exporters.gguf import write_gguf
    from edgetailor.exporters.hf_converter import convert

    folder = family_model(family)
    lm = load_model(resolve_folder(folder))
    write_gguf(lm.model, lm.tokenizer, folder, tmp_path / "own.gguf", "F32")
    convert(folder, tmp_path / "conv.gguf", "F32")
    own, conv = gguf.GGUFReader(tmp_path / "own.gguf"), gguf.GGUFReader(tmp_path / "conv.gguf")
    theirs = {t.name: np.asarray(t.data) for t in conv.tensors}
    ours = {t.name: np.asarray(t.data) for t in own.tensors}
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[n], theirs[n]) for n in ours), [n for n in ours if not np.array_equal(ours[n], theirs[n])]
    arch = conv.fields["general.architecture"].contents()
    for key, field in conv.fields.items():
        if key.startswith(f"{arch}.") and key not in (f"{arch}.attention.key_length", f"{arch}.attention.value_length"):
            assert own.fields[key].contents() == pytest.approx(field.contents()), key


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_takes_awq_scales_that_keep_its_function(family, family_model):
    """AWQ on a mixture of experts: any positive scales folded into the experts' shared input (every expert's gate
    and up, the router's columns, the norm) and into each expert's down projection (its up rows) keep the function
    and the routing; the step on the files (imatrix, awq.scale) scales experts and writes a file that computes the
    scaled model, its stand-in error no higher than before."""
    import gguf
    import numpy as np
    import torch
    from edgetailor.engine.lazy import LazyModel
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve
    from edgetailor.engine.steps.awq import ExpertGroup, awq_groups, fold_expert_scales, fold_scales, norm_shift

    folder = family_model(family)
    model = load_model(resolve(str(folder))).model
    ids = torch.arange(3, 67).reshape(2, 32)
    groups = awq_groups(model.config)
    assert isinstance(groups["mlp_in"], ExpertGroup) and isinstance(groups["mlp_down"], ExpertGroup)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        gen = torch.Generator().manual_seed(0)
        for layer in model.model.layers:
            def scales(n):
                return torch.exp(0.5 * torch.randn(n, generator=gen))
            fold_scales(layer, groups["attn_in"], scales(model.config.hidden_size))
            fold_expert_scales(layer, groups["mlp_in"], scales(model.config.hidden_size), norm_shift(model.config))
            experts = layer.get_submodule(groups["mlp_down"].experts)
            for e in range(experts.down_proj.shape[0]):
                fold_expert_scales(layer, groups["mlp_down"], scales(experts.down_proj.shape[-1]), expert=e)
        got = model(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max(), (got - want).abs().max()
    record, report = _awq_then_f16(folder, grid=8)
    m = record.manifest
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert report["groups"] == 3 * layers and report["groups_scaled"] > 0, report
    assert report["stand_in_output_error_after"] <= report["stand_in_output_error_before"]
    assert m["variants"][0]["metrics"]["verify_kl"] < 1e-4
    written = {t.name: np.asarray(t.data, dtype=np.float32) for t in
               gguf.GGUFReader(record.folder / m["variants"][0]["path"]).tensors if "_exps." in t.name}
    source = LazyModel(folder).state_dict()
    changed = [i for i in range(layers) if not np.allclose(
        written[f"blk.{i}.ffn_down_exps.weight"].reshape(-1),
        source[f"model.layers.{i}.mlp.experts.down_proj"].load().float().numpy().reshape(-1), atol=1e-3)]
    assert changed, "the scaled experts did not reach the file"


@pytest.mark.parametrize("family", ["granite", "qwen3_moe"])
def test_preflight_counts_the_input_statistics_imatrix_keeps_dense_or_mixture_of_experts(family, family_model):
    """What ``imatrix`` with hessians holds (one X^T X per distinct linear-layer input; a mixture of experts' MLP
    none) is what pre-flight counts for it and for AWQ."""
    import torch
    from edgetailor.engine.footprint import ModelShape, hessians_bytes
    from edgetailor.engine.imatrix import collect
    from edgetailor.engine.lazy import LazyModel

    folder = family_model(family)
    stats = collect(LazyModel(folder), torch.arange(3, 131).reshape(2, 64), hessians=True)
    held = sum(t.numel() * t.element_size() for t in stats.xtx.values())
    shape = ModelShape.from_config(json.loads((folder / "config.json").read_text()), folder)
    assert held == hessians_bytes(shape) and (shape.experts > 0) == (family == "qwen3_moe")


def test_awq_on_experts_rescales_their_statistics_and_samples_the_rows_of_large_ones(family_model):
    """After AWQ on a loaded mixture of experts, the per-expert statistics it rescaled equal a fresh collection on
    the scaled model (a calibrated quantization that follows reads them); an expert matrix larger than
    ``EXPERT_ROWS`` is scored on evenly spaced rows, the error estimate near the full one."""
    import torch
    from edgetailor.engine import imatrix
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve
    from edgetailor.engine.steps.awq import EXPERT_ROWS, AwqConfig, apply_awq, output_error, sampled_rows

    model = load_model(resolve(str(family_model("qwen3_moe")))).model
    ids = torch.arange(3, 259).reshape(4, 64)
    stats = imatrix.collect(model, ids, hessians=True)
    records = apply_awq(model, stats, AwqConfig(grid=8))
    assert any(r["alpha"] > 0 for r in records if r["group"] != "attn_in")
    fresh = imatrix.collect(model, ids, hessians=True)
    experts = [k for k in fresh.sum_sq if ".experts." in k]
    assert experts and fresh.sum_sq.keys() == stats.sum_sq.keys()
    for k in experts:
        torch.testing.assert_close(stats.sum_sq[k], fresh.sum_sq[k], rtol=1e-3, atol=1e-6)

    gen = torch.Generator().manual_seed(0)
    w, h = torch.randn(8 * EXPERT_ROWS, 128, generator=gen), torch.rand(128, generator=gen) * 4
    s = torch.exp(0.3 * torch.randn(128, generator=gen))
    full, sampled = output_error([(w, h)], s, 4, 32), output_error([sampled_rows(w, h)], s, 4, 32)
    assert sampled_rows(w[:EXPERT_ROWS], h)[0].shape[0] == EXPERT_ROWS and abs(sampled / full - 1) < 0.1


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_loses_each_experts_weakest_channels(family, family_model):
    """Width pruning on a mixture of experts cuts each expert's MLP channels (its own strongest kept, on the tokens
    routed to it; as many for every expert, as llama.cpp's graph needs): the smaller model computes what the source
    computes with those channels' down-projection columns zeroed, the router untouched; as a step on the lazily read
    files, its file computes the smaller model."""
    import copy

    import torch
    from edgetailor.engine.modeling import load_model
    from edgetailor.engine.sources import resolve
    from edgetailor.engine.steps.prune.structured import (
        WidthPruneConfig,
        apply_slices,
        expert_channel_stats,
        expert_width,
        width_slices,
    )

    folder = family_model(family)
    model = load_model(resolve(str(folder))).model
    ids = torch.arange(3, 131).reshape(2, 64)
    width = expert_width(model)
    slices, changes = width_slices(model, expert_channel_stats(model, ids), WidthPruneConfig(mlp_keep=0.5, round_to=0))
    assert list(changes.values()) == [width // 2]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(zeroed.model.layers):
            (_, kept), = slices[f"model.layers.{i}.mlp.experts.down_proj"]
            assert kept.shape == (layer.mlp.experts.down_proj.shape[0], width // 2)
            assert len({tuple(k.tolist()) for k in kept}) > 1            # each expert its own channels
            gone = torch.ones(kept.shape[0], width, dtype=torch.bool)
            gone.scatter_(1, kept, False)
            layer.mlp.experts.down_proj[gone[:, None, :].expand_as(layer.mlp.experts.down_proj)] = 0
        want, got = zeroed(input_ids=ids).logits, apply_slices(model, slices, changes)(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    record = _run(folder, [{"step": "prune.width", "params": {"mlp_keep": 0.5, "round_to": 0, "calibration_sequences": 4,
                                                              "seq_len": 64}},
                           {"step": "export", "params": {"format": "gguf", "types": ["F16"]}}])
    m = record.manifest
    assert m["status"] == "succeeded", m.get("error")
    report = next(s["report"] for s in m["steps"] if s["name"] == "prune.width")
    assert list(changes)[0] in report and report[list(changes)[0]] == width // 2
    assert report["non_embedding_after"] < report["non_embedding_before"]
    assert m["variants"][0]["metrics"]["verify_kl"] < 1e-4
