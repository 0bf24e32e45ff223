"""``k25jax serve`` as a process: it binds 127.0.0.1, serves the openai client, and on SIGTERM lets an in-flight
stream finish before it exits."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def test_serve_command_drains_on_sigterm():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [
        sys.executable,
        "-m",
        "k25jax.cli",
        "serve",
        "--model",
        "tiny-random",
        "--port",
        str(port),
        "--max-slots",
        "2",
        "--max-context",
        "256",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.time() + 240
        while time.time() < end:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise AssertionError("the server did not come up")
        body = {
            "model": "k25jax-tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 230,
            "stream": True,
            "temperature": 0,
        }
        lines: list[str] = []
        times: list[float] = []
        first = threading.Event()

        def read():
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        times.append(time.monotonic())
                    first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(120)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        reader.join(120)
        assert proc.wait(120) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
        assert lines[-1] == "data: [DONE]" and times[-1] > signalled  # the stream went on after SIGTERM
        finals = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert finals[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        out = proc.stdout.read()
        assert f"http://127.0.0.1:{port}/v1" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
