"""Models shared by every resource: pages and lineage graphs."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


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


class LineagePublic(BaseModel):
    """A lineage graph: the versions reached from ``root`` and how they connect."""

    root_kind: str
    root_id: int
    direction: str
    """back (what it came from) or forward (what was made from it)"""
    nodes: list[LineageNodePublic]
    edges: list[LineageEdgePublic]

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
        )
