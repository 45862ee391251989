"""The definition API (Step, Workflow) and the registry that loads definitions from modules."""

from __future__ import annotations

import importlib
import pickle
import re
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from engine import (
    DefinitionError,
    InputValidationError,
    Registry,
    Step,
    Workflow,
    WorkflowContext,
)
from engine.definitions import MAX_RETRIES_DEFAULT, TYPE_NAME_PATTERN
from engine.registry import WorkflowModuleNotFoundError, served_key


def execute(input: Any, ctx: WorkflowContext) -> Any:
    return input


async def execute_async(input: Any, ctx: WorkflowContext) -> Any:
    return input


def compensate(input: Any, output: Any, ctx: WorkflowContext) -> None:
    return None


def make_workflow(type: str = "flow", *names: str, **kwargs: Any) -> Workflow:
    steps = [Step(name=name, execute=execute) for name in names or ("only",)]
    return Workflow(type=type, steps=steps, **kwargs)


# Step


def test_step_defaults() -> None:
    step = Step(name="charge", execute=execute)
    assert step.compensate is None
    assert step.is_idempotent
    assert step.max_retries is None
    assert step.timeout is None
    assert dict(step.config) == {}
    assert not step.transactional


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "a step needs a name"),
        ({"execute": "not callable"}, "execute must be callable"),
        ({"compensate": 42}, "compensate must be callable"),
        ({"max_retries": -1}, "max_retries cannot be negative"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"timeout": -1.5}, "timeout must be positive"),
        ({"transactional": True}, "a transactional step.s execute and compensate must be async defs"),
    ],
)
def test_a_malformed_step_is_refused(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"name": "s", "execute": execute, **kwargs}
    with pytest.raises(DefinitionError, match=message):
        Step(**arguments)


def test_a_transactional_step_may_be_async() -> None:
    step = Step(name="write", execute=execute_async, transactional=True)
    assert step.transactional


def test_zero_retries_and_a_compensation_are_accepted() -> None:
    step = Step(name="s", execute=execute, compensate=compensate, max_retries=0, timeout=0.5)
    assert step.compensate is compensate
    assert step.retries(5) == 0


def test_step_retries_fall_back_to_the_workflow() -> None:
    assert Step(name="s", execute=execute).retries(7) == 7
    assert Step(name="s", execute=execute, max_retries=2).retries(7) == 2


def test_step_config_is_a_read_only_copy() -> None:
    config = {"url": "https://example.test"}
    step = Step(name="s", execute=execute, config=config)
    config["url"] = "changed"
    assert step.config["url"] == "https://example.test"
    with pytest.raises(TypeError):
        step.config["url"] = "changed"  # type: ignore[index]


def test_a_step_is_frozen() -> None:
    step = Step(name="s", execute=execute)
    with pytest.raises(AttributeError):
        step.name = "other"  # type: ignore[misc]


# Workflow


def test_workflow_defaults() -> None:
    workflow = Workflow(type="orders.ship", steps=[Step(name="s", execute=execute)])
    assert workflow.name == "orders.ship"
    assert workflow.description == ""
    assert not workflow.requires_compensation
    assert workflow.max_retries == MAX_RETRIES_DEFAULT
    assert workflow.input_model is None


def test_workflow_keeps_its_steps_in_order_as_a_tuple() -> None:
    steps = [Step(name=name, execute=execute) for name in ("a", "c", "b")]
    workflow = Workflow(type="flow", steps=steps, name="Flow")
    steps.append(Step(name="late", execute=execute))
    assert isinstance(workflow.steps, tuple)
    assert [step.name for step in workflow.steps] == ["a", "c", "b"]
    assert workflow.name == "Flow"


def test_a_workflow_needs_steps() -> None:
    with pytest.raises(DefinitionError, match="needs at least one step"):
        Workflow(type="flow", steps=[])


def test_repeated_step_names_are_refused() -> None:
    with pytest.raises(DefinitionError, match=r"repeats step names \['a', 'b'\]"):
        make_workflow("flow", "a", "b", "c", "b", "a")


def test_negative_workflow_retries_are_refused() -> None:
    with pytest.raises(DefinitionError, match="max_retries cannot be negative"):
        make_workflow("flow", max_retries=-1)


@pytest.mark.parametrize("type_name", ["a", "Orders", "payment.send-v2", "x_1", "a" * 128])
def test_valid_type_names(type_name: str) -> None:
    assert make_workflow(type_name).type == type_name


@pytest.mark.parametrize(
    "type_name",
    ["", "1flow", "_flow", "-flow", "has space", "semi;colon", "colon:s", "é", "a" * 129],
)
def test_invalid_type_names_are_refused(type_name: str) -> None:
    with pytest.raises(DefinitionError, match="must start with a letter"):
        make_workflow(type_name)


def test_a_type_name_with_a_trailing_newline_is_refused() -> None:
    # The pattern ends in `$`, which also matches before a final newline.
    with pytest.raises(DefinitionError, match="must start with a letter"):
        make_workflow("flow\n")


@given(type_name=st.text(max_size=20))
def test_type_names_are_accepted_exactly_when_they_fit_the_rule(type_name: str) -> None:
    allowed = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
    fits = (
        0 < len(type_name) <= 128
        and type_name[0].isascii()
        and type_name[0].isalpha()
        and all(char in allowed for char in type_name)
    )
    if fits:
        assert make_workflow(type_name).type == type_name
        assert TYPE_NAME_PATTERN.match(type_name)
    else:
        with pytest.raises(DefinitionError):
            make_workflow(type_name)


class Transfer(BaseModel):
    amount: int
    to: str


def test_input_is_validated_by_the_model() -> None:
    workflow = make_workflow("transfer", input_model=Transfer)
    workflow.validate_input({"amount": 5, "to": "alice"})
    with pytest.raises(InputValidationError) as raised:
        workflow.validate_input({"amount": "lots"})
    error = raised.value
    assert error.workflow_type == "transfer"
    assert len(error.messages) == 2
    assert error.messages[0].startswith("amount: ")
    assert error.messages[1] == "to: Field required"
    assert str(error).startswith("invalid input for workflow type 'transfer': amount: ")


def test_input_that_is_not_an_object_is_reported_at_input() -> None:
    workflow = make_workflow("transfer", input_model=Transfer)
    with pytest.raises(InputValidationError) as raised:
        workflow.validate_input([1, 2])
    assert raised.value.messages[0].startswith("input: ")


def test_without_a_model_any_input_is_accepted() -> None:
    workflow = make_workflow("free")
    for value in (None, 1, "text", [1], {"any": "thing"}):
        workflow.validate_input(value)


# Registry


def test_registry_holds_definitions_by_type() -> None:
    first, second = make_workflow("b.flow"), make_workflow("a.flow")
    registry = Registry([first, second])
    assert registry.get("b.flow") is first
    assert registry.get("missing") is None
    assert registry.types == ["a.flow", "b.flow"]
    assert "a.flow" in registry
    assert "missing" not in registry
    assert len(registry) == 2
    assert set(map(id, registry)) == {id(first), id(second)}


def test_register_returns_the_definition_and_accepts_it_twice() -> None:
    registry = Registry()
    workflow = make_workflow("flow")
    assert registry.register(workflow) is workflow
    assert registry.register(workflow) is workflow
    assert len(registry) == 1


def test_a_second_definition_of_a_type_is_refused() -> None:
    registry = Registry([make_workflow("flow")])
    # Equal in every field, but another object: still a second definition.
    with pytest.raises(DefinitionError, match="'flow' version 1 is defined twice"):
        registry.register(make_workflow("flow"))
    with pytest.raises(DefinitionError, match="defined twice"):
        Registry([make_workflow("dup"), make_workflow("dup", "other")])


def test_a_process_may_serve_several_versions_of_a_type() -> None:
    old = Workflow(type="flow", steps=[Step("a", execute)])
    new = Workflow(type="flow", version=2, steps=[Step("a2", execute), Step("b", execute)])
    registry = Registry([new, old])
    assert registry.get("flow", 1) is old
    assert registry.get("flow", 2) is new
    assert registry.get("flow") is new  # no version yet: the newest
    assert registry.get("flow", 3) is None
    assert registry.types == ["flow"]
    assert len(registry) == 2
    assert sorted(workflow.version for workflow in registry) == [1, 2]
    # A type's bare key claims its workflows with no version yet.
    assert registry.served == ["flow", "flow@1", "flow@2"]
    assert served_key("flow", None) == "flow"
    assert served_key("flow", 2) == "flow@2"


def test_a_version_below_1_is_refused() -> None:
    with pytest.raises(DefinitionError, match="version must be 1 or more"):
        Workflow(type="flow", version=0, steps=[Step("a", execute)])


ModuleWriter = Callable[[str], str]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleWriter]:
    """Write a module under a unique name on sys.path; returns its name. Unloaded after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    prefix = f"wfd_defs_{uuid.uuid4().hex[:8]}"
    written: list[str] = []

    def write(source: str) -> str:
        name = f"{prefix}_{len(written)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


FLOWS_SOURCE = """
    from engine import Step, Workflow

    def run(input, ctx):
        return input

    first = Workflow(type="mod.first", steps=[Step(name="a", execute=run)])
    second = Workflow(type="mod.second", steps=[Step(name="a", execute=run)])
    a_step = Step(name="not-a-workflow", execute=run)
    settings = {"type": "mod.not-a-workflow"}

    def factory():
        return Workflow(type="mod.inner", steps=[Step(name="a", execute=run)])
"""


def test_load_module_registers_every_top_level_workflow(write_module: ModuleWriter) -> None:
    name = write_module(FLOWS_SOURCE)
    registry = Registry()
    loaded = registry.load_module(name)
    module = sys.modules[name]
    assert {workflow.type for workflow in loaded} == {"mod.first", "mod.second"}
    assert registry.types == ["mod.first", "mod.second"]
    assert registry.get("mod.first") is module.first
    assert registry.get("mod.second") is module.second


def test_load_modules_registers_the_workflows_of_each_module(write_module: ModuleWriter) -> None:
    one = write_module(FLOWS_SOURCE)
    two = write_module(
        """
        from engine import Step, Workflow

        other = Workflow(type="mod.third", steps=[Step(name="a", execute=print)])
        """
    )
    registry = Registry()
    loaded = registry.load_modules([one, two])
    assert [workflow.type for workflow in loaded] == ["mod.first", "mod.second", "mod.third"]
    assert registry.types == ["mod.first", "mod.second", "mod.third"]


def test_a_duplicate_type_across_modules_is_refused(write_module: ModuleWriter) -> None:
    source = """
        from engine import Step, Workflow

        flow = Workflow(type="mod.shared", steps=[Step(name="a", execute=print)])
    """
    one, two = write_module(source), write_module(source)
    registry = Registry()
    with pytest.raises(DefinitionError, match=r"'mod\.shared' version 1 is defined twice"):
        registry.load_modules([one, two])


def test_the_same_workflow_imported_by_two_modules_is_fine(write_module: ModuleWriter) -> None:
    original = write_module(
        """
        from engine import Step, Workflow

        flow = Workflow(type="mod.original", steps=[Step(name="a", execute=print)])
        """
    )
    reexport = write_module(
        f"""
        from {original} import flow
        from {original} import flow as alias
        """
    )
    registry = Registry()
    registry.load_modules([original, reexport])
    assert registry.types == ["mod.original"]
    assert registry.get("mod.original") is sys.modules[original].flow


def test_a_module_that_fails_to_import_is_named(write_module: ModuleWriter) -> None:
    name = write_module(
        """
        raise RuntimeError("boom at import")
        """
    )
    with pytest.raises(DefinitionError) as raised:
        Registry().load_module(name)
    message = str(raised.value)
    assert f"cannot import workflow module {name!r}" in message
    assert "RuntimeError: boom at import" in message
    assert isinstance(raised.value.__cause__, RuntimeError)


def test_a_module_with_a_malformed_definition_is_named(write_module: ModuleWriter) -> None:
    name = write_module(
        """
        from engine import Workflow

        broken = Workflow(type="mod.broken", steps=[])
        """
    )
    with pytest.raises(DefinitionError, match=rf"{name}.*needs at least one step"):
        Registry().load_module(name)


def test_a_missing_module_is_one_line_saying_how_modules_are_found() -> None:
    package = f"wfd_missing_{uuid.uuid4().hex[:8]}"
    with pytest.raises(WorkflowModuleNotFoundError) as raised:
        Registry().load_module(f"{package}.flows")
    assert str(raised.value) == (
        f"no module named '{package}.flows' on sys.path (PYTHONPATH and the installed packages; "
        "the workflowd command does not add the current folder): give a file path such as "
        f"./{package}/flows.py to load a file"
    )
    assert isinstance(raised.value, DefinitionError)


def test_a_module_missing_a_dependency_is_its_own_failure(write_module: ModuleWriter) -> None:
    name = write_module("import wfd_no_such_dependency\n")
    with pytest.raises(DefinitionError) as raised:
        Registry().load_module(name)
    assert not isinstance(raised.value, WorkflowModuleNotFoundError)
    assert str(raised.value) == (
        f"cannot import workflow module {name!r}: "
        "ModuleNotFoundError: No module named 'wfd_no_such_dependency'"
    )


def test_a_failed_load_leaves_earlier_modules_registered(write_module: ModuleWriter) -> None:
    good = write_module(FLOWS_SOURCE)
    bad = write_module("import wfd_no_such_dependency\n")
    registry = Registry()
    with pytest.raises(DefinitionError, match=bad):
        registry.load_modules([good, bad])
    assert registry.types == ["mod.first", "mod.second"]


@pytest.fixture
def module_file(tmp_path: Path) -> Iterator[Path]:
    """FLOWS_SOURCE in a file under a unique stem, not on sys.path. Unloaded after."""
    path = tmp_path / f"wfd_file_{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(FLOWS_SOURCE), encoding="utf-8")
    yield path
    sys.modules.pop(path.stem, None)


def test_a_module_file_is_loaded_by_its_path(module_file: Path) -> None:
    registry = Registry()
    loaded = registry.load_module(str(module_file))
    module = sys.modules[module_file.stem]
    assert module.__file__ == str(module_file.resolve())
    assert {workflow.type for workflow in loaded} == {"mod.first", "mod.second"}
    assert registry.get("mod.first") is module.first
    # Found by its name like an imported module, so its functions pickle by reference.
    assert pickle.loads(pickle.dumps(module.run)) is module.run


@pytest.mark.parametrize("form", ["./{name}", "{name}", "../{folder}/{name}"])
def test_a_module_file_is_loaded_by_a_path_relative_to_the_current_folder(
    module_file: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    monkeypatch.chdir(module_file.parent)
    registry = Registry()
    registry.load_modules([form.format(name=module_file.name, folder=module_file.parent.name)])
    assert registry.types == ["mod.first", "mod.second"]
    assert registry.get("mod.first") is sys.modules[module_file.stem].first


def test_a_module_loaded_again_by_path_or_name_defines_its_types_once(
    module_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(module_file.parent)
    monkeypatch.syspath_prepend(str(module_file.parent))
    registry = Registry()
    again = [str(module_file), f"./{module_file.name}", module_file.stem]
    loaded = registry.load_modules(again)
    assert len(loaded) == 6  # the same two definitions, three times
    assert len(registry) == 2
    assert importlib.import_module(module_file.stem) is sys.modules[module_file.stem]


def test_a_missing_module_file_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkflowModuleNotFoundError) as raised:
        Registry().load_module("./no_such_flows.py")
    assert str(raised.value) == (
        f"no file './no_such_flows.py' ({tmp_path.resolve() / 'no_such_flows.py'}): an entry ending "
        "in .py or holding a / is loaded from that file, any other is imported as a module name "
        "from sys.path"
    )


def test_a_module_file_that_fails_is_named_and_loads_once_fixed(module_file: Path) -> None:
    source = module_file.read_text(encoding="utf-8")
    module_file.write_text("raise RuntimeError('boom at import')\n", encoding="utf-8")
    message = f"cannot import workflow module '{module_file}': RuntimeError: boom at import"
    with pytest.raises(DefinitionError, match=re.escape(message)):
        Registry().load_module(str(module_file))
    assert module_file.stem not in sys.modules
    module_file.write_text(source, encoding="utf-8")
    assert len(Registry().load_module(str(module_file))) == 2


def test_a_module_file_named_like_another_loaded_module_is_refused(tmp_path: Path) -> None:
    shadow = tmp_path / "json.py"
    shadow.write_text("", encoding="utf-8")
    refused = r"as 'json': a different module of that name is already loaded .*; rename the file"
    with pytest.raises(DefinitionError, match=refused):
        Registry().load_module(str(shadow))
    assert sys.modules["json"].__file__ != str(shadow)


def test_a_step_has_an_execute_function_or_waits_for_an_event_not_both_nor_neither() -> None:
    async def run(input: Any, ctx: WorkflowContext) -> None:
        return None

    waiting = Step("approval", wait_for_event="approved", timeout=60)
    assert (waiting.execute, waiting.wait_for_event) == (None, "approved")
    for bad in ({}, {"execute": run, "wait_for_event": "approved"}, {"wait_for_event": ""},
                {"wait_for_event": "approved", "transactional": True}):  # fmt: skip
        with pytest.raises(DefinitionError, match="step 'approval'"):
            Step("approval", **bad)
