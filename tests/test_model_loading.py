"""Every checkpoint format the README promises loads through the real code; every failure is one clear sentence."""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from helpers import ROOT, subprocess_env
from safetensors.torch import save_file
from tiny_model import write_lightning_ckpt
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from core.errors import ModelLoadError
from core.gpt2_model import Linear1D
from core.model_loading import load_model, pick_checkpoint
from core.settings import ModelSettings


def _same_weights(a: GPT2LMHeadModel, b: GPT2LMHeadModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_base_model_when_checkpoint_empty(tiny_dir: Path):
    loaded = load_model(ModelSettings(pretrained=str(tiny_dir), quantize="none"))
    assert _same_weights(loaded.model, GPT2LMHeadModel.from_pretrained(tiny_dir))
    assert loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.decode(loaded.tokenizer("긍정 아 정말")["input_ids"]) == "긍정 아 정말"


def test_lightning_ckpt_with_optimizer_and_hparams(tiny_dir: Path, trained, tmp_path: Path):
    path = write_lightning_ckpt(trained, tmp_path / "epoch=2-val_loss=3.10.ckpt")
    loaded = load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(path), quantize="none"))
    assert _same_weights(loaded.model, trained)


def test_directory_of_ckpts_picks_lowest_val_loss(tiny_dir: Path, trained, tmp_path: Path):
    other = GPT2LMHeadModel.from_pretrained(tiny_dir)
    write_lightning_ckpt(other, tmp_path / "epoch=0-val_loss=4.20.ckpt")
    write_lightning_ckpt(trained, tmp_path / "epoch=1-val_loss=3.05.ckpt")
    write_lightning_ckpt(other, tmp_path / "epoch=2-val_loss=3.50.ckpt")
    assert pick_checkpoint(tmp_path).name == "epoch=1-val_loss=3.05.ckpt"
    loaded = load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(tmp_path), quantize="none"))
    assert _same_weights(loaded.model, trained)


def test_hugging_face_directory(tiny_dir: Path, trained, tmp_path: Path):
    trained.save_pretrained(tmp_path / "hf")
    loaded = load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(tmp_path / "hf"), quantize="none"))
    assert _same_weights(loaded.model, trained)


@pytest.mark.parametrize("prefix", ["", "model."])
def test_bare_state_dicts(tiny_dir: Path, trained, tmp_path: Path, prefix: str):
    state = {prefix + k: v.clone() for k, v in trained.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "weights.bin")
    save_file(state, str(tmp_path / "weights.safetensors"))
    for name in ("weights.bin", "weights.safetensors"):
        loaded = load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(tmp_path / name), quantize="none"))
        assert _same_weights(loaded.model, trained)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_crafted_pickle_is_refused(tiny_dir: Path, trained, tmp_path: Path, capsys):
    state = {"state_dict": trained.state_dict(), "payload": _Exploit()}
    torch.save(state, tmp_path / "evil.ckpt")
    with pytest.raises(ModelLoadError, match="허용되지 않은.*builtins.print"):
        load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(tmp_path / "evil.ckpt")))
    assert "pwned" not in capsys.readouterr().out


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda d: d / "missing.ckpt", "없습니다.*not found"),
        (lambda d: _write(d / "junk.ckpt", b"hello"), "체크포인트가 아닙니다|읽을 수 없습니다"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "\\.ckpt 파일이 없습니다"),
        (lambda d: torch.save({"epoch": 1}, d / "nostate.ckpt") or d / "nostate.ckpt", "state_dict"),
        (lambda d: _write(d / "bad.safetensors", b"\x00" * 10), "safetensors"),
    ],
)
def test_unusable_checkpoints_fail_with_one_sentence(tiny_dir: Path, tmp_path: Path, make, pattern):
    path = make(tmp_path)
    with pytest.raises(ModelLoadError, match=pattern) as info:
        load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(path)))
    assert "Traceback" not in str(info.value)


def test_mismatched_shapes_and_keys_name_the_first_offender(tiny_dir: Path, trained, tmp_path: Path):
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    state["transformer.wpe.weight"] = torch.zeros(8, 32)
    torch.save(state, tmp_path / "shape.bin")
    with pytest.raises(ModelLoadError, match="'transformer.wpe.weight'.*크기"):
        load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(tmp_path / "shape.bin")))
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    state["transformer.h.9.mlp.c_fc.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "keys.bin")
    with pytest.raises(ModelLoadError, match="transformer.h.9.mlp.c_fc.weight"):
        load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(tmp_path / "keys.bin")))
    state = {k: v.clone() for k, v in trained.state_dict().items() if k != "transformer.ln_f.weight"}
    torch.save(state, tmp_path / "missing.bin")
    with pytest.raises(ModelLoadError, match="transformer.ln_f.weight"):
        load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(tmp_path / "missing.bin")))


def test_unreachable_hub_says_how_to_use_a_local_directory(monkeypatch):
    # The hub is unreachable here anyway; offline mode makes it fail at once instead of after retries.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="model.pretrained") as info:
        load_model(ModelSettings(pretrained="skt/kogpt2-base-v2"))
    assert "BOT_MODEL__PRETRAINED" in str(info.value)


# A fresh process's check that the hub name `someone/tiny-kogpt2` loads the embedded model's weights and tokenizer.
_HUB_EQUALS_LOCAL = (
    "import sys, torch\n"
    "from core.model_loading import load_model\nfrom core.settings import ModelSettings\n"
    "ids = torch.tensor([[5, 6, 7, 8]])\n"
    "hub = load_model(ModelSettings(pretrained='someone/tiny-kogpt2'))\n"
    "local = load_model(ModelSettings(pretrained='models/nsmc-small'))\n"
    "assert torch.equal(hub.model(ids).logits, local.model(ids).logits)\n"
    "text = '긍정 아 정말 재밌다 </s>'\n"
    "assert hub.tokenizer(text)['input_ids'] == local.tokenizer(text)['input_ids']\n"
)


def test_a_hub_name_in_the_local_cache_loads_without_transformers_or_the_hub_client(tmp_path: Path):
    """A hub name already in the Hugging Face cache (its documented layout: refs/main names the snapshot, a
    `.no_exist` entry records a file the repository lacks) loads offline in a fresh process, the same model and
    tokenizer as its directory, without importing transformers or huggingface_hub's download code."""
    repo, commit = tmp_path / "models--someone--tiny-kogpt2", "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(ROOT / "models" / "nsmc-small", repo / "snapshots" / commit)
    (repo / "snapshots" / commit / "tokenizer_config.json").unlink()  # an optional file the snapshot lacks
    (repo / ".no_exist" / commit).mkdir(parents=True)
    (repo / ".no_exist" / commit / "special_tokens_map.json").touch()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = _HUB_EQUALS_LOCAL + (
        "print(hub.source, sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'"
        " or m == 'huggingface_hub.file_download'))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=subprocess_env(HF_HUB_CACHE=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "someone/tiny-kogpt2 (int8) []"


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The two hub routes loading uses: the reachability probe and `resolve/main/<file>` (a file's metadata by HEAD,
    its bytes by GET; a file the repository lacks is a 404 with the hub's EntryNotFound code)."""

    repository: Path
    commit = "89abcdef0123456789abcdef0123456789abcdef"

    def _answer(self, body: bool) -> None:
        if self.path.startswith("/api/models/"):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        name = self.path.partition("/resolve/main/")[2]
        path = self.repository / name
        if not name or not path.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._answer(False)

    def do_GET(self) -> None:
        self._answer(True)

    def log_message(self, *args: object) -> None:
        pass


def test_a_hub_name_is_downloaded_once_then_served_from_the_cache(tmp_path: Path):
    """A hub name not cached is downloaded (huggingface_hub's client, imported for that) into the cache, the same
    model and tokenizer as its directory; the next start finds it there without the hub or the client."""
    handler = type("Hub", (_FakeHub,), {"repository": ROOT / "models" / "nsmc-small"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = _HUB_EQUALS_LOCAL + (
        "print(hub.source, 'transformers' in sys.modules, 'huggingface_hub.file_download' in sys.modules)\n"
    )
    try:
        env = {**subprocess_env(HF_HUB_CACHE=str(tmp_path / "cache"), NO_PROXY="127.0.0.1,localhost",
                                HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", no_proxy="127.0.0.1,localhost"),
               "HF_HUB_OFFLINE": "0"}
        first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                               env=env)
    finally:
        server.shutdown()
        server.server_close()
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == "someone/tiny-kogpt2 (int8) False True"
    snapshot = tmp_path / "cache" / "models--someone--tiny-kogpt2" / "snapshots" / _FakeHub.commit
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"}
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**env, "HF_HUB_OFFLINE": "1"})  # the hub is gone now
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().splitlines()[-1] == "someone/tiny-kogpt2 (int8) False False"


def test_a_cached_snapshot_without_the_weights_still_needs_the_hub(tmp_path: Path, monkeypatch):
    """A cached snapshot without the weights still needs the hub: offline, that is the one sentence it always was."""
    import huggingface_hub.constants

    repo, commit = tmp_path / "models--someone--partial", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(ROOT / "models" / "nsmc-small" / "config.json", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="model.pretrained"):
        load_model(ModelSettings(pretrained="someone/partial"))


def test_quantize_auto_is_int8_on_the_cpu_and_keeps_no_fp32_linear(tiny_dir: Path):
    loaded = load_model(ModelSettings(pretrained=str(tiny_dir)))  # the defaults: device auto, quantize auto
    assert loaded.source.endswith("(int8)")
    assert not any(type(m) in (torch.nn.Linear, Conv1D, Linear1D) for m in loaded.model.modules())


def test_int8_while_loading_matches_quantizing_the_fp32_model(tiny_dir: Path):
    """Quantizing each layer as it is read gives the model quantizing the whole fp32 model gives."""
    from core.speedups import fuse_gelu, quantize_int8

    reference = quantize_int8(fuse_gelu(GPT2LMHeadModel.from_pretrained(tiny_dir).eval()))
    ours = load_model(ModelSettings(pretrained=str(tiny_dir), quantize="int8")).model
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(ours(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_cuda_without_a_gpu_is_one_clear_sentence(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="model.device.*cuda"):
        load_model(ModelSettings(pretrained=str(tiny_dir), device="cuda"))


# ---- start-up faults are one sentence, never a library's traceback (issue 12, item 8) ------------------------------
def test_corrupt_model_safetensors_is_one_sentence(tiny_dir: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 1000)
    with pytest.raises(ModelLoadError, match="손상") as info:
        load_model(ModelSettings(pretrained=str(broken)))
    assert str(broken) in str(info.value)


def test_pretrained_pointing_at_a_file_says_which_setting_to_use(tiny_dir: Path):
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelSettings(pretrained=str(tiny_dir / "model.safetensors")))
    message = str(info.value)
    assert "model.checkpoint" in message and "weights_only" not in message


def test_picked_checkpoint_is_logged_with_how_many_were_compared(tiny_dir: Path, trained, tmp_path: Path, caplog):
    for i, loss in enumerate(["4.20", "3.05", "3.50"]):
        write_lightning_ckpt(trained, tmp_path / f"epoch={i}-val_loss={loss}.ckpt")
    with caplog.at_level(logging.INFO, logger="core.model_loading"):
        pick_checkpoint(tmp_path)
    assert "picked epoch=1-val_loss=3.05.ckpt (lowest val_loss of 3)" in caplog.text


def test_unreadable_model_file_is_a_permission_problem_naming_file_and_uid(tiny_dir: Path):
    """As another user (root reads everything), the way a container's uid meets a host file of mode 600."""
    shared = Path(tempfile.mkdtemp(prefix="perm-"))
    try:
        shared.chmod(0o755)
        model = shared / "model"
        shutil.copytree(tiny_dir, model)
        for f in model.iterdir():
            f.chmod(0o644)
        (model / "model.safetensors").chmod(0o600)
        uid = os.getuid() if os.getuid() != 0 else 65534
        out = as_user(uid, "from core.model_loading import load_model; from core.settings import ModelSettings",
                      f"load_model(ModelSettings(pretrained={str(model)!r}))")
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert "ModelLoadError" in last and "model.safetensors" in last and f"uid {uid}" in last, out.stderr
        assert "No such file" not in out.stderr
    finally:
        shutil.rmtree(shared)


def as_user(uid: int, imports: str, code: str) -> subprocess.CompletedProcess:
    """Run `imports`, then become `uid` (when we are root; this Python's own files may be root's only), then `code`."""
    if os.getuid() != 0 and uid != os.getuid():
        pytest.skip("needs root to switch users")
    script = f"import os\n{imports}\nif os.getuid() != {uid}:\n    os.setuid({uid})\n{code}\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=subprocess_env(),
                          cwd=ROOT)


def test_int8_from_safetensors_never_builds_the_fp32_model(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Quantized while loading: each layer is read and quantized alone (the peak-memory promise)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole fp32 model was loaded")

    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", refuse)
    loaded = load_model(ModelSettings(pretrained=str(tiny_dir), quantize="int8"))
    assert not any(p.is_meta for p in loaded.model.parameters())
    assert loaded.model.lm_head.int8_weight.dtype == torch.int8
    assert torch.isfinite(loaded.model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
