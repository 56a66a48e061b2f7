"""A definition's steps (condition branches included, to any depth), what each waits for, and an order to run them in.

A step waits for the steps whose properties its arguments read (``Get``, ``Std:JsonGet``), for those its
``DependsOn`` names, and, inside a ConditionStep's branch, for that condition. A ``DependsOn`` entry is a
step's name, or ``{"Step": name, "Trigger": "Failed" | "Stopped" | "Any"}`` (the SDK's StepDependency: a
run condition on the upstream step's outcome); a plain name or a data reference is ``Completed``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .expressions import references
from .failures import StepFailed

COMPLETED = "Completed"
TRIGGERS = (COMPLETED, "Failed", "Stopped", "Any")   # the SDK's TriggerCondition values
BRANCHES = (("IfSteps", True), ("ElseSteps", False))


def own_arguments(step: dict) -> dict | list:
    """What a step's own expressions are: a condition's conditions and a ForEach's settings, not the steps in them."""
    arguments = step.get("Arguments", {})
    if step.get("Type") == "Condition":
        return arguments.get("Conditions", [])
    if step.get("Type") == "ForEach":
        return {key: value for key, value in arguments.items() if key != "ForEachBody"}
    return arguments


@dataclass
class StepGraph:
    """A definition's steps (condition branches included) and what each waits for."""

    steps: dict[str, dict]
    branch_of: dict[str, tuple[str, bool]]   # step in a condition's branch → (condition, True for IfSteps)
    body_of: dict[str, str] = field(default_factory=dict)   # step in a ForEach body → that ForEach step
    duplicates: list[str] = field(default_factory=list)     # names given to more than one step
    waits_for: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)   # upstream(), remembered

    @classmethod
    def of(cls, definition: dict) -> "StepGraph":
        graph = cls({}, {})
        graph.add(definition.get("Steps", []), None, None)
        return graph

    def add(self, steps: list[dict], branch: tuple[str, bool] | None, body: str | None) -> None:
        for step in steps:
            name = step["Name"]
            if name in self.steps:
                self.duplicates.append(name)
            self.steps[name] = step
            if branch:
                self.branch_of[name] = branch
            if body:
                self.body_of[name] = body
            arguments = step.get("Arguments", {})
            if step.get("Type") == "Condition":
                for key, chosen in BRANCHES:
                    self.add(arguments.get(key, []), (name, chosen), body)
            elif step.get("Type") == "ForEach":
                self.add(arguments.get("ForEachBody", []), branch, name)

    def depends_on(self, name: str) -> dict[str, str]:
        """The steps ``DependsOn`` names → the trigger each must meet (``Completed`` for a plain name)."""
        found = {}
        for entry in self.steps[name].get("DependsOn", []):
            if isinstance(entry, dict):
                found[str(entry.get("Step"))] = str(entry.get("Trigger", COMPLETED))
            else:
                found[str(entry)] = COMPLETED
        return found

    def upstream(self, name: str) -> dict[str, str]:
        """Every step ``name`` waits for → the outcome trigger it needs of it."""
        if name not in self.waits_for:
            self.waits_for[name] = self.find_upstream(name)
        return self.waits_for[name]

    def find_upstream(self, name: str) -> dict[str, str]:
        found = {reference: COMPLETED for reference in references(own_arguments(self.steps[name]))}
        found.update(self.depends_on(name))   # an explicit run condition says more than a data reference
        if name in self.branch_of:
            found.setdefault(self.branch_of[name][0], COMPLETED)
        if name in self.body_of:
            found.setdefault(self.body_of[name], COMPLETED)
        found.pop(name, None)
        return found

    def dependencies(self, name: str) -> set[str]:
        return set(self.upstream(name))

    def cycle(self) -> list[str] | None:
        """Steps that wait for each other in a circle (the first found, its first step repeated at the end)."""
        state: dict[str, str] = {}

        def visit(name: str, path: list[str]) -> list[str] | None:
            state[name] = "open"
            for upstream in sorted(self.dependencies(name)):
                if upstream not in self.steps:
                    continue
                if state.get(upstream) == "open":
                    return path[path.index(upstream):] + [upstream]   # open: on the path being walked
                if upstream not in state:
                    found = visit(upstream, path + [upstream])
                    if found:
                        return found
            state[name] = "done"
            return None

        for name in self.steps:
            if name not in state:
                found = visit(name, [name])
                if found:
                    return found
        return None

    def order(self) -> list[str]:
        """The steps in an order that runs each after what it waits for, definition order otherwise."""
        order, placed = [], set()
        names = list(self.steps)
        while len(order) < len(names):
            ready = [n for n in names if n not in placed and self.dependencies(n) <= placed]
            if not ready:
                cycle = self.cycle()
                raise StepFailed("the definition's steps depend on each other in a cycle "
                                 f"({' → '.join(cycle)})" if cycle else
                                 f"the definition's steps depend on unknown steps: {sorted(set(names) - placed)}")
            order.append(ready[0])
            placed.add(ready[0])
        return order

    def descendants(self, name: str) -> set[str]:
        """Every step that waits, directly or not, for ``name``."""
        found: set[str] = set()
        frontier = {name}
        while frontier:
            frontier = {other for other in self.steps if self.dependencies(other) & frontier} - found
            found |= frontier
        return found
