"""The `sdrt` command in a subprocess, and the shape of a clean error."""
# Output is decoded as UTF-8, not by the locale: a library imported during the run may set it to C.

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def sdrt(*args, blocked: Path | None = None, cwd: Path | None = None, cache_dir: Path | None = None, env: dict | None = None,
         timeout: float = 600):
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None: unset
    if cache_dir:
        env["SDRT_CACHE_DIR"] = str(cache_dir)
    if blocked:
        env["PYTHONPATH"] = os.pathsep.join([str(blocked), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "sdrt.cli", *map(os.fsencode, args)], capture_output=True, encoding="utf-8", env=env, cwd=cwd,
                          timeout=timeout)


def sdrt_background(*args, cache_dir: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, **({"SDRT_CACHE_DIR": str(cache_dir)} if cache_dir else {})}
    return subprocess.Popen([sys.executable, "-m", "sdrt.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", env=env)


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdrt: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def generate(engines: Path, load: dict | None = None, **kwargs):
    """The images of one request through the Python API (`load`: from_engine_folder's options), the folder closed after."""
    from sdrt.pipeline import GenerateRequest, StableDiffusion

    pipe = StableDiffusion.from_engine_folder(engines, **(load or {}))
    try:
        return pipe.generate(GenerateRequest(**{"prompt": "a lighthouse at dusk", "seed": 3, **kwargs}), progress=False)
    finally:
        pipe.close()


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    """`sdrt ARGS` through sdrt.cli.main in this process: the same code as the command, without a process start."""
    from sdrt.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engines: Path, *args, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """`sdrt serve ENGINES ARGS` on a free port, once /health answers -> (process, base URL)."""
    import httpx

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", str(engines), "--port", str(port), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"sdrt serve did not start: {process.communicate()}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=60)
