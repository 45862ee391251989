"""The registry of workflow definitions a process knows (by type and version), and loading
them from modules."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator

from engine.definitions import Workflow
from engine.errors import DefinitionError


def served_key(workflow_type: str, version: int | None) -> str:
    """What a worker serves, as the claim matches it: `type` for a workflow with no
    version yet, `type@N` for version N (the SQL function workflow_served_key)."""
    return workflow_type if version is None else f"{workflow_type}@{version}"


class Registry:
    """Workflow definitions by type name and version. A (type, version) may be registered
    once; a process may serve several versions of a type while the old ones drain."""

    def __init__(self, workflows: Iterable[Workflow] = ()) -> None:
        self._workflows: dict[str, dict[int, Workflow]] = {}
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
    def served(self) -> list[str]:
        """The served keys of every type and version this process knows, sorted: what
        its claim asks for (a type's bare key: its workflows with no version yet)."""
        keys = {served_key(workflow.type, workflow.version) for workflow in self} | set(self._workflows)
        return sorted(keys)

    def __contains__(self, workflow_type: object) -> bool:
        return workflow_type in self._workflows

    def __iter__(self) -> Iterator[Workflow]:
        """Every definition, every version."""
        return (workflow for versions in self._workflows.values() for workflow in versions.values())

    def __len__(self) -> int:
        return sum(len(versions) for versions in self._workflows.values())

    def load_module(self, module_name: str) -> list[Workflow]:
        """Import a module and register every `Workflow` at its top level."""
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise DefinitionError(
                f"cannot import workflow module {module_name!r}: {type(error).__name__}: {error}"
            ) from error
        found = [value for value in vars(module).values() if isinstance(value, Workflow)]
        return [self.register(workflow) for workflow in found]

    def load_modules(self, module_names: Iterable[str]) -> list[Workflow]:
        """Load each named module in turn (see `load_module`)."""
        return [workflow for name in module_names for workflow in self.load_module(name)]
