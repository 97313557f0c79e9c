"""Models shared by every resource: pages and lineage graphs; text and JSON the store can keep."""

from __future__ import annotations

import math
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

T = TypeVar("T")

NO_NUL = r"^[^\x00]*$"
"""The pattern of text that reaches the database: PostgreSQL text cannot hold a NUL character,
so one is refused with 422 here rather than failing in the driver with a 500."""


def _unstorable(value: Any) -> str | None:
    """Why ``value`` cannot be kept in a JSON column, or None (iterative: nesting depth is the client's)."""
    stack = [(value, "value")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return f"{where} is {value}, which is not a JSON number"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"{where} is not valid Unicode: lone surrogate at character {exc.start}"
        elif isinstance(value, dict):
            stack.extend((key, f"{where}: key {key!r}") for key in value)
            stack.extend((item, f"{where}[{key!r}]") for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
    return None


def _storable(value: dict[str, Any]) -> dict[str, Any]:
    problem = _unstorable(value)
    if problem:
        raise PydanticCustomError("unstorable_json", "{problem}", {"problem": problem})
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_storable)]
"""Free-form JSON kept in a JSON column: no NaN or Infinity (Python's json reads them, PostgreSQL
refuses them) and no lone surrogates (they cannot be written back out as UTF-8)."""


class Public(BaseModel):
    """Base of response models read from ORM rows."""

    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    """One page of a list: ``data``, its ``count``, and the cursor of the next page."""

    data: list[T]
    count: int
    next_cursor: str | None = None


class LineageNodePublic(BaseModel):
    kind: str
    """policy, pm, dataset or feedback_batch"""
    id: int
    name: str | None
    version: int | None


class LineageEdgePublic(BaseModel):
    child_kind: str
    child_id: int
    parent_kind: str
    parent_id: int
    relation: str
    """init, reference, trained_against, trained_on, contains or source"""


class LineageExclusionPublic(BaseModel):
    """Every comparison of one rater, left out of one comparison snapshot."""

    dataset_id: int
    rater_id: str
    reason: str
    comparisons: int


class LineagePublic(BaseModel):
    """A lineage graph: the versions reached from ``root`` and how they connect."""

    root_kind: str
    root_id: int
    direction: str
    """back (what it came from) or forward (what was made from it)"""
    nodes: list[LineageNodePublic]
    edges: list[LineageEdgePublic]
    exclusions: list[LineageExclusionPublic] = []
    """raters whose comparisons a snapshot on the way left out, and why (walking back only)"""

    @classmethod
    def of(cls, graph, direction: str) -> LineagePublic:
        return cls(
            root_kind=graph.root[0],
            root_id=graph.root[1],
            direction=direction,
            nodes=[LineageNodePublic(kind=n.kind, id=n.id, name=n.name, version=n.version) for n in graph.nodes.values()],
            edges=[
                LineageEdgePublic(
                    child_kind=e.child[0], child_id=e.child[1], parent_kind=e.parent[0], parent_id=e.parent[1], relation=e.relation
                )
                for e in graph.edges
            ],
            exclusions=[LineageExclusionPublic(**vars(e)) for e in graph.exclusions],
        )
