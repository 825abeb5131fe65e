"""Transforms streamed block by block: a pruning step over the lazy source holds one decoder block at a time,
writes the blocks it changed to the run's scratch, and the next steps read the model from there. The result is
the one the loaded model gives, weight for weight and byte for byte in the exported file."""
from __future__ import annotations

import hashlib

import pytest
import torch
from edgetailor.engine.context import RunContext
from edgetailor.engine.sources import resolve
from test_pruning import make_ctx as pruning_ctx
from test_pruning import run_step


def make_ctx(tmp_path, source, name="t") -> RunContext:
    return pruning_ctx(tmp_path / name, source)


def gguf_sha(ctx, tmp_path, qtype: str) -> str:
    from edgetailor.exporters import get_exporter

    out = tmp_path / f"{ctx.record.id}-{qtype}.gguf"
    get_exporter("gguf").export(ctx.weights(), ctx.tokenizer, ctx.source.path, out, {"type": qtype, "threads": 2})
    return hashlib.sha256(out.read_bytes()).hexdigest()


IMATRIX = ("imatrix", {"hessians": True, "max_sequences": 4, "seq_len": 128})
STEPS = [[("prune.magnitude", {"sparsity": 0.5})], [("prune.magnitude", {"pattern": "2:4"})],
         [("prune.wanda", {"sparsity": 0.5, "calibration_sequences": 8, "seq_len": 128})],
         [IMATRIX, ("awq.scale", {"bits": 3})],
         [("prune.magnitude", {"sparsity": 0.3}), IMATRIX, ("awq.scale", {"bits": 4})],
         [("prune.depth", {"blocks": 2, "calibration_sequences": 4, "seq_len": 64})],
         [("prune.width", {"heads_keep": 0.5, "mlp_keep": 0.5, "hidden_keep": 0.75, "round_to": 8,
                           "calibration_sequences": 4, "seq_len": 64})],
         [("prune.magnitude", {"sparsity": 0.3}), ("prune.depth", {"blocks": 1, "calibration_sequences": 4,
                                                                   "seq_len": 64})],
         [("cluster.kmeans", {"clusters": 16})],
         [("prune.magnitude", {"sparsity": 0.3}), ("cluster.kmeans", {"clusters": 16, "activation_weighted": True,
                                                                      "calibration_sequences": 4,
                                                                      "calibration_length": 64})],
         [("lowrank.svd", {"keep": 0.6, "factored": False, "calibration_sequences": 4, "calibration_length": 64})],
         [("prune.magnitude", {"sparsity": 0.3}), ("lowrank.svd", {"mode": "energy", "keep": 0.9,
                                                                   "activation_aware": False, "factored": False})]]


@pytest.mark.parametrize("steps", STEPS, ids=["magnitude", "2_4", "wanda", "awq", "pruned-then-awq", "depth", "width",
                                              "pruned-then-depth", "kmeans", "pruned-then-weighted-kmeans", "lowrank",
                                              "pruned-then-lowrank-energy"])
def test_a_streamed_transform_equals_the_loaded_one_and_never_loads_the_model(tmp_path, stories_dir, steps):
    loaded = make_ctx(tmp_path, stories_dir, "loaded")
    loaded.loaded                                            # a step loaded it: the transform runs in memory
    want = [run_step(loaded, name, **params) for name, params in steps]
    streamed = make_ctx(tmp_path, stories_dir, "streamed")
    got = [run_step(streamed, name, **params) for name, params in steps]
    assert got == want and streamed.applied == loaded.applied
    view = streamed.weights()
    assert getattr(view, "is_lazy", False) and streamed._loaded is None          # never loaded whole
    assert view.config.to_dict() == loaded.model.config.to_dict()
    state = loaded.model.state_dict()
    assert set(view.state_dict()) == set(state)
    for n, t in view.state_dict().items():
        assert torch.equal(t.load().float(), state[n].float()), n
    for qtype in ("F32", "Q4_K_M"):                            # the same file from either
        assert gguf_sha(streamed, tmp_path, qtype) == gguf_sha(loaded, tmp_path, qtype), qtype
    palettes = list(loaded.record.artifacts_dir.glob("*palette*"))
    assert bool(palettes) == (steps[-1][0] == "cluster.kmeans")
    for artifact in palettes:               # byte for byte (safetensors' own writer orders its metadata at random)
        assert artifact.read_bytes() == (streamed.record.artifacts_dir / artifact.name).read_bytes(), artifact.name
    assert not list((streamed.record.folder / "scratch").rglob("*.partial"))
    read = {t.file.parent for t in view.state_dict().values()}
    for folder in (streamed.record.folder / "scratch" / "weights").glob("*"):
        assert folder in read, folder                          # superseded blocks gave their disk back
    again = streamed.model                                     # a later step that must hold it: the same model
    assert all(torch.equal(again.state_dict()[n], state[n]) for n in state)


def test_a_streamed_walk_holds_one_block_and_stores_pruned_bf16_weights_as_bf16(tmp_path, tiny_models):
    """Zeros keep a bf16 source exactly in bf16 (no fp32 copy on disk); the walk never holds two blocks."""
    from edgetailor.engine.walker import BlockWalk

    ctx = make_ctx(tmp_path, tiny_models["llama"])
    seen = []
    real = BlockWalk.__iter__

    def watched(walk):
        for block in real(walk):
            yield block
            seen.append(walk.peak_materialised_bytes)
    BlockWalk.__iter__ = watched
    try:
        run_step(ctx, "prune.magnitude", sparsity=0.25)
    finally:
        BlockWalk.__iter__ = real
    view = ctx.weights()
    one_block = sum(t.numel() * 4 for n, t in view.state_dict().items() if n.startswith("model.layers.0."))
    assert seen and max(seen) == one_block
    source_dtypes = {t.dtype for t in ctx.source_weights().state_dict().values()}
    stored = {view.state_dict()[n].dtype for n in view.changed}
    assert stored <= source_dtypes, (stored, source_dtypes)


def test_a_pruned_run_streams_end_to_end(tiny_models, monkeypatch):
    """Wanda, then Q8_0, then evaluation, with the source's reference in llama.cpp (as for a model too large for
    torch): the model is never loaded whole; the file is checked against the pruned model walked block by block."""
    import edgetailor.engine.reference as reference
    from edgetailor.engine.job import JobSpec, run_job

    monkeypatch.setattr(reference, "TORCH_REFERENCE_MAX_BYTES", 0)
    events = []
    recipe = {"name": "pruned", "steps": [
        {"step": "prune.wanda", "params": {"sparsity": 0.3, "calibration_sequences": 4, "seq_len": 128}},
        {"step": "export", "params": {"types": ["Q8_0"]}},
        {"step": "evaluate", "params": {"windows": 1, "ctx": 64}}]}
    rec = run_job(JobSpec(recipe=recipe, source=str(tiny_models["llama"]), options={"threads": 2}), emit=events.append)
    m = rec.manifest
    assert m["status"] == "succeeded", m.get("error")
    assert not any(e["type"] == "log" and str(e["data"].get("message", "")).startswith("Loading") for e in events)
    variant = rec.variant("wanda30-Q8_0")
    assert variant["metrics"]["verify_kl"] < 0.01 and variant["metrics"]["perplexity"] > 1
    assert variant["metrics"]["kl"] > 10 * variant["metrics"]["verify_kl"]   # pruning moved it from the source
    assert not (rec.folder / "scratch").exists()


def test_preflight_streams_a_pruning_recipe_of_an_8b_model_on_16_gb(tmp_path, monkeypatch):
    """RAM: one block at a time. Disk: the pruned blocks in bf16 (pruning keeps them exact), the Q4_K_M file (encoded
    as it is written: no intermediate file) and the BF16 reference GGUF; a disk with less free is refused, naming
    both figures."""
    from edgetailor.engine.preflight import preflight
    from edgetailor.engine.recipe import Recipe
    from test_streaming import _sparse_llama_8b, a_16_gb_machine

    free = a_16_gb_machine(monkeypatch)
    src = resolve(str(_sparse_llama_8b(tmp_path / "llama-8b")))
    recipe = Recipe.from_dict({"name": "x", "steps": [
        {"step": "prune.wanda", "params": {"pattern": "2:4"}}, {"step": "export", "params": {"types": ["Q4_K_M"]}}]})
    rep = preflight(src, recipe)
    assert rep.fits, rep.problems
    params = 8_030_261_248
    blocks_bf16, reference = (params - 2 * 128256 * 4096) * 2, params * 2
    q4_k_m = (4.5e9, 5.5e9)                                 # ~4.9 GB at 4.85 bits a weight
    fixed = blocks_bf16 + reference
    assert fixed + q4_k_m[0] < rep.disk_needed_bytes < fixed + q4_k_m[1]
    free["bytes"] = 30e9
    assert [p for p in preflight(src, recipe).problems if "of disk" in p] == \
        [f"needs about {rep.disk_needed_bytes / 1e9:.1f} GB of disk, 30.0 GB free"]
    wanda, export = rep.steps
    assert "one decoder block at a time" in wanda["how"] and wanda["ram_bytes"] < 4 * 1024**3
    assert "no fp32 copy" in export["how"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_is_pruned_streamed_and_exports_the_loaded_models_file(family, tmp_path, family_model):
    """The files keep one tensor per expert where transformers stacks them (``mlp.experts.gate_up_proj``): the lazy
    model reads them under the modules' names, so the transform walks block by block as for a dense model, pre-flight
    says so, and the file is the loaded model's, byte for byte."""
    from edgetailor.engine.preflight import preflight
    from edgetailor.engine.recipe import Recipe

    src = resolve(str(family_model(family)))
    prune, export = preflight(src, Recipe.from_dict({"name": "x", "steps": [
        {"step": "prune.magnitude"}, {"step": "export", "params": {"types": ["Q8_0"]}}]})).steps
    assert "one decoder block at a time" in prune["how"] and "holds the fp32 model" not in export["how"]
    modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
    streamed, loaded = make_ctx(tmp_path, src.path, "streamed"), make_ctx(tmp_path, src.path, "loaded")
    loaded.loaded
    want = run_step(loaded, "prune.magnitude", sparsity=0.3, modules=modules)
    assert run_step(streamed, "prune.magnitude", sparsity=0.3, modules=modules) == want
    assert 0.25 < want["sparsity"] < 0.35 and streamed._loaded is None
    assert gguf_sha(streamed, tmp_path, "Q8_0") == gguf_sha(loaded, tmp_path, "Q8_0")


@pytest.mark.parametrize("family", ["llama_bias"])
def test_a_streamed_transform_of_a_converter_family_exports_through_a_folder_saved_shard_by_shard(
        family, family_model, monkeypatch):
    """Models llama.cpp's converter writes (a Llama with attention and MLP biases, the last of them): the streamed
    model is saved as a folder from its lazy weights (the converter reads folders), then checked against the pruned
    model's own 16-bit file; the model never loads."""
    import json

    import edgetailor.engine.reference as reference
    from edgetailor.engine.architectures import gguf_writer_for
    from edgetailor.engine.job import JobSpec, run_job

    monkeypatch.setattr(reference, "TORCH_REFERENCE_MAX_BYTES", 0)
    events = []
    recipe = {"name": "pruned", "steps": [
        {"step": "prune.magnitude", "params": {"sparsity": 0.3, "modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        {"step": "export", "params": {"types": ["F16"]}}]}
    rec = run_job(JobSpec(recipe=recipe, source=str(family_model(family)), options={"threads": 2}),
                  emit=events.append)
    assert rec.manifest["status"] == "succeeded", rec.manifest.get("error")
    assert not any(e["type"] == "log" and str(e["data"].get("message", "")).startswith("Loading") for e in events)
    assert rec.variant("mag30-F16")["metrics"]["verify_kl"] < 1e-3
    assert gguf_writer_for(json.loads((family_model(family) / "config.json").read_text())) == "llama.cpp"


def test_preflight_streams_clustering_of_an_8b_model_and_holds_it_only_for_the_embeddings(tmp_path, monkeypatch):
    """k-means of the decoder blocks streams (one block and the float64 sort of its largest matrix); clustering
    the embeddings too holds the model, and pre-flight says which."""
    from edgetailor.engine.preflight import preflight
    from edgetailor.engine.recipe import Recipe
    from test_streaming import _sparse_llama_8b, a_16_gb_machine

    a_16_gb_machine(monkeypatch)
    src = resolve(str(_sparse_llama_8b(tmp_path / "llama-8b")))

    def cluster_step(**params):
        rep = preflight(src, Recipe.from_dict({"name": "x", "steps": [{"step": "cluster.kmeans", "params": params}]}))
        return rep, rep.steps[0]

    rep, step = cluster_step(activation_weighted=True)
    assert rep.fits and "one decoder block at a time" in step["how"], rep.problems
    assert step["parts"]["k-means of its largest matrix (float64)"] == 14336 * 4096 * 8 * 7
    rep, step = cluster_step(include_embeddings=True)
    assert not rep.fits and step["how"] == "holds the fp32 model"


def test_a_written_tensor_stays_in_its_narrow_dtype_only_when_every_slice_is_exact_there(monkeypatch):
    """The scratch keeps a changed tensor in its source's dtype when that holds it exactly, checked a slice at a
    time (no whole copy of a stacked experts tensor in each dtype): one inexact value in the last slice is found."""
    import torch
    from edgetailor.engine import lazy

    monkeypatch.setattr(lazy, "EXACT_CHUNK", 1000)
    t = torch.randn(3, 1500).to(torch.bfloat16).float()
    assert lazy._exact_in(t, torch.bfloat16)
    t[-1, -1] = 1.0 + 2 ** -20
    assert not lazy._exact_in(t, torch.bfloat16) and lazy._exact_in(t[:2], torch.bfloat16)
