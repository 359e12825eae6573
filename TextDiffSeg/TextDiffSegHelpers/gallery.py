"""The proposal gallery's state, without Qt: which proposals are selected and what can be done."""

from __future__ import annotations


class Gallery:
    """Which of one prompt's proposals are selected, and what can be done with them.

    Proposals are numbered from 1 as the user sees them. One selected proposal can be accepted;
    two or more can be fused. ``models`` names each proposal's model: the labels name it where the
    proposals come from several (an ensemble).
    """

    def __init__(self, scores: list[float], models: list[str]):
        self.scores, self.models = list(scores), list(models)
        self.selected: list[int] = []

    def order(self) -> list[int]:
        """Proposal numbers, best agreement first (ties by number)."""
        return sorted(range(1, len(self.scores) + 1), key=lambda number: (-self.scores[number - 1], number))

    def label(self, number: int) -> str:
        model = f"  {self.models[number - 1]}" if len(set(self.models)) > 1 else ""
        return f"#{number}{model}  {self.scores[number - 1]:.2f}"

    def select(self, numbers: list[int]) -> None:
        """Make ``numbers`` the selection (kept in increasing order)."""
        for number in numbers:
            if not 1 <= number <= len(self.scores):
                raise ValueError(f"there is no proposal {number}; there are {len(self.scores)}")
        self.selected = sorted(set(numbers))

    def canAccept(self) -> bool:
        return len(self.selected) == 1

    def canFuse(self) -> bool:
        return len(self.selected) >= 2
