"""The registry of workflow definitions a process knows, and loading them from modules."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator

from engine.definitions import Workflow
from engine.errors import DefinitionError


class Registry:
    """Workflow definitions by type name. A type name may be registered once."""

    def __init__(self, workflows: Iterable[Workflow] = ()) -> None:
        self._workflows: dict[str, Workflow] = {}
        for workflow in workflows:
            self.register(workflow)

    def register(self, workflow: Workflow) -> Workflow:
        """Add a definition; a second, different definition of the same type is an error."""
        known = self._workflows.get(workflow.type)
        if known is not None and known is not workflow:
            raise DefinitionError(f"workflow type {workflow.type!r} is defined twice")
        self._workflows[workflow.type] = workflow
        return workflow

    def get(self, workflow_type: str) -> Workflow | None:
        """The definition of `workflow_type`, or None if this process does not know it."""
        return self._workflows.get(workflow_type)

    @property
    def types(self) -> list[str]:
        """The registered type names, sorted."""
        return sorted(self._workflows)

    def __contains__(self, workflow_type: object) -> bool:
        return workflow_type in self._workflows

    def __iter__(self) -> Iterator[Workflow]:
        return iter(self._workflows.values())

    def __len__(self) -> int:
        return len(self._workflows)

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
