"""The scene grammar: objects, attribute descriptions and referring queries, the reference resolver
that decides what a query denotes, and the random choice of an unambiguous query for a target."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
KINDS = ("circle", "square", "triangle", "diamond")
SIZE_WORDS = ("small", "big")
SIDES = ("left", "right", "top", "bottom")
RELATIONS = ("left of", "right of", "above", "below")
VOCABULARY = ("the", "shape", "on", "at", "of", "above", "below", *SIDES, *COLOURS, *KINDS, *SIZE_WORDS)


@dataclass(frozen=True)
class Obj:
    kind: str
    colour: str
    size: str
    x: int
    y: int
    s: int  # side of the (square) bounding box

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.s, self.s

    @property
    def cx(self) -> float:
        return self.x + self.s / 2

    @property
    def cy(self) -> float:
        return self.y + self.s / 2

    def polygon(self) -> list[float]:
        """Flat x,y list (COCO polygon) of the drawn shape."""
        x, y, s = self.x, self.y, self.s
        if self.kind == "square":
            pts = [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
        elif self.kind == "diamond":
            pts = [(x + s / 2, y), (x + s, y + s / 2), (x + s / 2, y + s), (x, y + s / 2)]
        elif self.kind == "triangle":
            pts = [(x + s / 2, y), (x + s, y + s), (x, y + s)]
        else:
            r = s / 2
            pts = [
                (x + r + r * math.cos(a), y + r + r * math.sin(a))
                for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)
            ]
        return [round(float(v), 2) for p in pts for v in p]


@dataclass(frozen=True)
class Desc:
    """Attribute description; None = not mentioned."""

    size: str | None = None
    colour: str | None = None
    kind: str | None = None

    def matches(self, o: Obj) -> bool:
        return (
            (self.size is None or o.size == self.size)
            and (self.colour is None or o.colour == self.colour)
            and (self.kind is None or o.kind == self.kind)
        )

    def text(self) -> str:
        words = [w for w in (self.size, self.colour) if w] + [self.kind or "shape"]
        return "the " + " ".join(words)

    @property
    def n_attributes(self) -> int:
        return sum(v is not None for v in (self.size, self.colour, self.kind))


@dataclass(frozen=True)
class Query:
    desc: Desc
    side: str | None = None  # absolute position among the objects matching desc
    relation: str | None = None  # relation to the (unique) object matching ref
    ref: Desc | None = None

    def text(self) -> str:
        t = self.desc.text()
        if self.side in ("left", "right"):
            return f"{t} on the {self.side}"
        if self.side:
            return f"{t} at the {self.side}"
        if self.relation:
            return f"{t} {self.relation} {self.ref.text()}"
        return t


def _rel_state(rel: str, a: Obj, r: Obj) -> bool | None:
    """True when `a rel r` clearly holds, False when it clearly does not, None when borderline."""
    tol = 0.25 * min(a.s, r.s)
    if rel == "left of":
        yes, no = a.x + a.s <= r.x + tol, a.cx >= r.cx
    elif rel == "right of":
        yes, no = a.x >= r.x + r.s - tol, a.cx <= r.cx
    elif rel == "above":
        yes, no = a.y + a.s <= r.y + tol, a.cy >= r.cy
    else:
        yes, no = a.y >= r.y + r.s - tol, a.cy <= r.cy
    return True if yes else (False if no else None)


def _clearly_extreme(side: str, t: Obj, o: Obj) -> bool:
    m = 0.5 * max(t.s, o.s)
    if side == "left":
        return t.cx + m <= o.cx
    if side == "right":
        return t.cx >= o.cx + m
    if side == "top":
        return t.cy + m <= o.cy
    return t.cy >= o.cy + m


def resolve(q: Query, objs: Sequence[Obj]) -> list[int] | None:
    """Indices of the objects the query denotes; None when it is ambiguous or borderline."""
    cand = [i for i, o in enumerate(objs) if q.desc.matches(o)]
    if q.side:
        if len(cand) < 2:
            return None  # "on the left" needs something to be left of
        best = [i for i in cand if all(_clearly_extreme(q.side, objs[i], objs[j]) for j in cand if j != i)]
        return best if len(best) == 1 else None
    if q.relation:
        refs = [j for j, o in enumerate(objs) if q.ref.matches(o)]
        if len(refs) != 1:
            return None
        r = refs[0]
        out = []
        for i in cand:
            if i == r:
                continue
            st = _rel_state(q.relation, objs[i], objs[r])
            if st is None:
                return None
            if st:
                out.append(i)
        return out
    return cand


def _own_descs(o: Obj) -> list[Desc]:
    """The 7 descriptions that match o (every non-empty subset of its attributes)."""
    return [
        Desc(size, colour, kind)
        for size in (None, o.size)
        for colour in (None, o.colour)
        for kind in (None, o.kind)
        if (size, colour, kind) != (None, None, None)
    ]


def _descs_of(o: Obj, objs: Sequence[Obj]) -> list[Desc]:
    """Descriptions of o usable in an expression.

    A size word is used only with a contrast in the scene: "the small circle" needs a big circle.
    """
    out = []
    for d in _own_descs(o):
        if d.size is not None:
            plain = Desc(None, d.colour, d.kind)
            if not any(plain.matches(p) and p.size != d.size for p in objs):
                continue
        out.append(d)
    return out


class Scene:
    """Per-scene caches: which objects each description matches, pairwise relation states."""

    def __init__(self, objs: Sequence[Obj]) -> None:
        self.objs = objs
        self.match: dict[Desc, list[int]] = {}
        for i, o in enumerate(objs):
            for d in _own_descs(o):
                self.match.setdefault(d, []).append(i)
        self.rel = {rel: [[_rel_state(rel, a, r) for r in objs] for a in objs] for rel in RELATIONS}
        self._usable = [_descs_of(o, objs) for o in objs]

    def usable(self, i: int) -> list[Desc]:
        return self._usable[i]

    def unique(self, i: int) -> list[Desc]:
        return [d for d in self._usable[i] if len(self.match[d]) == 1]


def _candidates(kind: str, t: int, sc: Scene) -> list[tuple[Query, bool]]:
    """Unambiguous queries of one type for target t, each with whether its location part is needed."""
    objs = sc.objs
    if kind == "attr":
        return [(Query(d), True) for d in sc.unique(t)]
    if kind == "side":
        out = []
        for d in sc.usable(t):
            others = [j for j in sc.match[d] if j != t]
            if not others:
                continue
            for side in SIDES:
                if all(_clearly_extreme(side, objs[t], objs[j]) for j in others):
                    out.append((Query(d, side=side), True))
        return out
    out = []
    for r in range(len(objs)):
        refs = sc.unique(r) if r != t else []
        if not refs:
            continue
        for rel in RELATIONS:
            states = sc.rel[rel]
            if states[t][r] is not True:
                continue
            for d in sc.usable(t):
                if all(states[j][r] is False for j in sc.match[d] if j not in (t, r)):
                    out.append((Query(d, relation=rel, ref=refs[0]), len(sc.match[d]) > 1, r))
    return out


# Weights of the expression types; relations and positions are what the model must learn to read.
_TYPES = ("attr", "side", "rel")
_TYPE_WEIGHTS = np.array([0.35, 0.25, 0.40])


def choose_query(
    t: int, objs: Sequence[Obj], rng: np.random.Generator, scene: Scene | None = None
) -> Query | None:
    """A random unambiguous query for target t (checked with `resolve`), or None."""
    sc = scene or Scene(objs)
    # Weighted order without replacement (Efraimidis-Spirakis keys).
    for k in np.argsort(-(rng.random(len(_TYPES)) ** (1.0 / _TYPE_WEIGHTS))):
        kind = _TYPES[k]
        pool = _candidates(kind, t, sc)
        if not pool:
            continue
        if kind == "rel":
            needed = [c for c in pool if c[1]]
            if needed and rng.random() < 0.8:
                pool = needed  # prefer relations that are necessary, not decorative
            q, _, r = pool[rng.integers(len(pool))]
            refs = sc.unique(r)
            q = Query(q.desc, relation=q.relation, ref=refs[rng.integers(len(refs))])
        else:
            if kind == "attr" and rng.random() < 0.5:
                fewest = min(q.desc.n_attributes for q, _ in pool)
                pool = [c for c in pool if c[0].desc.n_attributes == fewest]
            q = pool[rng.integers(len(pool))][0]
        if resolve(q, objs) != [t]:  # the generator's promise, checked by the reference resolver
            raise AssertionError(
                f"generated an ambiguous expression {q.text()!r} for {objs[t]} in {list(objs)}"
            )
        return q
    return None


_PHRASE_RE = re.compile(
    r"^(?P<d>the(?: \w+)*?) (?:(?:on|at) the (?P<side>left|right|top|bottom)|(?P<rel>left of|right of|above|below) "
    r"(?P<ref>the(?: \w+)+))$"
)


def _parse_desc(text: str) -> Desc:
    words = text.split()
    if not words or words[0] != "the":
        raise ValueError(f"not a description: {text!r}")
    size = colour = kind = None
    for wd in words[1:]:
        if wd in SIZE_WORDS:
            size = wd
        elif wd in COLOURS:
            colour = wd
        elif wd in KINDS:
            kind = wd
        elif wd != "shape":
            raise ValueError(f"unknown word {wd!r} in {text!r}")
    return Desc(size, colour, kind)


def parse_phrase(phrase: str) -> Query:
    """Inverse of `Query.text` (used by tests to re-check every generated expression)."""
    m = _PHRASE_RE.match(phrase)
    if m is None:
        return Query(_parse_desc(phrase))
    if m.group("side"):
        return Query(_parse_desc(m.group("d")), side=m.group("side"))
    return Query(_parse_desc(m.group("d")), relation=m.group("rel"), ref=_parse_desc(m.group("ref")))
