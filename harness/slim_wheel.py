"""Slim a Ray wheel for carrying to a machine with no package index: drop the parts a local cluster that
runs tasks and actors never imports (the Java jar, the dashboard's web client, RLlib, Serve, Data, Tune,
Train, LLM), keep RECORD consistent (the dropped files' lines go, the others keep their hashes).

    python -m harness.slim_wheel IN.whl OUT_DIR
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/serve/", "ray/data/", "ray/tune/",
        "ray/train/", "ray/llm/", "ray/workflow/")


def dropped(name: str) -> bool:
    return name.startswith(DROP) or name.endswith(".js.map")


def slim(source: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / source.name
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if line and not dropped(line.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return target


if __name__ == "__main__":  # pragma: no cover
    path = slim(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{path} {path.stat().st_size / 2**20:.1f} MiB")
