"""Model sources and the safety rules around them."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from edgetailor.engine import EdgeTailorError, preflight, resolve
from edgetailor.engine.modeling import load_model


def test_hf_folder_resolves_and_loads(stories_dir):
    src = resolve(str(stories_dir))
    assert src.kind == "hf_folder" and src.model_type == "llama"
    lm = load_model(src)
    assert sum(p.numel() for p in lm.model.parameters()) == 260_032 - 0  # tied embeddings counted once


@pytest.mark.parametrize("spec, words", [
    ("/no/such/folder/model.gguf", "does not exist"),
    ("not a model at all", "not a folder"),
])
def test_bad_specs_say_what_is_wrong(spec, words):
    with pytest.raises(EdgeTailorError) as e:
        resolve(spec)
    assert words in str(e.value) and e.value.fix


def test_folder_without_config(tmp_path):
    with pytest.raises(EdgeTailorError, match="config.json"):
        resolve(str(tmp_path))


def test_hub_id_offline_fails_fast_with_a_clear_message():
    t = time.monotonic()
    with pytest.raises(EdgeTailorError) as e:
        resolve("SomeOrg/some-model-that-is-not-cached")
    assert time.monotonic() - t < 10
    assert "--online" in e.value.fix


def test_remote_code_is_off_by_default(stories_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(stories_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="custom-arch", auto_map={"AutoModelForCausalLM": "modeling_x.Model"})
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeTailorError, match="own Python code"):
        resolve(str(folder))
    assert resolve(str(folder), trust_remote_code=True).trust_remote_code


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_checkpoint_loads_weights_only(stories_dir, tmp_path):
    from safetensors.torch import load_file

    good = tmp_path / "good"
    good.mkdir()
    for f in stories_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, good / f.name)
    state = load_file(stories_dir / "model.safetensors")
    torch.save(state, good / "pytorch_model.bin")
    lm = load_model(resolve(str(good)))
    ref = load_model(resolve(str(stories_dir)))
    ids = torch.tensor([[1, 400, 30, 99]])
    assert torch.allclose(lm.model(ids).logits, ref.model(ids).logits)

    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    torch.save({"model.embed_tokens.weight": _Evil()}, evil / "pytorch_model.bin")
    with pytest.raises(EdgeTailorError, match="weights_only"):
        load_model(resolve(str(evil)))


def test_preflight_counts_parameters_and_refuses_with_numbers(stories_dir, monkeypatch):
    import psutil
    from edgetailor.engine import DoesNotFitError, load_preset

    src = resolve(str(stories_dir))
    rep = preflight(src, load_preset("quick"))
    assert rep.parameters["total"] == 260_032
    assert rep.supported and rep.exporters["gguf"] == "yes" and rep.techniques["export"] == "yes"
    assert rep.fits and rep.disk_needed_bytes > 0

    class FakeMem:
        available = 100 * 1024**2
    monkeypatch.setattr(psutil, "virtual_memory", lambda: FakeMem)
    rep = preflight(src, load_preset("quick"))
    assert not rep.fits
    with pytest.raises(DoesNotFitError) as e:
        rep.raise_if_not_fits()
    assert "of RAM" in str(e.value) and "104.9 MB available" in str(e.value)
    assert e.value.fix.startswith("For memory: close other programs") and "disk" not in e.value.fix


def test_parameter_count_from_config_matches_torch(tiny_models):
    from edgetailor.engine.architectures import count_parameters

    for mt, folder in tiny_models.items():
        src = resolve(str(folder))
        lm = load_model(src)
        assert count_parameters(src.config)["total"] == sum(p.numel() for p in lm.model.parameters()), mt
