"""Weight clustering (cluster.kmeans) and layer sharing (share.layers) on the real stories260K model."""
from __future__ import annotations

import pytest
import torch
from edgetailor.engine import text
from edgetailor.engine.calibration import decoder_layers, mean_loss, token_sequences
from edgetailor.engine.modeling import load_model
from edgetailor.engine.sources import resolve
from edgetailor.engine.steps import cluster, share


@pytest.fixture(scope="module")
def stories(stories_dir):
    torch.set_num_threads(2)
    src = resolve(str(stories_dir))
    lm = load_model(src)
    return src, token_sequences(lm.tokenizer, text.read_text(None), 128, 16)


def test_kmeans_1d_is_a_lloyd_fixed_point():
    torch.manual_seed(0)
    x = torch.randn(3000, dtype=torch.float64) ** 3
    codebook, idx = cluster.kmeans_1d(x, 16, iterations=200)
    assert len(codebook) == 16 and torch.all(codebook[1:] > codebook[:-1])
    # every value sits at its nearest centroid, and every centroid is the mean of its values
    assert torch.equal(idx, (x[:, None] - codebook[None, :]).abs().argmin(1))
    for j in range(16):
        assert torch.isclose(x[idx == j].mean(), codebook[j])


def test_clustering_leaves_at_most_k_values_per_tensor_and_the_palette_reads_back(stories, tmp_path):
    src, seqs = stories
    model = load_model(src).model
    base = mean_loss(model, seqs)
    cfg = cluster.ClusterConfig(clusters=16)
    palette = cluster.cluster_model(model, cfg)
    targets = cluster.cluster_targets(model, False)
    assert set(palette) == set(targets) and len(targets) == 5 * 7
    for name, p in targets.items():
        assert len(torch.unique(p.data)) <= 16, name
    assert mean_loss(model, seqs) < base + 0.5           # 4-bit codebooks keep the model usable
    path = tmp_path / "palette.safetensors"
    cluster.write_palette(model, palette, 16, path, tmp_path / "scratch")
    state = cluster.load_palette(path)
    for name, p in targets.items():
        assert torch.allclose(state[name], p.data, atol=2e-3 * float(p.data.abs().max()))   # float16 codebook
    dense_fp16 = sum(p.numel() * 2 for p in model.parameters())
    assert path.stat().st_size < 0.75 * dense_fp16       # 4-bit indices for the clustered weights


def test_tied_blocks_share_storage_and_decode_with_their_own_cache_slot(stories):
    src, seqs = stories
    model = load_model(src).model
    before = sum(p.numel() for p in model.parameters())
    share.tie(model, 1)
    layers = decoder_layers(model)
    after = sum(p.numel() for p in model.parameters())
    assert after == before - sum(p.numel() for p in layers[1].parameters())
    for (na, a), (nb, b) in zip(layers[1].named_parameters(), layers[2].named_parameters()):
        assert na == nb and a.data_ptr() == b.data_ptr()
    assert layers[2].self_attn.layer_idx == 2
    ids = seqs[:1, :24]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0, -1]
        out = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-4)          # each use of the block has its own KV-cache slot


def test_pairs_are_non_overlapping_and_lowest_error_first():
    assert share.choose_pairs([0.5, 0.1, 0.2, 0.9, 0.3], 2) == [1, 4]
    with pytest.raises(Exception, match="non-overlapping"):
        share.choose_pairs([0.5, 0.1, 0.2], 2)
