"""Load the tokenizer and the (fine-tuned) GPT-2 model the way the tutorial did, without executing pickles."""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from core.devices import model_dtype, resolve_device, resolve_quantize
from core.errors import ModelLoadError
from core.gpt2_config import GPT2Settings, transformers_config
from core.gpt2_model import GPT2LM, build, serves
from core.hub import hub_file, load_named, local_dir, unreachable_hint
from core.settings import ModelSettings
from core.tokenizer import TextTokenizer
from core.weight_files import OpenFile, StoredTensor, mapped_tensor, safetensors_file

log = logging.getLogger(__name__)
T = TypeVar("T")

# KoGPT2's special tokens, as the tutorial passes them.
SPECIAL_TOKENS = dict(bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")

# Pickled hyper-parameter containers that Lightning checkpoints carry beside the weights. They are rebuilt as
# inert stand-ins (plain dict/attribute bags), never imported, so nothing in the file can run code.
_HPARAM_CONTAINERS = (
    "argparse.Namespace",  # the tutorial's hparams; a plain attribute bag
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
)
_VAL_LOSS_RE = re.compile(r"val_loss=([0-9]+(?:\.[0-9]+)?)")
# Buffers older transformers saved in GPT-2 state dicts; today's model rebuilds them itself.
_IGNORABLE_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class _InertDict:
    """Stand-in for a pickled dict subclass such as Lightning's AttributeDict: it becomes a plain dict."""

    def __new__(cls, *args: object, **kwargs: object) -> dict:  # type: ignore[misc]
        return {}


@dataclass
class LoadedModel:
    model: nn.Module  # core.gpt2_model.GPT2LM on a CPU; transformers' GPT2LMHeadModel elsewhere
    tokenizer: TextTokenizer
    source: str  # what was loaded, for logs and --check
    # Whether the label words steer it: core.train marks its models; a Lightning/state-dict checkpoint is the
    # tutorial's label-prefixed fine-tune. A bare pretrained model never learned the labels.
    sentiment: bool = True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_readable(path: Path, setting: str) -> None:
    """Fail naming the file and our uid when `path` (or a file directly in it) cannot be read: transformers and
    torch report an unreadable file as a missing or broken one."""
    def refuse(target: Path) -> ModelLoadError:
        uid = os.getuid() if hasattr(os, "getuid") else "?"
        return ModelLoadError(
            f"{setting}의 {target}을(를) 읽을 권한이 없습니다. 봇은 uid {uid}(으)로 실행됩니다: 그 사용자가 읽을 수 "
            f"있게 권한을 바꾸세요 (예: chmod a+rX). (permission denied: the bot runs as uid {uid} and cannot read "
            f"{target})"
        )

    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise refuse(path)
        for child in sorted(path.iterdir()):
            if child.is_file() and not os.access(child, os.R_OK):
                raise refuse(child)
    elif path.exists() and not os.access(path, os.R_OK):
        raise refuse(path)


def _explained(load: Callable[[], T], source: str, broken_ko: str, broken_en: str) -> T:
    """`load()`, every failure one sentence: a local directory's missing or broken file, or the hub's absence."""
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as exc:  # a corrupt file raises the safetensors, tokenizers or torch library's own error types
        if local_dir(source) is not None:
            raise ModelLoadError(f"{broken_ko} ({broken_en}: {_first_line(exc)})") from None
        if not isinstance(exc, (OSError, ValueError)):
            raise
        raise ModelLoadError(unreachable_hint(source)) from None


def _required(name: str, filename: str, local_files_only: bool) -> Path:
    if (path := hub_file(name, filename, local_files_only)) is None:
        raise OSError(f"{name} has no {filename}")
    return path


def _tokenizer_files(name: str, local_files_only: bool = False) -> TextTokenizer:
    main = _required(name, "tokenizer.json", local_files_only)
    config, mapped = (hub_file(name, file, local_files_only, optional=True)
                      for file in ("tokenizer_config.json", "special_tokens_map.json"))
    return TextTokenizer.from_files(main, SPECIAL_TOKENS, config, mapped)


def tokenizer_explained(load: Callable[[], T], source: str) -> T:
    """`load()` of `source`'s tokenizer (serving's or training's), every failure one sentence."""
    return _explained(load, source, f"토크나이저를 {source}에서 불러올 수 없습니다 (tokenizer.json이 필요합니다).",
                     f"cannot load the tokenizer from {source}")


def load_tokenizer(source: str) -> TextTokenizer:
    """The serving tokenizer (core/tokenizer.py: transformers' PreTrainedTokenizerFast's results, without importing
    transformers) of a model directory or a hub model."""
    return tokenizer_explained(lambda: load_named(_tokenizer_files, source), source)


def load_config(source: str) -> GPT2Settings:
    """config.json's values (core/gpt2_config.py; `to_transformers` where transformers' model needs its own)."""
    return _explained(
        lambda: load_named(lambda name, local_files_only=False: GPT2Settings.from_file(
            _required(name, "config.json", local_files_only)), source),
        source, f"{source}에 GPT-2 config.json이 없거나 잘못되었습니다.", f"no valid GPT-2 config.json in {source}")


def pick_checkpoint(directory: Path) -> Path:
    """The tutorial's deploy rule: among `epoch=…-val_loss=….ckpt`, the lowest val_loss."""
    ckpts = sorted(directory.glob("*.ckpt"))
    if not ckpts:
        raise ModelLoadError(f"체크포인트 디렉터리 {directory}에 .ckpt 파일이 없습니다. (no .ckpt files in {directory})")
    scored = [(float(m.group(1)), p) for p in ckpts if (m := _VAL_LOSS_RE.search(p.name))]
    if scored:
        _, best = min(scored)
        log.info("picked %s (lowest val_loss of %d)", best.name, len(scored))
        return best
    # No val_loss in the names: the newest file is the best guess, and we say so.
    newest = max(ckpts, key=lambda p: p.stat().st_mtime)
    log.warning("no val_loss in checkpoint names under %s; using the newest, %s", directory, newest.name)
    return newest


def _torch_load_safely(path: Path) -> object:
    """torch.load with weights_only=True, admitting only known hyper-parameter containers as inert stand-ins. The
    tensors are memory-mapped: none is read before it is used (torch's zip format, the only one admitted here)."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 (reported as one sentence)
        raise ModelLoadError(f"{path}은(는) PyTorch 체크포인트가 아닙니다. (not a PyTorch checkpoint: {exc})") from None
    refused = [name for name in unsafe if name not in _HPARAM_CONTAINERS]
    if refused:
        raise ModelLoadError(
            f"{path}에 허용되지 않은 파이썬 객체({refused[0]})가 들어 있어 불러오지 않습니다. 임의 코드 실행을 막기 "
            f"위해서입니다. (refusing to unpickle {refused[0]}: checkpoints may only hold tensors and plain data)"
        )
    stand_ins = [argparse.Namespace if name == "argparse.Namespace" else (_InertDict, name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 (reported as one sentence)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}을(를) 읽을 수 없습니다. (cannot read checkpoint: {first_line})") from None


def read_state_dict(path: Path) -> dict[str, StoredTensor]:
    """Weights from a Lightning `.ckpt`, a bare `.bin`/`.pt` state dict, or a `.safetensors` file, each tensor read
    only when it is used (core/weight_files.py), so a load holds one tensor of the file at a time."""
    if not path.exists():
        raise ModelLoadError(f"체크포인트 파일 {path}이(가) 없습니다. (checkpoint not found: {path})")
    if path.suffix == ".safetensors":
        try:
            return safetensors_file(path)
        except Exception as exc:  # noqa: BLE001 (reported as one sentence)
            raise ModelLoadError(f"{path}은(는) safetensors 파일이 아닙니다. (not a safetensors file: {exc})") from None
    try:
        file = OpenFile(path)  # before mapping it: lets a later read of a tensor check the file was not written since
    except OSError as exc:
        raise ModelLoadError(f"{path}을(를) 읽을 수 없습니다. (cannot read checkpoint: {exc.strerror})") from None
    obj = _torch_load_safely(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"{path}에 모델 가중치(state_dict)가 없습니다. (no state dict of tensors in {path})"
        )
    return {key: mapped_tensor(value, file) for key, value in obj.items()}


def _strip_prefix(state: dict[str, T]) -> dict[str, T]:
    # The tutorial's LightningModule holds the GPT-2 as `self.model`.
    if all(key.startswith("model.") for key in state):
        return {key.removeprefix("model."): value for key, value in state.items()}
    return state


def model_from_state_dict(config: GPT2Settings, state: dict[str, StoredTensor], origin: str, int8: bool = False,
                          own: bool = True) -> nn.Module:
    """The model from `config` with the weights of `state`, naming the first key that does not fit, each weight read
    (and with `int8` quantized) in turn. `own`: core.gpt2_model's tree where it serves `config`, else transformers'
    GPT2LMHeadModel (float32; load_model quantizes it)."""
    own = own and serves(config)
    if own:
        skeleton = GPT2LM(config)  # empty: nothing allocated
    else:
        with torch.device("meta"):
            skeleton = _transformers_gpt2()(transformers_config(config))
    expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    state = {k: v for k, v in _strip_prefix(state).items() if not (k.endswith(_IGNORABLE_SUFFIXES) and k not in expected)}
    for key, value in state.items():
        if key not in expected:
            raise ModelLoadError(
                f"{origin}의 키 '{key}'가 사전학습 설정의 모델에 없습니다. (unexpected key '{key}': "
                f"the checkpoint does not match model.pretrained)"
            )
        if value.shape != expected[key]:
            raise ModelLoadError(
                f"{origin}의 '{key}' 크기 {value.shape}가 모델의 {expected[key]}와 다릅니다. "
                f"(shape mismatch for '{key}': the checkpoint does not match model.pretrained)"
            )
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [key for key in expected if key not in state and key not in tied]
    if missing:
        raise ModelLoadError(f"{origin}에 '{missing[0]}' 키가 없습니다. (missing key '{missing[0]}')")
    if own and (model := build(config, state.items(), int8)) is not None:
        return model
    model = _transformers_gpt2()(transformers_config(config))
    targets = model.state_dict()  # shares each parameter's storage: copying into it loads the model
    with torch.no_grad():
        for key, stored in state.items():
            targets[key].copy_(stored.load())
    if tied:
        model.tie_weights()
    return model


def load_model(settings: ModelSettings) -> LoadedModel:
    """The model and tokenizer named by settings; every failure is a ModelLoadError with one clear sentence."""
    pretrained, checkpoint = settings.pretrained, settings.checkpoint.strip()
    log.info("loading %s …", " + ".join(part for part in (pretrained, checkpoint) if part))
    local = local_dir(pretrained) or Path(pretrained).expanduser()
    if local.is_file():
        raise ModelLoadError(
            f"model.pretrained {pretrained}은(는) 파일입니다: config.json과 tokenizer.json이 든 디렉터리"
            f"(또는 허브 이름)를 지정하세요. 가중치 파일 하나는 model.checkpoint에 지정합니다. "
            f"(model.pretrained must be a model directory or a hub name, not a file; a single weights file goes in "
            f"model.checkpoint)"
        )
    check_readable(local, "model.pretrained")
    if checkpoint:
        check_readable(Path(checkpoint).expanduser(), "model.checkpoint")
    device = resolve_device(settings.device)
    int8 = resolve_quantize(settings.quantize, device) == "int8"
    own = device.type == "cpu"  # core.gpt2_model's tree serves the CPU; a GPU runs transformers' model
    tokenizer_source = pretrained
    tutorial_checkpoint = False
    if not checkpoint:
        model = _from_pretrained(pretrained, int8, own)
        source = pretrained
    else:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise ModelLoadError(f"체크포인트 {path}이(가) 없습니다. (checkpoint not found: {path})")
        if path.is_dir() and (path / "config.json").exists():
            model = _from_pretrained(str(path), int8, own)
            if (path / "tokenizer.json").exists():
                tokenizer_source = str(path)
            source = str(path)
        else:
            if path.is_dir():
                path = pick_checkpoint(path)
            model = model_from_state_dict(load_config(pretrained), read_state_dict(path), str(path), int8, own)
            source = f"{pretrained} + {path}"
            tutorial_checkpoint = True
    tokenizer = load_tokenizer(tokenizer_source)
    if len(tokenizer) > model.config.vocab_size:
        raise ModelLoadError(
            f"토크나이저 어휘({len(tokenizer)})가 모델 어휘({model.config.vocab_size})보다 큽니다. "
            f"(tokenizer does not match the model)"
        )
    model = model.eval()
    if not isinstance(model, GPT2LM):  # transformers' model: a GPU, or a configuration the own tree does not serve
        from core.speedups import fuse_gelu, quantize_int8, rowwise_attention

        model = fuse_gelu(model)
        if device.type == "cpu":
            model = rowwise_attention(model)  # a row's numbers independent of its batch mates (seeds hold in any batch)
        if int8:
            model = quantize_int8(model)
    if int8:
        source += " (int8)"
    elif device.type != "cpu":
        dtype = model_dtype(device)
        model = model.to(device=device, dtype=dtype)
        source += f" ({device.type}, {str(dtype).removeprefix('torch.')})"
    sentiment = tutorial_checkpoint or bool(getattr(model.config, "sentiment_labels", None))
    if not sentiment:
        log.warning("%s carries no sentiment-label mark (core.train writes one): 긍정/부정 labels will not steer "
                    "it unless it was fine-tuned with label-prefixed reviews", source)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, sentiment=sentiment)


def _hub_snapshot(name: str) -> Path | None:
    """The local directory of a hub model's weights (the cache first, then one quick probe before a download, as
    every hub name is loaded): its safetensors, else its pytorch_model.bin; None when it has neither."""
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            path = load_named(lambda repo, file=filename, **kw: hub_file(repo, file, **kw), name)
        except ModelLoadError:
            raise
        except Exception:  # noqa: BLE001 (not to be had: the next, else from_pretrained loads what it has)
            continue
        if path is not None:
            return path.parent
    return None


def directory_weights(directory: Path) -> dict[str, StoredTensor] | None:
    """Every weight of a model directory, not read yet: its safetensors files (one or shards), else its
    `pytorch_model*.bin` files (memory-mapped, pickles refused as in read_state_dict); None when it has neither."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        return None
    state: dict[str, StoredTensor] = {}
    for file in files:
        state.update(safetensors_file(file) if file.suffix == ".safetensors" else read_state_dict(file))
    return state


def _from_pretrained(source: str, int8: bool = False, own: bool = True) -> nn.Module:
    broken = (f"{source}에서 모델을 불러올 수 없습니다: 가중치 파일이 손상되었거나 형식이 맞지 않습니다.",
              f"cannot load the model from {source}")
    config = load_config(source)
    if own and serves(config):
        directory = local_dir(source) or _hub_snapshot(source)
        state = _explained(lambda: directory_weights(directory), source, *broken) if directory else None
        if state is not None and (model := _explained(lambda: build(config, state.items(), int8), source, *broken)):
            return model
    # float32 whatever the saved dtype (the embedded model is stored as float16): CPU kernels want it.
    model_class = _transformers_gpt2()
    return _explained(
        lambda: load_named(lambda name, **kw: model_class.from_pretrained(name, dtype=torch.float32, **kw), source),
        source, *broken)


def _transformers_gpt2() -> type[nn.Module]:
    """transformers' GPT2LMHeadModel, imported only where it is used (its modeling code costs ~140 MB)."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel
