"""core/gpt2_model.py: the CPU serves GPT-2 without transformers' modeling code, with transformers' numbers, and the
scores (best_of's rerank, prompt log-probabilities) of the previous releases, bit for bit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ROOT, subprocess_env
from transformers import GPT2Config, GPT2LMHeadModel

import core.model_loading
from core import logprobs, rerank
from core.gpt2_decode import DecodeBatch
from core.gpt2_model import GPT2LM, as_transformers
from core.model_loading import load_model
from core.settings import ModelSettings
from core.speedups import fuse_gelu, quantize_int8, rowwise_attention

SEQS = [[5, 6, 7, 8, 9], [9, 8], [3, 4, 5, 6, 7, 8, 9, 10], [9, 8, 7]]


def _padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids, mask = torch.zeros(len(seqs), width, dtype=torch.long), torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    return ids, mask


def _previous(trained: GPT2LMHeadModel, int8: bool) -> GPT2LMHeadModel:
    """What the previous releases served on a CPU: transformers' model, fused GELU, per-row attention (and int8)."""
    copy = GPT2LMHeadModel(trained.config)
    copy.load_state_dict(trained.state_dict())
    model = rowwise_attention(fuse_gelu(copy.eval()))
    return quantize_int8(model) if int8 else model


@pytest.fixture(scope="module")
def saved(trained, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("own") / "model"
    trained.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tiny_dir / name).read_bytes())
    return directory


def test_serving_the_embedded_model_never_imports_transformers():
    """The default bot's whole path in a fresh process: imports, load, a best_of request (its rerank), prompt
    log-probabilities and a tokenizer-only backend's tokenizer: `transformers` is never imported (neither its
    modeling code, ~140 MB, nor its top level, which brings huggingface_hub's HTTP client: ~30 MB), nor
    torch._dynamo and sympy."""
    script = textwrap.dedent("""
        import asyncio, sys
        import bot.__main__
        from core.backends import load_counting_tokenizer
        from core.engine import Engine
        from core.grammar import parse_gen
        from core.logprobs import prompt_logprobs
        from core.model_loading import load_model
        from core.settings import load_settings

        async def main():
            settings = load_settings()
            engine = Engine(load_model(settings.model), settings)
            engine.start()
            request = parse_gen("긍정 아 정말 best_of=3 n=2 seed=4 max_length=20", engine.defaults, engine.limits)
            result = await engine.generate(engine.prepare(request))
            assert result.confidence and all(result.continuations), result
            assert len(prompt_logprobs(engine.model, [5, 6, 7, 8], 2)) == 3
            await engine.stop()
            assert load_counting_tokenizer(settings)("긍정 아 정말", add_special_tokens=False)["input_ids"]

        asyncio.run(main())
        print(sorted(name for name in sys.modules if name.split(".")[0] in ("transformers", "sympy", "httpx", "httpx2")
                     or name.startswith(("torch._dynamo", "huggingface_hub.file_download"))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_the_own_tree_computes_the_previous_releases_logits(saved: Path, trained, quantize: str):
    """int8: equal bit for bit, padded batches included; float32: equal too here (same operations, same shapes),
    and close to plain transformers' (its GELU written out)."""
    own = load_model(ModelSettings(pretrained=str(saved), quantize=quantize)).model
    assert type(own) is GPT2LM
    previous = _previous(trained, quantize == "int8")
    ids, mask = _padded(SEQS)
    ours = own(input_ids=ids, attention_mask=mask).logits
    theirs = previous(input_ids=ids, attention_mask=mask).logits
    for row, seq in enumerate(SEQS):
        assert torch.equal(ours[row, : len(seq)], theirs[row, : len(seq)])
        alone = own(input_ids=torch.tensor([seq])).logits[0]
        assert torch.allclose(alone, ours[row, : len(seq)], atol=1e-5)
        if quantize == "int8":
            assert torch.equal(alone, ours[row, : len(seq)])  # a row's numbers do not depend on its batch
    plain = trained.eval()(input_ids=ids, attention_mask=mask).logits
    if quantize == "none":
        assert all(torch.allclose(ours[r, : len(s)], plain[r, : len(s)], atol=1e-4) for r, s in enumerate(SEQS))


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_rerank_and_prompt_logprobs_equal_the_previous_path(saved: Path, trained, quantize: str):
    own = load_model(ModelSettings(pretrained=str(saved), quantize=quantize)).model
    previous = _previous(trained, quantize == "int8")
    long = [(7 * i) % 100 + 3 for i in range(45)]  # more positions than the int8 head scores at once
    # ... and in all more than twice as many (80), and an empty continuation (its log-probability is 0).
    contexts = [[5, 6, 7], [9], [3, 4, 5, 6], [5, 6, 7], [4, 5], [6, 7], [8]]
    continuations = [[8, 9], [8, 7, 6, 5], [7], [10, 11, 12], long, long[:25], []]
    scores = rerank.continuation_logprobs(own, contexts, continuations)
    assert scores == rerank.continuation_logprobs(previous, contexts, continuations)
    assert scores[-1] == 0.0
    assert rerank.continuation_logprobs(own, [[5]], [[]]) == [0.0]  # nothing at all to score
    assert logprobs.prompt_logprobs(own, SEQS[2], 3) == logprobs.prompt_logprobs(previous, SEQS[2], 3)


def test_a_right_padded_mask_is_all_the_forward_takes(saved: Path):
    own = load_model(ModelSettings(pretrained=str(saved))).model
    ids, mask = _padded(SEQS)
    with pytest.raises(ValueError, match="right padding"):
        own(input_ids=ids, attention_mask=mask.flip(1))


def test_as_transformers_shares_the_modules_and_decodes_the_same(saved: Path):
    own = load_model(ModelSettings(pretrained=str(saved))).model
    wrapped = as_transformers(own)
    assert isinstance(wrapped, GPT2LMHeadModel) and wrapped.lm_head is own.lm_head
    assert wrapped.transformer.h[1].mlp.c_fc is own.transformer.h[1].mlp.c_fc
    ids = torch.tensor([SEQS[0]])
    assert torch.equal(wrapped(input_ids=ids).logits, own(input_ids=ids).logits)
    assert as_transformers(wrapped) is wrapped


def test_a_pytorch_model_bin_directory_loads_without_transformers_model(trained, saved: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """A hub snapshot or directory with only pytorch_model.bin is read by the streamed readers too."""
    directory = tmp_path / "bin"
    directory.mkdir()
    torch.save({k: v.clone() for k, v in trained.state_dict().items()}, directory / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((saved / name).read_bytes())

    def refuse() -> None:
        raise AssertionError("transformers' GPT2LMHeadModel was used")

    monkeypatch.setattr(core.model_loading, "_transformers_gpt2", refuse)
    ids = torch.tensor([SEQS[2]])
    for quantize in ("none", "int8"):
        model = load_model(ModelSettings(pretrained=str(directory), quantize=quantize)).model
        reference = load_model(ModelSettings(pretrained=str(saved), quantize=quantize)).model
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits), quantize


def test_a_configuration_the_tree_does_not_serve_loads_transformers_model(trained, saved: Path, tmp_path: Path):
    config = GPT2Config.from_pretrained(saved)
    config.activation_function = "relu"  # not one of GPT-2's GELUs: transformers' model serves it
    directory = tmp_path / "relu"
    model = GPT2LMHeadModel(config)
    model.load_state_dict(trained.state_dict())
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((saved / name).read_bytes())
    loaded = load_model(ModelSettings(pretrained=str(directory))).model
    assert isinstance(loaded, GPT2LMHeadModel)
    assert isinstance(loaded.lm_head, type(load_model(ModelSettings(pretrained=str(saved))).model.lm_head))  # int8


def test_layer_scaling_options_match_transformers(tmp_path: Path, saved: Path):
    # As many token embeddings as the tiny tokenizer has tokens (it is larger when trained on NSMC's reviews).
    vocab = GPT2Config.from_pretrained(saved).vocab_size
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=3, n_head=2,
                        scale_attn_by_inverse_layer_idx=True, scale_attn_weights=True)
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(config).eval()
    reference.set_attn_implementation("eager")  # transformers' SDPA path ignores the option in some 5.x releases
    reference.save_pretrained(tmp_path / "scaled")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "scaled" / name).write_bytes((saved / name).read_bytes())
    own = load_model(ModelSettings(pretrained=str(tmp_path / "scaled"), quantize="none")).model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.allclose(own(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    batch = DecodeBatch(own)
    assert torch.allclose(batch.prefill([[1, 2, 3, 4, 5]], [1]), reference(input_ids=ids).logits[:, -1], atol=1e-5)


def test_linear1d_computes_transformers_conv1d_bit_for_bit():
    from transformers.pytorch_utils import Conv1D

    from core.linear1d import Linear1D

    gen = torch.Generator().manual_seed(3)
    theirs = Conv1D(48, 16)
    ours = Linear1D(48, 16)
    ours.weight = torch.nn.Parameter(torch.randn(16, 48, generator=gen), requires_grad=False)
    ours.bias = torch.nn.Parameter(torch.randn(48, generator=gen), requires_grad=False)
    theirs.load_state_dict(ours.state_dict())
    for shape in ((5, 16), (3, 7, 16), (1, 1, 16)):
        x = torch.randn(*shape, generator=gen)
        assert torch.equal(ours(x), theirs(x))


def test_quantize_int8_takes_the_own_trees_linear_layers_too(saved: Path):
    """core.speedups' int8 pass finds Linear1D as it finds transformers' Conv1D (no float linear layer is left)."""
    from core.int8_rows import RowInt8Linear
    from core.linear1d import Linear1D

    wrapped = as_transformers(load_model(ModelSettings(pretrained=str(saved), quantize="none")).model)
    assert any(isinstance(m, Linear1D) for m in wrapped.modules())
    quantized = quantize_int8(wrapped)
    assert not any(isinstance(m, (Linear1D, torch.nn.Linear)) for m in quantized.modules())
    assert isinstance(quantized.transformer.h[0].attn.c_attn, RowInt8Linear)
