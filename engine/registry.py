"""The registry of workflow definitions a process knows (by type and version), and loading
them from modules."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePath
from types import ModuleType

from engine.definitions import Workflow
from engine.errors import DefinitionError
from engine.limits import TypeLimits
from engine.schedules import Schedule


class WorkflowModuleNotFoundError(DefinitionError):
    """A module to load is neither a file that exists nor a module importable from
    sys.path; the message names what was given and says how modules are found."""


def served_key(workflow_type: str, version: int | None) -> str:
    """What a worker serves, as the claim matches it: `type` for a workflow with no
    version yet, `type@N` for version N (the SQL function workflow_served_key)."""
    return workflow_type if version is None else f"{workflow_type}@{version}"


class Registry:
    """Workflow definitions by type name and version. A (type, version) may be registered
    once; a process may serve several versions of a type while the old ones drain."""

    def __init__(self, workflows: Iterable[Workflow] = ()) -> None:
        self._workflows: dict[str, dict[int, Workflow]] = {}
        # The cron schedules declared beside the definitions, by name (a daemon upserts
        # them at its start).
        self.schedules: dict[str, Schedule] = {}
        for workflow in workflows:
            self.register(workflow)

    def register(self, workflow: Workflow) -> Workflow:
        """Add a definition; a second, different definition of the same type and version
        is an error."""
        versions = self._workflows.setdefault(workflow.type, {})
        known = versions.get(workflow.version)
        if known is not None and known is not workflow:
            raise DefinitionError(
                f"workflow type {workflow.type!r} version {workflow.version} is defined twice"
            )
        versions[workflow.version] = workflow
        return workflow

    def get(self, workflow_type: str, version: int | None = None) -> Workflow | None:
        """The definition of `workflow_type` at `version` (None: the newest this process
        knows), or None if this process does not know it."""
        versions = self._workflows.get(workflow_type)
        if not versions:
            return None
        return versions.get(version if version is not None else max(versions))

    @property
    def types(self) -> list[str]:
        """The registered type names, sorted."""
        return sorted(self._workflows)

    @property
    def priorities(self) -> list[int]:
        """The priority of each type's newest definition, in the order of `types`."""
        return [self._newest(name).priority for name in self.types]

    @property
    def limits(self) -> list[TypeLimits]:
        """The limits of each type's newest definition, in the order of `types`."""
        return [self._newest(name).limits for name in self.types]

    def _newest(self, workflow_type: str) -> Workflow:
        newest = self.get(workflow_type)
        assert newest is not None  # one of its own types
        return newest

    @property
    def served(self) -> list[str]:
        """The served keys of every type and version this process knows, sorted: what
        its claim asks for (a type's bare key: its workflows with no version yet)."""
        return self.served_keys(self._workflows)

    def served_keys(self, types: Iterable[str]) -> list[str]:
        """The served keys of these of its types, every version, sorted."""
        keys: set[str] = set()
        for name in types:
            keys.add(name)
            keys.update(served_key(name, version) for version in self._workflows.get(name, {}))
        return sorted(keys)

    def __contains__(self, workflow_type: object) -> bool:
        return workflow_type in self._workflows

    def __iter__(self) -> Iterator[Workflow]:
        """Every definition, every version."""
        return (workflow for versions in self._workflows.values() for workflow in versions.values())

    def __len__(self) -> int:
        return sum(len(versions) for versions in self._workflows.values())

    def load_module(self, entry: str) -> list[Workflow]:
        """Import a module, given by name (from sys.path) or as a file path (see
        `is_module_path`), and register every `Workflow` (and `Schedule`) at its top level.
        Loading it again registers nothing new: it is imported once, its definitions stay
        the same."""
        module = _load_file(entry) if is_module_path(entry) else _import_by_name(entry)
        for schedule in (value for value in vars(module).values() if isinstance(value, Schedule)):
            if self.schedules.setdefault(schedule.name, schedule) != schedule:
                raise DefinitionError(f"two different schedules are named {schedule.name!r} ({entry})")
        found = [value for value in vars(module).values() if isinstance(value, Workflow)]
        return [self.register(workflow) for workflow in found]

    def load_modules(self, entries: Iterable[str]) -> list[Workflow]:
        """Load each module, named or a file path, in turn (see `load_module`)."""
        return [workflow for entry in entries for workflow in self.load_module(entry)]


def is_module_path(entry: str) -> bool:
    """Whether a module to load is given as a file path (`flows.py`, `./flows.py`,
    `lib/flows`) rather than as a module name (`examples.greetings`)."""
    # A folder part means a separator: "/", or this system's own (PurePath splits on both).
    return entry.endswith(".py") or PurePath(entry).name != entry


def _import_by_name(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as error:
        if isinstance(error, ModuleNotFoundError) and _is_the_module_itself(error, name):
            raise WorkflowModuleNotFoundError(
                f"no module named {name!r} on sys.path (PYTHONPATH and the installed packages; "
                "the workflowd command does not add the current folder): give a file path such as "
                f"./{name.replace('.', '/')}.py to load a file"
            ) from None
        raise _cannot_import(name, error) from error


def _is_the_module_itself(error: ModuleNotFoundError, name: str) -> bool:
    """Whether the module missing is `name` (or a package of it), not one it imports:
    a missing dependency is the module's own failure, reported as such."""
    return error.name is not None and (name == error.name or name.startswith(f"{error.name}."))


def _load_file(entry: str) -> ModuleType:
    """The module of a Python file, registered in sys.modules under the file's stem as an
    import would be, so that loading the file again (or importing it by that name from
    its folder) gives the same module, not a second copy of its definitions."""
    path = Path(entry).resolve()
    if not path.is_file():
        raise WorkflowModuleNotFoundError(
            f"no file {entry!r} ({path}): an entry ending in .py or holding a / is loaded "
            "from that file, any other is imported as a module name from sys.path"
        )
    name = path.stem
    if (known := sys.modules.get(name)) is not None:
        return _loaded_from(known, path, entry)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DefinitionError(f"cannot load workflow module {entry!r}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    # In sys.modules before it runs, as an import does: pickle, dataclasses and pydantic
    # find a class's module there by its name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        # As a failed import does, so that the corrected file loads next time.
        del sys.modules[name]
        raise _cannot_import(entry, error) from error
    return module


def _loaded_from(known: ModuleType, path: Path, entry: str) -> ModuleType:
    """The module already in sys.modules under a file's stem, if it is that file's: a
    different one (a module of the standard library, a namesake elsewhere) is never
    shadowed."""
    known_file = getattr(known, "__file__", None)
    if known_file is not None and Path(known_file).resolve() == path:
        return known
    raise DefinitionError(
        f"cannot load workflow module {entry!r} as {known.__name__!r}: a different module of "
        f"that name is already loaded ({known_file or 'built in'}); rename the file"
    )


def _cannot_import(entry: str, error: Exception) -> DefinitionError:
    return DefinitionError(f"cannot import workflow module {entry!r}: {type(error).__name__}: {error}")
