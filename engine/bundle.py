"""Export bundles: one variant of a run, ready to ship, in a folder of its own.

    plan = plan_bundle(run_folder, "base-Q4_K_M")
    plan.entries          # what the folder will hold (name, bytes, what it is), shown before writing
    write_bundle(plan, "/some/where")   # -> /some/where/<model>-<variant>/, written atomically

A bundle holds the model (a .gguf file, or the ONNX folder with its genai_config.json), README.md (a model
card: source, recipe, every metric, checksums, how to run it), metrics.json, and the runtime's own
config: an Ollama Modelfile for GGUF.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import atomic
from .errors import EdgeTailorError
from .runs import RunRecord

# Metric name -> (label, formatter) for model cards and the app's results table.
METRIC_LABELS = {
    "size_bytes": ("Size", lambda v: f"{v / 1e6:.2f} MB"),
    "parameters": ("Parameters", lambda v: f"{v / 1e6:.2f} M"),
    "perplexity": ("Perplexity", lambda v: f"{v:.4f}"),
    "ppl_increase_pct": ("Perplexity increase", lambda v: f"{v:+.2f} %"),
    "kl": ("KL divergence to the baseline", lambda v: f"{v:.5f}"),
    "top1": ("Top-1 agreement with the baseline", lambda v: f"{100 * v:.1f} %"),
    "decode_tps": ("Decode speed (measured on the machine below)", lambda v: f"{v:.1f} tokens/s"),
    "ttft_seconds": ("Time to first token", lambda v: f"{1000 * v:.0f} ms"),
    "peak_rss_bytes": ("Peak memory", lambda v: f"{v / 1e6:.1f} MB"),
    "energy_j_per_token": ("Energy", lambda v: f"{v:.4f} J/token"),
}


@dataclass
class BundleEntry:
    name: str                    # path inside the bundle
    description: str
    bytes: int
    source: Path | None = None   # a file or folder copied as is
    text: str | None = None      # or generated content


@dataclass
class BundlePlan:
    run_folder: Path
    variant: dict
    folder_name: str
    entries: list[BundleEntry] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries)


def plan_bundle(run_folder: str | Path, variant_name: str) -> BundlePlan:
    record = RunRecord.open(Path(run_folder))
    m = record.manifest
    v = record.variant(variant_name)
    if v is None:
        raise EdgeTailorError(f"Run {m['id']} has no variant '{variant_name}'.",
                              f"Pick one of: {', '.join(x['name'] for x in m['variants'])}.")
    if not v.get("path"):
        raise EdgeTailorError(f"Variant '{variant_name}' has no file to export (it is the in-memory {v['format']} model).",
                              "Export a GGUF or ONNX variant, or add an export step to the recipe.")
    model_path = record.folder / v["path"]
    if not model_path.exists():
        raise EdgeTailorError(f"The file of '{variant_name}' ({model_path}) is gone.", "Run the recipe again.")
    model_name = model_path.name
    artifact = next((a for a in m.get("artifacts", []) if a["path"] == v["path"]), {})
    plan = BundlePlan(record.folder, v, _safe(model_path.stem if v["format"] == "gguf" else model_name))
    kind = {"gguf": "GGUF model (llama.cpp, Ollama, LM Studio)",
            "onnx": "ONNX model folder (onnxruntime, onnxruntime-genai; holds genai_config.json)"}
    plan.entries.append(BundleEntry(model_name, kind.get(v["format"], f"{v['format']} model"),
                                    atomic.tree_size(model_path), source=model_path))
    card = model_card(m, v, model_name, artifact.get("sha256"))
    plan.entries.append(BundleEntry("README.md", "model card: source, recipe, metrics, checksum, how to run",
                                    len(card.encode()), text=card))
    metrics = json.dumps({"variant": v, "source": m.get("source", {}), "recipe": m.get("recipe"),
                          "run": m["id"], "sha256": artifact.get("sha256"), "machine": m.get("machine")},
                         indent=2, default=str) + "\n"
    plan.entries.append(BundleEntry("metrics.json", "the variant's metrics and provenance (machine-readable)",
                                    len(metrics.encode()), text=metrics))
    if v["format"] == "gguf":
        modelfile = ollama_modelfile(model_name, m, v)
        plan.entries.append(BundleEntry("Modelfile", "runtime config for Ollama (ollama create NAME -f Modelfile)",
                                        len(modelfile.encode()), text=modelfile))
    return plan


def write_bundle(plan: BundlePlan, parent: str | Path) -> Path:
    """Write the bundle as ``parent/<folder_name>``; nothing is visible there until it is complete."""
    parent = Path(parent)
    if not parent.is_dir():
        raise EdgeTailorError(f"{parent} is not a folder.", "Pick an existing folder to export into.")
    final = parent / plan.folder_name
    need = plan.total_bytes
    free = shutil.disk_usage(parent).free
    if need > free:
        raise EdgeTailorError(f"The bundle needs {need / 1e6:.1f} MB, {parent} has {free / 1e6:.1f} MB free.",
                              "Free some space or pick another folder.")
    try:
        with atomic.atomic_path(final) as tmp:
            tmp.mkdir()
            for e in plan.entries:
                target = tmp / e.name
                if e.source is not None:
                    if e.source.is_dir():
                        shutil.copytree(e.source, target)
                    else:
                        shutil.copy2(e.source, target)
                else:
                    target.write_text(e.text, encoding="utf-8")
    except (OSError, shutil.Error) as exc:   # nothing of the bundle is left there: say why, and where else to go
        raise _write_error(exc, parent) from exc
    return final


def _write_error(exc: BaseException, parent: Path) -> EdgeTailorError:
    import errno
    import os

    code = exc.errno if isinstance(exc, OSError) else None
    if isinstance(exc, shutil.Error):          # copytree gathers its failures: (source, target, reason) each
        reasons = " ".join(str(r[-1]) for r in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else []))
        code = errno.ENOSPC if "No space left" in reasons else errno.EACCES if "denied" in reasons else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return EdgeTailorError(f"The disk of {parent} filled up while the bundle was written; nothing was left there.",
                               "Free some space there or pick another folder.")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EdgeTailorError(f"EdgeTailor may not write into {parent} ({os.strerror(code)}).",
                               "Pick a folder you can write to (your home folder, for example).")
    return EdgeTailorError(f"The bundle could not be written into {parent}: {exc}.", "Pick another folder.")


def model_card(manifest: dict, variant: dict, model_name: str, sha256: str | None) -> str:
    src = manifest.get("source", {})
    pre = manifest.get("preflight") or {}
    lines = [f"# {model_name}", "",
             f"Variant `{variant['name']}` ({variant['format']}) of `{src.get('spec', '?')}`"
             f" ({pre.get('model_type', src.get('model_type', '?'))}), made by EdgeTailor run `{manifest['id']}`.",
             "", "## Metrics", "", "| Metric | Value |", "|---|---|"]
    metrics = variant.get("metrics", {})
    for key, (label, fmt) in METRIC_LABELS.items():
        if metrics.get(key) is not None:
            if key == "energy_j_per_token" and "energy_measured" in metrics:
                label += " (measured)" if metrics["energy_measured"] else " (estimated: CPU time x power)"
            lines.append(f"| {label} | {fmt(metrics[key])} |")
    extra = {k: v for k, v in metrics.items() if k not in METRIC_LABELS and isinstance(v, (int, float, str, bool))}
    for k, v in sorted(extra.items()):
        lines.append(f"| {k} | {v} |")
    if isinstance(metrics.get("budget"), dict):
        lines += ["", "## Budget it was checked against", "", budget_text(metrics["budget"])
                  + (" — it fits." if metrics.get("fits") else
                     f" — it does not fit: {'; '.join(metrics.get('fit_reasons') or [])}." if "fits" in metrics else ".")]
    if metrics.get("eval_windows"):
        lines += ["", f"Quality measured on {metrics['eval_windows']} windows of {metrics.get('eval_ctx')} tokens "
                      f"({metrics.get('eval_tokens')} scored tokens) with {metrics.get('eval_runtime')}, against the "
                      "fp32 baseline."]
    lines += ["", "## How it was made", "", "```yaml", _yaml(manifest.get("recipe")), "```", ""]
    if variant.get("params"):
        lines += [f"Parameters: `{json.dumps(variant['params'])}`", ""]
    if sha256:
        lines += [f"sha256 of `{model_name}`: `{sha256}`", ""]
    lines += ["## Run it", ""]
    if variant["format"] == "gguf":
        params = variant.get("params") or {}
        kv = params.get("kv_type", "f16")
        flags = (f" -c {params['context']}" if params.get("context") else "") + (
            f" -ctk {kv} -ctv {kv} -fa on" if kv != "f16" else "")
        lines += ["```bash", f"llama-cli -m {model_name}{flags} -p \"Once upon a time\"",
                  f"ollama create {_safe(Path(model_name).stem).lower()} -f Modelfile", "```"]
        if kv != "f16":
            lines += ["", f"Measured with a {kv} KV cache (flash attention on). Ollama sets the KV-cache type for "
                          f"the whole server: OLLAMA_FLASH_ATTENTION=1 OLLAMA_KV_CACHE_TYPE={kv}."]
    elif variant["format"] == "onnx":
        lines += ["```python", "import onnxruntime_genai as og",
                  f"model = og.Model(\"{model_name}\")   # the folder holds genai_config.json", "```"]
    machine = manifest.get("machine") or {}
    if machine:
        lines += ["", f"Measured on: {machine.get('cpu', '?')}, {machine.get('cores_logical', '?')} logical cores, "
                      f"{(machine.get('ram_bytes') or 0) / 2**30:.1f} GiB RAM ({machine.get('system', '?')})."]
    return "\n".join(lines) + "\n"


def budget_text(b: dict) -> str:
    """A budget record (``Budget.to_dict``) in words, only the limits that are set."""
    parts = [f"device {b.get('device')}"]
    if b.get("max_memory_bytes"):
        parts.append(f"memory at most {b['max_memory_bytes'] / 1e6:,.0f} MB")
    if b.get("min_decode_tps"):
        parts.append(f"decode at least {b['min_decode_tps']:g} tokens/s")
    if b.get("max_j_per_token"):
        parts.append(f"energy at most {b['max_j_per_token']:g} J/token")
    if b.get("max_ppl_increase_pct") is not None:
        parts.append(f"perplexity increase at most {b['max_ppl_increase_pct']:g} %")
    if b.get("max_kl") is not None:
        parts.append(f"KL at most {b['max_kl']:g}")
    return ", ".join(parts)


def ollama_modelfile(model_name: str, manifest: dict, variant: dict | None = None) -> str:
    ctx = ((variant or {}).get("params") or {}).get("context") \
        or (manifest.get("preflight") or {}).get("context_length") or 2048
    return f"FROM ./{model_name}\nPARAMETER num_ctx {min(int(ctx), 8192)}\n"


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False).rstrip()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
