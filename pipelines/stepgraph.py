"""A definition's steps (condition branches included), what each waits for, and an order to run them in."""
from __future__ import annotations

from dataclasses import dataclass

from .expressions import references
from .failures import StepFailed


@dataclass
class StepGraph:
    """A definition's steps (condition branches included) and what each waits for."""

    steps: dict[str, dict]
    branch_of: dict[str, tuple[str, bool]]   # step in a condition's branch → (condition, True for IfSteps)

    @classmethod
    def of(cls, definition: dict) -> "StepGraph":
        steps, branch_of = {}, {}
        for step in definition["Steps"]:
            steps[step["Name"]] = step
            if step["Type"] == "Condition":
                for branch, chosen in (("IfSteps", True), ("ElseSteps", False)):
                    for child in step["Arguments"].get(branch, []):
                        steps[child["Name"]] = child
                        branch_of[child["Name"]] = (step["Name"], chosen)
        return cls(steps, branch_of)

    def dependencies(self, name: str) -> set[str]:
        step = self.steps[name]
        found = set(step.get("DependsOn", [])) | references(step.get("Arguments", {}))
        if step["Type"] == "Condition":
            found = set(step.get("DependsOn", [])) | references(step["Arguments"].get("Conditions", []))
        if name in self.branch_of:
            found.add(self.branch_of[name][0])
        return found - {name}

    def order(self) -> list[str]:
        order, placed = [], set()
        names = list(self.steps)
        while len(order) < len(names):
            ready = [n for n in names if n not in placed and self.dependencies(n) <= placed]
            if not ready:
                raise StepFailed(f"the definition's steps depend on each other in a cycle or on unknown steps: "
                                 f"{sorted(set(names) - placed)}")
            order.append(ready[0])
            placed.add(ready[0])
        return order
