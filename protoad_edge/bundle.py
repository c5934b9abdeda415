"""A model bundle on disk: the files that share one stem, named in one table.

``protoad-export --out OUT`` writes ``OUT/NAME.onnx``, ``NAME.json`` (the sidecar: ModelInfo) and
``NAME.prototypes.npy``; the TensorRT step adds ``NAME.plan`` and ``NAME.timing.cache``, and on
TensorRT 11 ``NAME.fp16.onnx``. A new artefact (another precision) is one more row in ``FILES``.
Any file of a bundle names the whole bundle. No torch here: the runtime uses it.

The files belong together by content, not by name: the sidecar records the sha256 of each file the bundle was
written with (``seal``, by every step that writes one), and every command checks the file it runs against it
(``check``), so an ONNX or plan copied over from another build is refused instead of running with this bundle's
thresholds. A file changed on purpose is recorded again with ``protoad-export --from-onnx NAME.onnx --reseal``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ProtoADError
from .metadata import ModelInfo

# Kind -> suffix. Parsing tries the longest suffix first (``x.fp16.onnx`` is not ``x.fp16`` + ``.onnx``).
FILES = {
    "onnx": ".onnx",
    "fp16_onnx": ".fp16.onnx",
    "int8_onnx": ".int8.onnx",
    "plan": ".plan",
    "sidecar": ".json",
    "prototypes": ".prototypes.npy",
    "timing_cache": ".timing.cache",
    "projection": ".projection.npz",
}
# The files whose digests the sidecar records: all but itself and the timing cache (a build-time cache that
# TensorRT rewrites, which decides no result).
SEALED = ("onnx", "fp16_onnx", "int8_onnx", "plan", "prototypes", "projection")
RESEAL = "protoad-export --from-onnx {onnx} --reseal"
HASH_CHUNK = 1 << 20
_WARNED: set[Path] = set()  # sidecars without digests already named: one warning each, however often opened
DEFAULT_FOLDER = Path("models")
# The sidecar fields that must equal the ONNX metadata: they decide the input and the network. The
# thresholds, TensorRT build facts and the free-form ``build`` dict change in the sidecar after the build
# (``protoad-eval --set-threshold``, the engine step), so the sidecar is what is in force.
IDENTITY_FIELDS = (
    "format",
    "category",
    "resize",
    "crop",
    "roi",
    "fit",
    "backbone",
    "weights",
    "feature_upsample",
    "num_prototypes",
    "blur_sigma",
    "input_name",
    "outputs",
    "opset",
    "seed",
    "projection",
)


@dataclass(frozen=True)
class Bundle:
    """The bundle ``stem`` (``models/cable``): every file's path, and its metadata."""

    stem: Path

    @property
    def name(self) -> str:
        return self.stem.name

    def file(self, kind: str) -> Path:
        return self.stem.with_name(self.stem.name + FILES[kind])

    @property
    def onnx(self) -> Path:
        return self.file("onnx")

    @property
    def fp16_onnx(self) -> Path:
        return self.file("fp16_onnx")

    @property
    def plan(self) -> Path:
        return self.file("plan")

    @property
    def sidecar(self) -> Path:
        return self.file("sidecar")

    @property
    def prototypes(self) -> Path:
        return self.file("prototypes")

    @property
    def timing_cache(self) -> Path:
        return self.file("timing_cache")

    @classmethod
    def of(cls, path: str | os.PathLike) -> Bundle:
        """The bundle a file belongs to (the file need not exist)."""
        path = Path(path)
        kind = kind_of(path)
        if kind is None:
            raise ProtoADError(f"{path}: not a file of a model bundle (expected NAME{', NAME'.join(_by_length())})")
        return cls(path.with_name(path.name[: -len(FILES[kind])]))

    def info(self) -> ModelInfo:
        """The metadata: the sidecar if present, else the ONNX ``metadata_props`` (read with onnxruntime)."""
        if self.sidecar.is_file():
            return ModelInfo.load_json(self.sidecar)
        if not self.onnx.is_file():
            raise ProtoADError(f"model bundle {self.stem}: neither {self.sidecar.name} nor {self.onnx.name} exists")
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(self.onnx), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ProtoADError(f"cannot read ONNX model {self.onnx}: {str(exc).splitlines()[0]}") from None
        return ModelInfo.from_props(session.get_modelmeta().custom_metadata_map, f"ONNX metadata of {self.onnx}")

    def in_force(self, embedded: ModelInfo, model: Path) -> ModelInfo:
        """The metadata in force for ``model``, whose own copy is ``embedded`` (the ONNX metadata): the
        sidecar's where there is one (it carries thresholds set after the build), after checking that it
        describes the same network and input - a stale or swapped sidecar is refused."""
        if not self.sidecar.exists():
            return embedded
        side = ModelInfo.load_json(self.sidecar)
        differ = [
            f"{name} {getattr(side, name)!r} vs {getattr(embedded, name)!r}"
            for name in IDENTITY_FIELDS
            if not _same(getattr(side, name), getattr(embedded, name))
        ]
        if differ:
            raise ProtoADError(
                f"model sidecar {self.sidecar} does not match {model} ({'; '.join(differ)}): "
                "restore the pair the build wrote, or delete the stale sidecar"
            )
        return side

    def seal(self, info: ModelInfo, kinds: tuple[str, ...] = SEALED) -> ModelInfo:
        """``info`` with the digests of this bundle's files of ``kinds`` as they are now (a missing one is
        dropped). Sealing every kind starts afresh; a writer of some files adds theirs to digests already
        recorded, and leaves an unsealed sidecar unsealed (sealing a stranger beside it would vouch for it)."""
        if kinds != SEALED and info.digests is None:
            return info
        digests = {} if kinds == SEALED else dict(info.digests or {})
        for kind in kinds:
            digests.pop(kind, None)
            if self.file(kind).is_file():
                digests[kind] = sha256(self.file(kind))
        return dataclasses.replace(info, digests=dict(sorted(digests.items())))

    def check(self, path: str | os.PathLike) -> None:
        """Refuse ``path``, the file about to run, when the sidecar records another digest for it, or none while
        recording others; the torch backend runs the sidecar with the prototypes (and projection), checked here.
        A bundle without sidecar has nothing to check against (its ONNX carries its own metadata); a sidecar
        without digests (written before schema 3) passes with one warning line."""
        path = Path(path)
        kind = kind_of(path)
        if kind is None or not self.sidecar.is_file():
            return
        info = ModelInfo.load_json(self.sidecar)
        kinds = (kind,) if kind != "sidecar" else ("prototypes", "projection") if info.projection else ("prototypes",)
        if info.digests is None:
            if self.sidecar not in _WARNED:
                _WARNED.add(self.sidecar)
                print(
                    f"warning: {self.sidecar} records no file digests (written before protoad-edge checked them), "
                    f"so nothing shows that {path} belongs to it; record them with {self.reseal_command}",
                    file=sys.stderr,
                    flush=True,
                )
            return
        for kind in kinds:
            file = self.file(kind)
            if not file.is_file():
                continue  # the backend says so in its own words
            recorded = info.digests.get(kind)
            if recorded is None:
                why = "records no digest for it: it was not written with this bundle"
            else:
                found = sha256(file)
                if found == recorded:
                    continue
                why = f"records sha256 {recorded[:12]}..., the file has {found[:12]}...: it was replaced since"
            restore = (
                f"rebuild the plan with protoad-export --from-onnx {self.onnx}"
                if kind == "plan"
                else "put back the file written with the bundle, or rebuild the bundle"
            )
            raise ProtoADError(
                f"{file} does not match {self.sidecar}, which {why}. To run it, {restore}; if it was "
                f"changed on purpose, run {self.reseal_command}"
            )

    @property
    def reseal_command(self) -> str:
        return RESEAL.format(onnx=self.onnx)

    def reseal(self) -> list[str]:
        """Record the digests of the bundle's files as they are now in its sidecar (after a file was changed on
        purpose: ``RESEAL``); one line per file saying what changed. Whether the files fit together is still
        checked when they run (``in_force``: the ONNX metadata against the sidecar; the plan by TensorRT)."""
        if not self.sidecar.is_file():
            raise ProtoADError(
                f"{self.sidecar} not found: only a sidecar records digests (without one, "
                f"{self.onnx} runs from its own metadata)"
            )
        old = ModelInfo.load_json(self.sidecar)
        new = self.seal(old)
        before, after = old.digests or {}, new.digests or {}
        lines = []
        for kind in SEALED:
            was, now = before.get(kind), after.get(kind)
            if was is None and now is None:
                continue
            what = (
                "unchanged"
                if was == now
                else "dropped: no such file"
                if now is None
                else "new"
                if was is None
                else f"was {was[:12]}..."
            )
            lines.append(f"{self.file(kind)}" + (f" sha256 {now[:12]}..." if now else "") + f" ({what})")
        new.save_json(self.sidecar)
        return lines


def sha256(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), read in 1 MiB chunks: an ONNX of many prototypes is hundreds of MB."""
    digest = hashlib.sha256()
    chunk = bytearray(HASH_CHUNK)
    view = memoryview(chunk)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(chunk):
            digest.update(view[:n])
    return digest.hexdigest()


def kind_of(path: str | os.PathLike) -> str | None:
    """Which file of a bundle ``path`` is (``onnx``, ``plan``, ...), or None."""
    name = Path(path).name
    for suffix in _by_length():
        if name.endswith(suffix) and len(name) > len(suffix):
            return next(kind for kind, s in FILES.items() if s == suffix)
    return None


def _by_length() -> list[str]:
    return sorted(FILES.values(), key=len, reverse=True)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def locate(
    model: str | os.PathLike | None, category: str | None = None, folder: str | os.PathLike = DEFAULT_FOLDER
) -> tuple[Bundle, Path | None]:
    """(bundle, the file the user named or None) for ``--model``.

    ``model`` is any file of a bundle, a folder holding ``CATEGORY.*`` (with ``category``), or None:
    the single bundle in ``folder`` (several is an error that lists them: guessing which product
    line to inspect is unsafe).
    """
    if model is not None:
        path = Path(model)
        if path.is_dir():
            if not category:
                raise ProtoADError(f"--model {path} is a folder: name the category to pick CATEGORY.* in it")
            bundle = Bundle(path / category)
            if not any(bundle.file(kind).is_file() for kind in FILES):
                raise ProtoADError(f"no model bundle {category}.* in {path}")
            return bundle, None
        if not path.is_file():
            raise ProtoADError(f"model not found: {path}")
        return Bundle.of(path), path
    folder = Path(folder)
    if not folder.is_dir():
        raise ProtoADError(f"no --model given and no {folder}/ folder here: pass --model PATH")
    stems = sorted(
        {
            Bundle.of(p).stem
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and kind_of(p) in ("onnx", "plan", "sidecar")
        }
    )
    if not stems:
        raise ProtoADError(
            f"no --model given and no model bundle (NAME.onnx, .plan or .json) in {folder}/: pass --model PATH"
        )
    if len(stems) > 1:
        names = [
            next(Bundle(s).file(k) for k in ("onnx", "plan", "sidecar") if Bundle(s).file(k).is_file()) for s in stems
        ]
        raise ProtoADError(f"several models in {folder}/, choose one with --model: {', '.join(map(str, names))}")
    return Bundle(stems[0]), None
