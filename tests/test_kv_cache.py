"""The engine's KV cache writes each step into spare room instead of concatenating: the same keys, values and
logits as transformers' own cache, through reallocation, and earlier views (a failed step's undo) never change."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from core.engine import _cache_argument
from core.gpt2_model import as_transformers
from core.kv_cache import MIN_ROOM, GrowingLayer, growing_cache
from core.model_loading import load_model
from core.settings import ModelSettings


def test_growing_layer_matches_concatenation_and_keeps_earlier_views():
    torch.manual_seed(0)
    k0, v0 = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    layer = GrowingLayer(k0, v0)
    ref_k, ref_v = k0.clone(), v0.clone()
    views = []
    for _ in range(3 * MIN_ROOM):  # past the first buffer's room, twice
        views.append((layer.keys, layer.values, ref_k, ref_v))
        new_k, new_v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
        keys, values = layer.update(new_k, new_v)
        ref_k, ref_v = torch.cat([ref_k, new_k], -2), torch.cat([ref_v, new_v], -2)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        assert layer.get_seq_length() == ref_k.shape[-2]
    assert all(torch.equal(k, rk) and torch.equal(v, rv) for k, v, rk, rv in views)
    assert torch.equal(k0, ref_k[:, :, :5])  # the tensors it was built from are copied, not written


def test_a_model_decodes_the_same_through_it(tiny_dir):
    model = as_transformers(load_model(ModelSettings(pretrained=str(tiny_dir), quantize="none")).model)
    torch.manual_seed(1)
    vocab = model.config.vocab_size  # 109 tokens without the NSMC data, 2,000 with it
    prompt = torch.randint(5, vocab, (3, 6))
    arg = _cache_argument()  # `past_key_values` or, from transformers 5.2x, `cache`
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        layers = [(layer.keys, layer.values) for layer in out[arg].layers]
        ours, theirs = growing_cache(layers), DynamicCache()
        for index, (k, v) in enumerate(layers):
            theirs.update(k.clone(), v.clone(), index)
        for step in range(MIN_ROOM + 8):
            token = torch.randint(5, vocab, (3, 1))
            position = torch.full((3, 1), 6 + step)
            a = model(input_ids=token, position_ids=position, **{arg: ours}, use_cache=True).logits
            b = model(input_ids=token, position_ids=position, **{arg: theirs}, use_cache=True).logits
            assert torch.allclose(a, b, atol=1e-5), step
