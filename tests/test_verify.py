"""`python -m oneref.data.verify` on every annotation format: counts per split and the problems
it finds (missing images, bad boxes, empty sentences, unreadable files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.helpers import annotations as A

from oneref.data.verify import main as verify_main
from oneref.data.verify import verify

COUNTS = {s: len(A.expected_records(s)) for s in A.SPLITS}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return A.write_all(tmp_path_factory.mktemp("verify"))


@pytest.mark.parametrize("fmt", tuple(A.WRITERS))
def test_counts_per_split_in_every_format(roots: dict[str, Path], fmt: str) -> None:
    reports, problems = verify(roots["data"], roots[fmt], workers=1)
    assert not problems
    got = {r.split: r.records for r in reports if r.dataset == A.DATASET}
    assert got == COUNTS and all(r.ok for r in reports), (fmt, got)
    assert {r.split: r.images for r in reports} == {"train": 1, "val": 1, "testA": 1, "testB": 1}


def test_problems_are_counted_and_the_exit_status_is_1(roots: dict[str, Path], tmp_path: Path) -> None:
    data = json.loads((roots["seqtr"] / "refcoco-unc" / "instances.json").read_text())
    data["train"][0]["bbox"] = [3, 4, 0, 18]  # no area (2 sentences)
    data["train"][1]["expressions"] = ["..."]  # empty after tokenisation
    data["val"][0]["image_id"] = 77  # an image that is not there
    (tmp_path / "refcoco-unc").mkdir()
    (tmp_path / "refcoco-unc" / "instances.json").write_text(json.dumps(data))
    out = tmp_path / "report.json"
    rc = verify_main(
        [
            "--data-root",
            str(roots["data"]),
            "--split-root",
            str(tmp_path),
            "--format",
            "seqtr",
            "--json",
            str(out),
        ]
    )
    assert rc == 1
    rows = {r["split"]: r for r in json.loads(out.read_text())["splits"]}
    assert (rows["train"]["records"], rows["train"]["degenerate_box"], rows["train"]["empty_phrase"]) == (
        3,
        2,
        1,
    )
    assert rows["val"]["missing_image"] == 1
    assert "has no area" in rows["train"]["examples"]["degenerate_box"][0]


def test_unreadable_annotations_are_a_problem_not_a_traceback(roots: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(b"not a pickle")
    (tmp_path / "refcoco" / "instances.json").write_text("{}")
    reports, problems = verify(roots["data"], tmp_path, fmt="refer")
    assert not reports and len(problems) == 1 and "not a readable pickle" in problems[0]
