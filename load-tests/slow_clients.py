#!/usr/bin/env python3
"""RSS of `keybrake serve` while 1,000 slow clients hold proxy connections.

Each client opens a connection to the proxy (127.0.0.1 only), sends `HEADER_BYTES` of a
request header that never ends (a long `X-Pad` field) as fast as the proxy reads it,
then one more byte every `TRICKLE` s; when the proxy closes the connection the client
opens a new one after 0.5 s, as an attacker would. Every second the script samples the
proxy's resident memory (VmRSS) and the clients' open connections; it prints the
baseline, the peak and the last sample.

    cargo build --release --bin keybrake
    load-tests/slow_clients.py                        # 1,000 clients, 1 MB headers, 30 s
    CLIENTS=1000 HEADER_BYTES=30000 DURATION=30 load-tests/slow_clients.py

Environment: KB_BIN (default target/release/keybrake), CLIENTS (1000), HEADER_BYTES
(1000000), TRICKLE (1.0), DURATION (30, at most 300), CONFIG (a keybrake.yaml to use).
Standard library only; stops the server and removes its temp dir on exit.
"""

import asyncio
import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KB_BIN = Path(os.environ.get("KB_BIN", ROOT / "target" / "release" / "keybrake")).resolve()
CLIENTS = int(os.environ.get("CLIENTS", "1000"))
HEADER_BYTES = int(os.environ.get("HEADER_BYTES", "1000000"))
TRICKLE = float(os.environ.get("TRICKLE", "1.0"))
DURATION = min(float(os.environ.get("DURATION", "30")), 300.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Clients:
    def __init__(self, port: int):
        self.port = port
        self.open = 0
        self.closed_by_server = 0
        self.stop = False

    async def one(self) -> None:
        head = b"GET /stripe/v1/customers HTTP/1.1\r\nHost: x\r\nX-Pad: "
        while not self.stop:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            self.open += 1
            try:
                writer.write(head)
                sent = 0
                chunk = b"a" * 16384
                while sent < HEADER_BYTES and not self.stop:
                    n = min(len(chunk), HEADER_BYTES - sent)
                    writer.write(chunk[:n])
                    await asyncio.wait_for(writer.drain(), 10)
                    sent += n
                while not self.stop:
                    try:
                        if not await asyncio.wait_for(reader.read(4096), TRICKLE):
                            break
                    except asyncio.TimeoutError:
                        writer.write(b"a")
                        await writer.drain()
            except (OSError, asyncio.TimeoutError):
                pass
            finally:
                self.open -= 1
                writer.close()
            if not self.stop:
                self.closed_by_server += 1
                await asyncio.sleep(0.5)


async def run(pid: int, port: int) -> None:
    clients = Clients(port)
    tasks = []
    for _ in range(CLIENTS):
        tasks.append(asyncio.create_task(clients.one()))
        await asyncio.sleep(0.001)
    baseline = samples = None
    peak = (0.0, 0)
    started = time.monotonic()
    while time.monotonic() - started < DURATION:
        await asyncio.sleep(1)
        sample = (rss_mib(pid), clients.open)
        samples = sample
        if sample[0] > peak[0]:
            peak = sample
        print(f"  t={time.monotonic() - started:4.0f}s  rss {sample[0]:7.1f} MiB  open {sample[1]:5d}", flush=True)
    clients.stop = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"peak rss {peak[0]:.1f} MiB (with {peak[1]} open); last {samples[0]:.1f} MiB with {samples[1]} open;"
          f" connections closed by the proxy: {clients.closed_by_server}")


def main() -> int:
    if not KB_BIN.exists():
        print(f"missing {KB_BIN}: cargo build --release --bin keybrake", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="keybrake-slow."))
    proc = None
    try:
        port, control, metrics = free_port(), free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
        env["KEYBRAKE_ADMIN_TOKEN"] = "adm_" + secrets.token_hex(16)
        env["KEYBRAKE_MASTER_KEY"] = base64.b64encode(secrets.token_bytes(32)).decode()
        cmd = [str(KB_BIN), "serve", "--data-dir", str(tmp / "data"),
               "--proxy-listen", f"127.0.0.1:{port}", "--control-listen", f"127.0.0.1:{control}",
               "--metrics-listen", f"127.0.0.1:{metrics}"]
        if os.environ.get("CONFIG"):
            cmd += ["--config", os.environ["CONFIG"]]
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                                stderr=open(tmp / "keybrake.err", "wb"))
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            print("keybrake did not start:\n" + (tmp / "keybrake.err").read_text()[-2000:], file=sys.stderr)
            return 1
        time.sleep(0.5)
        print(f"{KB_BIN}: {CLIENTS} slow clients, {HEADER_BYTES} header bytes each, then a byte every "
              f"{TRICKLE} s, {DURATION:.0f} s; baseline rss {rss_mib(proc.pid):.1f} MiB", flush=True)
        asyncio.run(run(proc.pid, port))
        return 0
    finally:
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
