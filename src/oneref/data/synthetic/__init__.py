"""Embedded synthetic referring-expression dataset, generated deterministically on first use.

Images hold a few coloured shapes (circle, square, triangle, diamond; small or big) on a light,
slightly noisy background. Every expression picks out exactly one object and needs some of colour,
shape, size, absolute position or a relation to another object, e.g.

    "the small red circle", "the blue shape on the left", "the square left of the green triangle"

Each expression is a structured query that `resolve` evaluates against the scene; a query is kept
only if it matches the target alone and no other object is a borderline case. The data is written
in the official RefCOCO layout, so the same loader reads it:

    {root}/images/{split}_{n:06d}.jpg
    {root}/splits/synthetic/synthetic_{train,val,test}.pth   (file, {'height','width'}, xywh, phrase, polygons)
    {root}/synthetic.model                                    (sentencepiece, XLM-R ids via Tokenizer)
    {root}/scenes.json                                        (every object of every image, for checks)
    {root}/synthetic.json                                     (generator parameters: the cache marker)

Generation writes into a temporary sibling folder and renames it into place (atomic), under a file
lock, so concurrent processes neither collide nor see half a dataset; changed parameters regenerate.

One program per file: `config` (the parameters), `grammar` (objects, queries and the resolver),
`render` (placement and drawing), `cache` (the files on disk) and `__main__` (the command line).
"""

from oneref.data.synthetic.cache import (
    GENERATOR_VERSION,
    MARKER,
    SyntheticPaths,
    ensure_synthetic,
    is_complete,
    write_dataset,
)
from oneref.data.synthetic.config import SPLIT_NAMES, SyntheticConfig
from oneref.data.synthetic.grammar import (
    COLOURS,
    KINDS,
    RELATIONS,
    SIDES,
    SIZE_WORDS,
    VOCABULARY,
    Desc,
    Obj,
    Query,
    choose_query,
    parse_phrase,
    resolve,
)
from oneref.data.synthetic.render import generate_image

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "KINDS",
    "MARKER",
    "RELATIONS",
    "SIDES",
    "SIZE_WORDS",
    "SPLIT_NAMES",
    "VOCABULARY",
    "Desc",
    "Obj",
    "Query",
    "SyntheticConfig",
    "SyntheticPaths",
    "choose_query",
    "ensure_synthetic",
    "generate_image",
    "is_complete",
    "parse_phrase",
    "resolve",
    "write_dataset",
]
