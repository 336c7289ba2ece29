"""The versioned model registry.

Layout under the store's root (a local folder or an S3 prefix):

    models/{name}/{version}/model.pt         TorchScript, uint8 images in, probabilities out
    models/{name}/{version}/model.onnx       or an imported ONNX model, fed by its `tensor`
                                             contract (then there is no model.pt)
    models/{name}/{version}/forms/{form}/... compiled forms (OpenVINO IR), listed in the manifest
    models/{name}/{version}/manifest.json    written last: a version exists once it is there
    models/{name}/aliases/{alias}.json       {"version": "3"}; aliases move, versions never do;
                                             during a rollout also a `canary` and a `shadow`
                                             (`perito_core.models.rollout`)

Versions are 1, 2, 3 ... and immutable. `latest` is implicit: always the highest version.
Fetched artifacts are cached on local disk and their sha256 is checked against the manifest
before every load: a file that does not match is refused, never loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from perito_core.digests import sha256_hex
from perito_core.errors import (
    AlreadyExists,
    ArtifactIntegrityError,
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    echo,
)
from perito_core.models.card import (
    Calibration,
    DriftReference,
    Metrics,
    QualityThresholds,
    Source,
    TrainingRecord,
)
from perito_core.models.manifest import (
    ARTIFACT_FILES,
    Artifact,
    ArtifactFormat,
    CompiledForm,
    InputContract,
    ModelManifest,
    TensorContract,
    sha256_file,
)
from perito_core.models.rollout import AliasRoute, Canary, Shadow, check_percent, check_sample
from perito_core.storage import ObjectStore, S3Options, open_store

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,9}$")
LATEST = "latest"


@dataclass(frozen=True)
class LocalArtifact:
    """A verified model file on local disk and its manifest."""

    path: Path
    manifest: ModelManifest


@dataclass(frozen=True)
class LocalForm:
    """A compiled form's files on local disk, each sha256-verified against the manifest."""

    form: CompiledForm
    paths: list[Path]


def validate_model_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"invalid model name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'",
            field="model",
        )
    return name


class ModelRegistry:
    """Publish, list, resolve and fetch model versions.

    Args:
        store: where the registry lives.
        cache_dir: where fetched artifacts are kept on local disk.
    """

    def __init__(self, store: ObjectStore, cache_dir: Path) -> None:
        self.store = store
        store_id = sha256_hex(store.description.encode())[:12]
        self.cache_dir = cache_dir / store_id

    @classmethod
    def open(
        cls, uri: str, *, cache_dir: Path | None = None, s3: S3Options | None = None
    ) -> ModelRegistry:
        """Open the registry at `s3://bucket/prefix`, `file:///path` or a plain path."""
        cache = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return cls(open_store(uri, s3), cache / "perito" / "models")

    @property
    def description(self) -> str:
        return self.store.description

    # Reading

    def list_models(self) -> list[str]:
        return [n for n in self.store.list_children("models") if NAME_PATTERN.fullmatch(n)]

    def list_versions(self, name: str) -> list[str]:
        """Published versions, oldest first. A version without a manifest is not published."""
        validate_model_name(name)
        numbers = [
            int(child)
            for child in self.store.list_children(f"models/{name}")
            if child.isdigit() and not child.startswith("0")
        ]
        return [
            str(n) for n in sorted(numbers) if self.store.exists(f"models/{name}/{n}/manifest.json")
        ]

    def aliases(self, name: str) -> dict[str, str]:
        """Alias -> version. Stored entries whose name or target is not valid (written by
        something else than this class) are left out.

        Raises:
            InvalidArgument: an invalid model name.
        """
        validate_model_name(name)
        result: dict[str, str] = {}
        for child in self.store.list_children(f"models/{name}/aliases"):
            alias = child.removesuffix(".json")
            if child.endswith(".json") and ALIAS_PATTERN.fullmatch(alias) and alias != LATEST:
                try:
                    result[alias] = self.route(name, alias).version
                except ModelLoadError:
                    continue
        return result

    def route(self, name: str, alias: str) -> AliasRoute:
        """Where an alias sends requests: its version and, during a rollout, its canary and
        shadow (`perito_core.models.rollout`), checked as the record is read.

        Raises:
            InvalidArgument: an invalid model name or alias.
            NotFound: no such alias.
            ModelLoadError: a record that is not JSON, or names no valid version, or holds a
                canary or shadow that is not one (never half-read: the alias is not served
                from a record it cannot read whole).
        """
        validate_model_name(name)
        self._validate_alias(alias)
        raw = self.store.read_bytes(f"models/{name}/aliases/{alias}.json")
        try:
            record = json.loads(raw)
            version = str(record["version"])
            canary = shadow = None
            if record.get("canary") is not None:
                part = record["canary"]
                canary = Canary(str(part["version"]), check_percent(float(part["percent"])))
            if record.get("shadow") is not None:
                part = record["shadow"]
                shadow = Shadow(str(part["version"]), check_sample(float(part["sample"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(
                f"model {name!r}: alias {alias!r} is not a valid alias record"
            ) from None
        for part_version in (version, *(p.version for p in (canary, shadow) if p is not None)):
            if not VERSION_PATTERN.fullmatch(part_version):
                raise ModelLoadError(
                    f"model {name!r}: alias {alias!r} does not name a valid version"
                )
        return AliasRoute(version, canary, shadow)

    def resolve(self, name: str, ref: str = "") -> str:
        """Turn a version number, an alias or "" / `latest` into a concrete version.

        Raises:
            InvalidArgument: a malformed model name (field `model`), or a `ref` that can be
                neither a version number nor an alias (field `version`).
            NotFound: the model, version or alias does not exist.
        """
        validate_model_name(name)
        # Taken as written: "1 " is no version (Classify would refuse it), so no door may
        # call it ready.
        if ref in ("", LATEST):
            versions = self.list_versions(name)
            if not versions:
                raise NotFound(f"model {name!r} not found", field="model")
            return versions[-1]
        if ref.isascii() and ref.isdigit():
            if not self.store.exists(f"models/{name}/{int(ref)}/manifest.json"):
                raise self._not_found(name, f"version {ref}")
            return str(int(ref))
        if not ALIAS_PATTERN.fullmatch(ref):  # never a path: no '/', no '..'
            raise InvalidArgument(
                f"version {echo(ref)!r} is neither a version number nor an alias (lowercase "
                "letters, digits, '_' or '-', starting with a letter)",
                field="version",
            )
        try:
            return self.route(name, ref).version
        except NotFound:
            raise self._not_found(name, f"alias {ref!r}") from None

    def _not_found(self, name: str, what: str) -> NotFound:
        if not self.list_versions(name):
            return NotFound(f"model {name!r} not found", field="model")
        return NotFound(f"model {name!r} has no {what}", field="version")

    def manifest(self, name: str, version: str) -> ModelManifest:
        """A version's manifest, checked as it is read: valid, and naming this model and
        version (a manifest copied elsewhere is not trusted for another).

        Raises:
            InvalidArgument: an invalid model name or version.
            NotFound: no such version.
            ModelLoadError: a manifest that is invalid or names another model or version.
        """
        validate_model_name(name)
        if not VERSION_PATTERN.fullmatch(version):
            raise InvalidArgument(f"invalid version {version[:64]!r}", field="version")
        raw = self.store.read_bytes(f"models/{name}/{version}/manifest.json")
        try:
            manifest = ModelManifest.model_validate_json(raw)
        except ValidationError as exc:
            raise ModelLoadError(f"{name}@{version}: manifest.json is invalid: {exc}") from None
        if manifest.name != name or manifest.version != version:
            raise ModelLoadError(
                f"{name}@{version}: manifest.json names {manifest.name[:64]!r} version "
                f"{manifest.version[:16]!r}; refusing it"
            )
        return manifest

    def fetch(self, name: str, version: str) -> LocalArtifact:
        """Return a local, sha256-verified copy of a version's model file.

        Raises:
            NotFound: no such version.
            ArtifactIntegrityError: the stored file does not match its manifest's sha256.
            StorageUnavailable: the store cannot be reached.
        """
        manifest = self.manifest(name, version)
        local = self._fetch_verified(
            name, version, manifest.artifact.file, manifest.artifact.sha256, "model file"
        )
        return LocalArtifact(local, manifest)

    def fetch_form(self, manifest: ModelManifest, form_name: str) -> LocalForm:
        """Local, sha256-verified copies of a compiled form's files.

        Raises:
            NotFound: the version lists no such form.
            ArtifactIntegrityError: a stored file does not match its manifest's sha256.
        """
        form = manifest.form(form_name)
        if form is None:
            raise NotFound(f"{manifest.name}@{manifest.version} has no form {form_name!r}")
        paths = [
            self._fetch_verified(
                manifest.name,
                manifest.version,
                f"forms/{form.name}/{entry.file}",
                entry.sha256,
                f"{form.name} file {entry.file}",
            )
            for entry in form.files
        ]
        return LocalForm(form, paths)

    def check_stored(self, name: str, version: str) -> None:
        """Read `name@version`'s stored model file and check it against its manifest's sha256:
        the store's own copy, not the local cache (which may hold a good copy of a file since
        damaged), as a server without that cache would load it.

        Raises:
            NotFound: no such version.
            ArtifactIntegrityError: the stored file does not match its manifest's sha256.
            StorageUnavailable: the store cannot be reached.
        """
        manifest = self.manifest(name, version)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir, prefix=".check-") as scratch:
            self._download_verified(
                name, version, manifest.artifact.file, manifest.artifact.sha256, "model file",
                Path(scratch) / "file",
            )  # fmt: skip

    def _fetch_verified(self, name: str, version: str, file: str, sha256: str, what: str) -> Path:
        local = self.cache_dir / name / version / file
        if local.is_file() and sha256_file(local) == sha256:
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=local.parent, delete=False, prefix=".tmp-") as tmp:
            tmp_path = Path(tmp.name)
        try:
            self._download_verified(name, version, file, sha256, what, tmp_path)
            os.replace(tmp_path, local)
        finally:
            tmp_path.unlink(missing_ok=True)
        return local

    def _download_verified(
        self, name: str, version: str, file: str, sha256: str, what: str, to: Path
    ) -> None:
        """The stored `file` of `name@version` downloaded to `to`, checked against `sha256`.

        Raises:
            ArtifactIntegrityError: it does not match.
        """
        self.store.download_file(f"models/{name}/{version}/{file}", to)
        actual = sha256_file(to)
        if actual != sha256:
            raise ArtifactIntegrityError(
                f"{name}@{version}: {what} sha256 {actual[:12]}... does not match the "
                f"manifest's {sha256[:12]}...; refusing to load it"
            )

    # Writing

    def publish(
        self,
        name: str,
        model_file: Path,
        *,
        labels: list[str],
        input: InputContract,
        description: str = "",
        confidence_threshold: float | None = None,
        metrics: Metrics | dict[str, Any] | None = None,
        calibration: Calibration | dict[str, Any] | None = None,
        training: TrainingRecord | dict[str, Any] | None = None,
        source: Source | dict[str, Any] | None = None,
        quality: QualityThresholds | dict[str, Any] | None = None,
        drift: DriftReference | dict[str, Any] | None = None,
        aliases: tuple[str, ...] = (),
        forms: Sequence[tuple[CompiledForm, Path]] = (),
        skipped_forms: dict[str, str] | None = None,
        artifact_format: ArtifactFormat = "torchscript",
        tensor: TensorContract | None = None,
    ) -> ModelManifest:
        """Publish `model_file` as the next version of `name`, then point `aliases` at it.

        The model file goes first and the manifest last, so a reader never sees a version
        whose file is missing. An existing version is never overwritten. `forms` are compiled
        forms that passed the accuracy gate, each with the folder holding its files
        (`perito_core.models.gate.build_forms`); `skipped_forms` says why others were not built.
        The card's parts (`metrics`, `calibration`, `training`, `source`, `quality`: the
        photo-quality thresholds, `drift`: the drift reference) are its typed parts
        (`perito_core.models.card`) or their JSON as dicts. `artifact_format="onnx"` stores
        the file as `model.onnx` with its `tensor` contract (required then, refused otherwise).

        Raises:
            InvalidArgument: an invalid model name or alias, or a drift reference that does
                not fit the labels (`DriftReference.check`: its classes not among them, say).
            pydantic.ValidationError: a manifest that breaks its own rules (an ONNX file
                without a tensor contract, a sigmoid output for other than two labels, ...).
        """
        validate_model_name(name)
        for alias in aliases:
            self._validate_alias(alias)
        versions = self.list_versions(name)
        version = str(int(versions[-1]) + 1 if versions else 1)
        manifest = ModelManifest(
            name=name,
            version=version,
            labels=labels,
            input=input,
            artifact=Artifact(
                file=ARTIFACT_FILES[artifact_format],
                format=artifact_format,
                sha256=sha256_file(model_file),
                size_bytes=model_file.stat().st_size,
            ),
            tensor=tensor,
            description=description,
            confidence_threshold=confidence_threshold,
            metrics=metrics or {},
            calibration=calibration or {},
            training=training or {},
            source=source or {},
            quality=quality or {},
            drift=drift or {},
            forms=[form for form, _ in forms],
            skipped_forms=skipped_forms or {},
        )
        try:
            manifest.drift.check(manifest.labels)
        except ValueError as error:
            raise InvalidArgument(f"cannot publish {name}: {error}") from None
        prefix = f"models/{name}/{version}"
        if self.store.exists(f"{prefix}/manifest.json"):
            raise AlreadyExists(f"{name}@{version} already exists; versions are immutable")
        self.store.upload_file(f"{prefix}/{manifest.artifact.file}", model_file)
        for form, folder in forms:
            for entry in form.files:
                self.store.upload_file(
                    f"{prefix}/forms/{form.name}/{entry.file}", folder / entry.file
                )
        self.store.write_bytes(
            f"{prefix}/manifest.json", manifest.model_dump_json(indent=2).encode()
        )
        for alias in aliases:
            self.set_alias(name, alias, version)
        return manifest

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point `alias` at an existing version (creating or moving the alias). A move ends
        the alias's canary, if it has one; its shadow stays unless it is the new version.

        Raises:
            InvalidArgument: an invalid name or alias.
            NotFound: no such model or version.
        """
        self._validate_alias(alias)
        version = self.resolve(name, version)
        self._write_route(name, alias, self._current(name, alias).moved_to(version))

    def set_canary(self, name: str, alias: str, version: str, percent: float) -> AliasRoute:
        """Send `percent` (0 < percent < 100) of `alias`'s requests to `version`.

        Raises:
            InvalidArgument: an invalid name, alias or percent, or `version` already the
                alias's own.
            NotFound: no such model, version or alias.
        """
        route = self._existing(name, alias)
        version = self.resolve(name, version)
        if version == route.version:
            raise InvalidArgument(
                f"{name}@{alias} already serves version {version}", field="version"
            )
        try:
            canary = Canary(version, check_percent(percent))
        except ValueError as error:
            raise InvalidArgument(str(error), field="canary") from None
        route = AliasRoute(route.version, canary, route.shadow)
        self._write_route(name, alias, route)
        return route

    def promote_canary(self, name: str, alias: str) -> AliasRoute:
        """Move `alias` to its canary's version, ending the canary (and a shadow of it).

        Raises:
            FailedPrecondition: the alias has no canary.
            NotFound: no such model or alias.
        """
        route = self._existing(name, alias)
        if route.canary is None:
            raise FailedPrecondition(f"{name}@{alias} has no canary to promote", field="alias")
        route = route.moved_to(route.canary.version)
        self._write_route(name, alias, route)
        return route

    def rollback_canary(self, name: str, alias: str) -> AliasRoute:
        """End `alias`'s canary: every request goes to the alias's version again.

        Raises:
            FailedPrecondition: the alias has no canary.
            NotFound: no such model or alias.
        """
        route = self._existing(name, alias)
        if route.canary is None:
            raise FailedPrecondition(f"{name}@{alias} has no canary to roll back", field="alias")
        route = AliasRoute(route.version, None, route.shadow)
        self._write_route(name, alias, route)
        return route

    def set_shadow(self, name: str, alias: str, version: str, sample: float) -> AliasRoute:
        """Run `version` on a `sample` (0 < sample <= 1) of `alias`'s traffic, answers
        compared and never returned.

        Raises:
            InvalidArgument: an invalid name, alias or sample, or `version` the alias's own.
            NotFound: no such model, version or alias.
        """
        route = self._existing(name, alias)
        version = self.resolve(name, version)
        if version == route.version:
            raise InvalidArgument(
                f"{name}@{alias} already serves version {version}: shadow another",
                field="version",
            )
        try:
            shadow = Shadow(version, check_sample(sample))
        except ValueError as error:
            raise InvalidArgument(str(error), field="sample") from None
        route = AliasRoute(route.version, route.canary, shadow)
        self._write_route(name, alias, route)
        return route

    def stop_shadow(self, name: str, alias: str) -> AliasRoute:
        """Stop shadowing `alias` (nothing to do when it has no shadow).

        Raises:
            NotFound: no such model or alias.
        """
        route = self._existing(name, alias)
        if route.shadow is not None:
            route = AliasRoute(route.version, route.canary, None)
            self._write_route(name, alias, route)
        return route

    def _current(self, name: str, alias: str) -> AliasRoute:
        """The alias's route, or an empty one where it does not exist yet or is unreadable
        (a move rewrites it whole)."""
        try:
            return self.route(name, alias)
        except (NotFound, ModelLoadError):
            return AliasRoute("")

    def _existing(self, name: str, alias: str) -> AliasRoute:
        """The alias's route; a missing alias is NotFound naming it."""
        self._validate_alias(alias)
        try:
            return self.route(name, alias)
        except NotFound:
            raise self._not_found(name, f"alias {alias!r}") from None

    def _write_route(self, name: str, alias: str, route: AliasRoute) -> None:
        record = {**route.record(), "updated_at": datetime.now(UTC).isoformat()}
        self.store.write_bytes(f"models/{name}/aliases/{alias}.json", json.dumps(record).encode())

    def delete_alias(self, name: str, alias: str) -> None:
        validate_model_name(name)
        self._validate_alias(alias)
        self.store.delete(f"models/{name}/aliases/{alias}.json")

    def delete_version(self, name: str, version: str) -> None:
        """Remove a version (manifest first, so it stops resolving at once)."""
        version = self.resolve(name, version)
        prefix = f"models/{name}/{version}"
        self.store.delete(f"{prefix}/manifest.json")
        for key in list(self.store.list_keys(prefix + "/")):
            self.store.delete(key)
        shutil.rmtree(self.cache_dir / name / version, ignore_errors=True)

    @staticmethod
    def _validate_alias(alias: str) -> None:
        if alias == LATEST or alias.isdigit() or not ALIAS_PATTERN.fullmatch(alias):
            raise InvalidArgument(
                f"invalid alias {alias!r}: use lowercase letters, digits, '_' or '-', starting "
                f"with a letter; {LATEST!r} is reserved (always the highest version)",
                field="alias",
            )
