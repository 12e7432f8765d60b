"""The peers edge is compared with: thumbor (Pillow) and ipx (sharp / libvips).

Both are installed on demand into bench/.scratch (thumbor into its own virtualenv with
pip, ipx with npm), never as dependencies of edge, and served on loopback over the
same folder of originals. Each peer gets its fastest sensible configuration for the
workload: thumbor one process per core, no storage, no result storage, baseline JPEG
(edge's default too); ipx as it ships (sharp sizes its own thread pool).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass

from harness import BENCH, ORIGIN, SCRATCH, Server, cores, free_port

THUMBOR_VENV = SCRATCH / "thumbor-venv"
NODE_DIR = SCRATCH / "node"
IPX_SCRIPT = BENCH / "ipx_server.cjs"
INSTALL_TIMEOUT = 900

#: the quality edge uses per output format for the W2 requests (no quality given)
W2_QUALITY = {"jpeg": 80, "webp": 80, "avif": 60}


class PeerUnavailable(Exception):
    """The peer could not be installed or started here; the reason is the message."""


@dataclass(frozen=True)
class Peer:
    name: str
    server: Server

    def w1_path(self, key: str) -> str:
        if self.name == "thumbor":
            return f"/unsafe/fit-in/720x588/filters:quality(80):format(jpeg)/{key}"
        return f"/s_720x588,fit_inside,f_jpeg,q_80/{key}"

    def w2_path(self, key: str, fmt: str) -> str:
        quality = W2_QUALITY[fmt]
        if self.name == "thumbor":
            return f"/unsafe/fit-in/512x512/filters:quality({quality}):format({fmt})/{key}"
        return f"/s_512x512,fit_inside,f_{fmt},q_{quality}/{key}"


def _run(argv: list[str], log_name: str) -> None:
    log = SCRATCH / log_name
    try:
        with log.open("w") as handle:
            subprocess.run(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=INSTALL_TIMEOUT,
                check=True,
            )
    except (OSError, subprocess.SubprocessError) as error:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise PeerUnavailable(
            f"{' '.join(argv[:4])} failed ({error}): {' | '.join(tail)}"
        ) from error


def thumbor() -> Peer:
    """thumbor with one process per core, the file loader and no storage of any kind."""
    binary = THUMBOR_VENV / "bin" / "thumbor"
    if not binary.exists():
        print("  installing thumbor into bench/.scratch/thumbor-venv ...", flush=True)
        _run([sys.executable, "-m", "venv", "--clear", str(THUMBOR_VENV)], "thumbor-venv.log")
        _run([str(THUMBOR_VENV / "bin" / "pip"), "install", "-q", "thumbor"], "thumbor-pip.log")
    if not binary.exists():
        raise PeerUnavailable("thumbor's installation left no thumbor command")
    config = SCRATCH / "thumbor.conf"
    config.write_text(
        "\n".join(
            [
                "LOADER = 'thumbor.loaders.file_loader'",
                f"FILE_LOADER_ROOT_PATH = {str(ORIGIN)!r}",
                "STORAGE = 'thumbor.storages.no_storage'",
                "RESULT_STORAGE = None",
                "ALLOW_UNSAFE_URL = True",
                "QUALITY = 80",
                "PROGRESSIVE_JPEG = False",
                # libvips' AVIF effort 0 (edge's) is aom speed 9
                "AVIF_SPEED = 9",
                "MAX_AGE = 86400",
                "",
            ]
        )
    )
    port = free_port()
    server = Server(
        name="thumbor",
        argv=[
            str(binary),
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--conf",
            str(config),
            "--processes",
            str(cores()),
            "--log-level",
            "error",
        ],
        port=port,
        health_path="/healthcheck",
    )
    return Peer("thumbor", server)


def ipx() -> Peer:
    """ipx 3 (sharp) over the origin folder, from a tiny listener script."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise PeerUnavailable("node and npm are not installed (Debian: apt-get install npm)")
    if not (NODE_DIR / "node_modules" / "ipx" / "package.json").exists():
        print("  installing ipx into bench/.scratch/node ...", flush=True)
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        _run(
            [npm, "install", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "ipx@3"],
            "ipx-npm.log",
        )
    port = free_port()
    server = Server(
        name="ipx",
        argv=[node, str(IPX_SCRIPT)],
        port=port,
        env={
            "IPX_DIR": str(ORIGIN),
            "PORT": str(port),
            "NODE_PATH": str(NODE_DIR / "node_modules"),
        },
        health_path="/",
    )
    return Peer("ipx", server)
