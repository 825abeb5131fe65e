"""Distillation (checkpoints, resume, cancel, held-out KL) and LoRA fine-tuning merged back into weights."""
from __future__ import annotations

import threading

import torch
from edgetailor.engine.job import JobSpec, run_job
from edgetailor.engine.registry import get_step
from test_pruning import assert_close_logits, gguf_logits, make_ctx, run_step

PRUNE = {"step": "prune.width", "params": {"mlp_keep": 0.5, "heads_keep": 0.5, "calibration_sequences": 4,
                                           "seq_len": 64}}
DISTILL = {"seq_len": 128, "stride": 32, "batch_size": 2, "lr": 2e-3, "max_minutes": 0, "checkpoint_every": 10}


def distill_job(tmp_path, source, steps, cancel=None, on_event=None, **extra):
    recipe = {"name": "kd", "steps": [PRUNE, {"step": "distill", "params": {**DISTILL, "steps": steps, **extra}},
                                      {"step": "export", "params": {"types": ["F16"]}}]}
    return run_job(JobSpec(recipe=recipe, source=str(source), options={"threads": 2}, runs_root=str(tmp_path / "runs")),
                   emit=on_event, cancel=cancel)


def test_distillation_lowers_held_out_kl_checkpoints_and_resumes(tmp_path, stories_dir):
    first = distill_job(tmp_path, stories_dir, 20)
    assert first.manifest["status"] == "succeeded", first.manifest["error"]
    report = first.manifest["steps"][1]["report"]
    assert report["steps"] == 20 and report["resumed_from_step"] == 0
    assert report["heldout_kl_after"] < 0.7 * report["heldout_kl_before"]
    checkpoints = sorted((first.folder / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["distill-step-000020"]        # the newest only
    assert {f.name for f in checkpoints[0].iterdir()} == {"model.safetensors", "optimizer.pt", "state.json"}
    assert first.manifest["variants"][-1]["name"] == "width-h4-kv4-ffn96+distilled-F16"   # exported and loaded back

    resumed = distill_job(tmp_path, stories_dir, 25, resume_from=str(first.folder))
    assert resumed.manifest["status"] == "succeeded", resumed.manifest["error"]
    report2 = resumed.manifest["steps"][1]["report"]
    assert report2["resumed_from_step"] == 20 and report2["steps"] == 25
    # it continued from the trained weights: its losses start near where the first run ended, not afresh
    assert report2["loss_first"] < 0.8 * report["loss_first"]


def test_distillation_honours_cancel(tmp_path, stories_dir):
    cancel = threading.Event()
    losses = []

    def on_event(ev):
        if ev["type"] == "sample" and ev["data"]["series"] == "distill_loss":
            losses.append(ev["data"]["value"])
            if len(losses) == 3:
                cancel.set()

    rec = distill_job(tmp_path, stories_dir, 1000, cancel=cancel, on_event=on_event)
    assert rec.manifest["status"] == "cancelled"
    assert len(losses) == 3
    assert rec.manifest["artifacts"] == []


def test_resume_from_a_folder_without_checkpoints_fails_clearly(tmp_path, stories_dir):
    rec = distill_job(tmp_path, stories_dir, 5, resume_from=str(tmp_path))
    assert rec.manifest["status"] == "failed"
    assert "No distillation checkpoint" in rec.manifest["error"]["problem"]


def test_lora_merges_into_plain_weights(tmp_path, stories_dir):
    ctx = make_ctx(tmp_path, stories_dir)
    base = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    report = run_step(ctx, "finetune.lora", rank=4, steps=20, max_minutes=0, seq_len=128, stride=64, lr=5e-3)
    model = ctx.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n.lower() for n, _ in model.named_modules())
    state = model.state_dict()
    assert set(state) == set(base)
    changed = [k for k in base if not torch.equal(base[k], state[k])]
    assert changed and all(k.endswith(("_proj.weight",)) for k in changed)
    assert report["loss_last"] < report["loss_first"]
    assert ctx.applied == ["lora4"]
    ids = torch.tensor([[1, 403, 260, 9, 33, 70, 2, 11, 40, 3]])
    ref = model(input_ids=ids).logits[0].detach().numpy()
    assert_close_logits(gguf_logits(model, ctx.tokenizer, stories_dir, tmp_path, ids[0].tolist()), ref)


def test_lora_refuses_unknown_target_modules(tmp_path, stories_dir):
    import pytest
    from edgetailor.engine.errors import EdgeTailorError

    ctx = make_ctx(tmp_path, stories_dir)
    with pytest.raises(EdgeTailorError, match="no linear layers named"):
        run_step(ctx, "finetune.lora", target_modules=["c_attn"], steps=2, max_minutes=0)
    assert get_step("finetune.lora").kind == "transform"
